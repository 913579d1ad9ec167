"""Exit codes that mean what README says, and no false "rolled back" (issue
18, items 6-7): an interrupted run that completed its change is a success; one
that rolled back is 1 and left nothing; one that could not roll back says what
stays, and a flush removes it. Each lab test fails with the tool of before."""

import os
import random
import shutil
import signal
import time

import pytest

from lab import TOOL_MARKERS, snapshot_diff
from recorded import mer

ARGS = ("-i", "eth0", "-i", "eth1", "--no-imds")


def marked(snapshot):
    """The lines of a snapshot that carry one of the tool's markers."""
    return [line for text in snapshot.values() for line in text.splitlines()
            if any(marker in line for marker in TOOL_MARKERS)]


@pytest.mark.root
def test_sigint_at_random_points_exits_0_only_with_the_change_made_and_1_only_without(make_lab):
    """Before: SIGINT once the apply was complete exited 1 ("interrupted"),
    which README keeps for "nothing changed, or rolled back"."""
    lab = make_lab(ipv6=False)
    before = lab.snapshot()
    assert lab.run_tool(*ARGS).rc == 0
    applied = lab.snapshot()
    assert lab.run_tool("-f", *ARGS).rc == 0 and lab.snapshot() == before
    started = time.monotonic()
    assert lab.run_tool(*ARGS).rc == 0
    duration = time.monotonic() - started
    assert lab.run_tool("-f", *ARGS).rc == 0
    rng = random.Random(1814)
    seen = set()
    for attempt in range(24):
        flushing = attempt % 2 == 1
        if flushing:  # a flush interrupted: from the applied state
            assert lab.run_tool(*ARGS).rc == 0
        run = lab.popen_tool(*(("-f",) + ARGS if flushing else ARGS))
        wait_until_started(run.process.pid)
        time.sleep(rng.uniform(0, 1.1) * duration)
        run.process.send_signal(signal.SIGINT)
        result = run.communicate_result()
        now = lab.snapshot()
        start, end = (applied, before) if flushing else (before, applied)
        assert "Traceback" not in result.stderr, result.stderr
        if result.rc == 0:
            assert now == end, (attempt, result.stderr, snapshot_diff(end, now))
        elif result.rc == 1:
            assert now == start, (attempt, result.stderr, snapshot_diff(start, now))
            assert result.stderr.strip() == "multi-eni-routing: interrupted: nothing was changed"
        else:  # before main(): SIGINT's default action, which changes nothing
            assert result.rc == -signal.SIGINT and now == start, (attempt, result)
        seen.add(result.rc)
        if now != before:
            assert lab.run_tool("-f", *ARGS).rc == 0
    assert 0 in seen, seen  # some came after the change: success


def wait_until_started(pid, timeout=10):
    """Until the tool's first line has run: before, a SIGINT is the interpreter's
    own (a KeyboardInterrupt traceback from its start-up, not the tool's). The
    interpreter catches SIGINT, the tool's first line gives it back its default
    action, main() then catches SIGINT and SIGTERM."""
    deadline, interpreter = time.monotonic() + timeout, False
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/status" % pid) as handle:
                caught = int(dict(line.split(":", 1) for line in handle.read().splitlines())["SigCgt"], 16)
        except (OSError, KeyError):
            return  # ended already
        if caught & 1 << (signal.SIGTERM - 1) or (interpreter and not caught & 1 << (signal.SIGINT - 1)):
            return
        interpreter = interpreter or bool(caught & 1 << (signal.SIGINT - 1))
        time.sleep(0.001)
    raise AssertionError("the tool did not start within %s s" % timeout)


def mixed_backends(tmp_path):
    """A PATH directory where iptables-save is the nft backend's and
    iptables-restore the legacy one's (both multi-call binaries)."""
    nft, legacy = shutil.which("xtables-nft-multi"), shutil.which("xtables-legacy-multi")
    if not (nft and legacy):
        pytest.skip("needs both xtables-nft-multi and xtables-legacy-multi")
    directory = tmp_path / "bin"
    directory.mkdir()
    for name, target in (("iptables-save", nft), ("iptables-restore", legacy),
                         ("ip6tables-save", nft), ("ip6tables-restore", nft)):
        os.symlink(target, str(directory / name))
    return str(directory)


@pytest.mark.root
def test_iptables_save_and_restore_of_different_backends_are_refused_before_any_change(make_lab, tmp_path):
    """Before: restore wrote legacy chains that the nft save never showed; the
    verification failed and the tool said "rolled back" while they stayed."""
    lab = make_lab(ipv6=False)
    directory = mixed_backends(tmp_path)
    before = lab.snapshot()
    result = lab.run_tool(*ARGS, env={"PATH": directory + ":" + os.environ["PATH"]})
    legacy = lab.run(lab.instance, "xtables-legacy-multi", "iptables-save", "-t", "mangle", check=False).stdout
    assert "MULTI-ENI" not in legacy
    assert result.rc == 1
    assert result.stderr.splitlines() == [
        "multi-eni-routing: error: iptables-save is nft but iptables-restore is legacy: make them one "
        "backend (update-alternatives --config iptables)"]
    assert lab.snapshot() == before


def detaching_ip(tmp_path, name):
    """An `ip` that removes interface NAME once the first IPv4 batch of
    changes is done (not the batched reads, which carry -j): an ENI detached
    in the middle of a run."""
    real = shutil.which("ip")
    directory = tmp_path / "bin"
    directory.mkdir()
    wrapper = directory / "ip"
    wrapper.write_text('#!/bin/sh\n%s "$@"; rc=$?\n'
                       'case " $* " in *" -j "*) ;; *" -4 -batch "*) if mkdir "%s" 2>/dev/null; then %s link del %s; fi;; esac\n'
                       'exit $rc\n' % (real, tmp_path / "once", real, name))
    wrapper.chmod(0o755)
    return str(directory)


@pytest.mark.root
def test_an_eni_detached_mid_run_gives_no_false_rolled_back(make_lab, tmp_path):
    """Before: the sysctl of the gone ENI failed, the roll back stopped at it,
    eth0's rp_filter stayed loose, and the tool said "rolled back"."""
    lab = make_lab(ipv6=False)
    before = lab.snapshot()
    directory = detaching_ip(tmp_path, "eth1")
    result = lab.run_tool(*ARGS, env={"PATH": directory + ":" + os.environ["PATH"]})
    assert result.rc == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    now = lab.snapshot()
    if "rolled back to the state before the run" in result.stderr:
        assert marked(now) == []
        eth0 = [line for line in now["sysctls"].splitlines() if ".eth0." in line]
        assert eth0 == [line for line in before["sysctls"].splitlines() if ".eth0." in line]
    else:
        assert "what stays: " in result.stderr and "multi-eni-routing -f removes it" in result.stderr
    flushed = lab.run_tool("-f", "--no-imds")
    assert flushed.rc == 0, flushed.stderr
    assert marked(lab.snapshot()) == []


# -- Unit: what a roll back says is what it did. ------------------------------------

def left_with(rules):
    """A System with these rules of the tool's and nothing else."""
    return mer.System(links=[], main_routes=[], rules=list(rules), foreign_rules=[], routes=[],
                      mangle={4: mer.NO_MANGLE, 6: mer.NO_MANGLE}, sysfs={}, ipv6=True)


def roll_back_message(monkeypatch, tmp_path, system, apply):
    monkeypatch.setattr(mer, "read_system", lambda programs, sources=None, earlier=None: ({}, system))
    monkeypatch.setattr(mer, "apply_changes", apply)
    options = mer.parse_args(["--state-dir", str(tmp_path)])
    context = mer.Context(options, {}, str(tmp_path / "state.json"), mer.Lock(str(tmp_path)), mer.NO_HOOKS)
    return str(mer.roll_back(context, mer.NOTHING, mer.EMPTY_RECORD, mer.EMPTY_RECORD, mer.NO_CHANGES,
                             mer.ToolError("ip exited 2: Cannot find device")))


def test_a_roll_back_that_leaves_something_says_what_stays_and_that_a_flush_removes_it(monkeypatch, tmp_path):
    stays = mer.rule(4, 20001, 22001, fwmark="0x200/0x3f00")
    message = roll_back_message(monkeypatch, tmp_path, left_with([stays]), lambda programs, changes: None)
    assert message == ("ip exited 2: Cannot find device; not rolled back in full, what stays: ip -4 rule del "
                       "priority 20001 fwmark 0x200/0x3f00 table 22001 protocol 231; multi-eni-routing -f "
                       "removes it")


def test_a_roll_back_that_fails_never_says_rolled_back(monkeypatch, tmp_path):
    def failing(programs, changes):
        raise mer.CommandError(["ip", "-4", "-batch", "-"], 2, "RTNETLINK answers: No such device")

    message = roll_back_message(monkeypatch, tmp_path, left_with([]), failing)
    assert "rolled back to" not in message
    assert message.startswith("ip exited 2: Cannot find device; the roll back failed too (ip -4 -batch - exited 2")
    assert message.endswith("what this run changed may stay; multi-eni-routing -f removes it")


def test_a_roll_back_that_leaves_nothing_says_so(monkeypatch, tmp_path):
    message = roll_back_message(monkeypatch, tmp_path, left_with([]), lambda programs, changes: None)
    assert message == "ip exited 2: Cannot find device; rolled back to the state before the run"


def test_a_program_ignores_stop_signals_once_its_run_is_over():
    """Before: main() gave SIGINT back its default action before the process
    exited, so a SIGINT in that instant killed a run that had completed its
    change (CI saw "flushed: 18 changes" and exit -2). A program now ignores
    them from then on; a caller in the same process gets its handlers back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert mer.main(["--version"], exiting=False) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert mer.main(["--version"], exiting=True) == 0
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
