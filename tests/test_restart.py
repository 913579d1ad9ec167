"""Restart and reload without a routing gap (the tool's side; the booted
systemd side is test_package_boot.py).

- `--flush --unless-restarting UNIT`, the unit's ExecStopPost=, flushes
  nothing while systemd has a restart job for UNIT (systemctl restart,
  try-restart, a package upgrade), so the next watcher takes the routing over;
  a stop, or anything it cannot tell, flushes. Without root, with a stand-in
  systemctl.
- SIGHUP, the unit's ExecReload=: the watcher starts again in place (same
  pid) and reads its options file again, the routing untouched meanwhile; a
  bad options file is refused and it goes on. As root, in a lab.
"""

import os
import signal
import time

import pytest

from recorded import mer
from test_watch import routing, wait_for, watching  # noqa: F401 (a fixture)

UNIT = "multi-eni-routing.service"


@pytest.fixture
def systemctl(tmp_path, monkeypatch):
    """set(jobs text, exit code): a systemctl in PATH that lists those jobs."""
    script = tmp_path / "systemctl"
    monkeypatch.setenv("PATH", str(tmp_path))

    def configure(jobs, code=0, show="Restart=on-failure\nRestartPreventExitStatus=2 4 5\n"):
        script.write_text("#!/bin/sh\ncase $1 in\nlist-jobs) cat <<'EOF'\n%sEOF\nexit %d;;\n"
                          "show) cat <<'EOF'\n%sEOF\n;;\n*) exit 9;;\nesac\n" % (jobs, code, show))
        script.chmod(0o755)

    return configure


@pytest.mark.parametrize("jobs, pending", [
    ("123 %s restart running\n" % UNIT, True),
    ("123 %s try-restart running\n" % UNIT, True),
    ("123 %s stop running\n" % UNIT, False),  # systemctl stop, apt remove, shutdown
    ("123 %s start running\n" % UNIT, False),  # a restart's start that failed: flush
    ("77 other.service restart waiting\n", False),
    ("", False),
])
def test_a_restart_job_is_told_from_a_stop(systemctl, jobs, pending):
    systemctl(jobs)
    assert bool(mer.restart_pending(UNIT, {})) is pending


# (SERVICE_RESULT, EXIT_STATUS) as systemd gives them to ExecStopPost=
@pytest.mark.parametrize("result, status, restarted", [
    ("signal", "KILL", True),  # kill -9, the OOM killer
    ("core-dump", "SEGV", True),
    ("exit-code", "1", True),  # a crash caught by main(): one line, exit 1
    ("watchdog", "ABRT", True),
    ("exit-code", "2", False),  # bad usage: RestartPreventExitStatus, flushed
    ("exit-code", "5", False),
    ("success", "0", False),  # systemctl stop: the watcher exits 0 on SIGTERM
])
def test_a_crash_that_the_unit_restarts_keeps_the_routing(systemctl, result, status, restarted):
    """Before: every stop that was not a restart job flushed, so a crash left
    every secondary address unanswered until systemd had started the watcher
    again (RestartSec=5)."""
    systemctl("")
    pending = mer.restart_pending(UNIT, {"SERVICE_RESULT": result, "EXIT_CODE": "x", "EXIT_STATUS": status})
    assert bool(pending) is restarted, pending


@pytest.mark.parametrize("show, result, status", [
    ("Restart=no\n", "signal", "KILL"),
    ("Restart=on-abort\nRestartPreventExitStatus=\n", "exit-code", "1"),
    ("Restart=on-failure\nRestartPreventExitStatus=SIGKILL 2\n", "signal", "KILL"),
])
def test_a_crash_that_the_unit_does_not_restart_flushes(systemctl, show, result, status):
    systemctl("", show=show)
    assert mer.restart_pending(UNIT, {"SERVICE_RESULT": result, "EXIT_STATUS": status}) == ""


def test_a_stop_job_flushes_even_after_a_crash(systemctl):
    systemctl("123 %s stop running\n" % UNIT)
    assert mer.restart_pending(UNIT, {"SERVICE_RESULT": "signal", "EXIT_STATUS": "KILL"}) == ""


def test_when_systemd_cannot_be_asked_it_flushes(systemctl, capsys):
    systemctl("123 %s restart running\n" % UNIT, code=1)
    assert mer.restart_pending(UNIT, {"SERVICE_RESULT": "signal", "EXIT_STATUS": "KILL"}) == ""
    assert "flushing" in capsys.readouterr().err


def test_without_systemctl_it_flushes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    if mer.which("systemctl"):
        pytest.skip("systemctl is in /usr/sbin or /sbin here")
    assert mer.restart_pending(UNIT, {"SERVICE_RESULT": "signal", "EXIT_STATUS": "KILL"}) == ""


def test_the_flush_is_skipped_only_while_restarting(systemctl, monkeypatch, capsys):
    flushed = []
    monkeypatch.setattr(mer, "execute", lambda context, *rest, **kw: flushed.append(context.options.flush) or 0)
    systemctl("123 %s restart running\n" % UNIT)
    assert mer.main(["--flush", "--unless-restarting", UNIT]) == 0
    assert flushed == []
    assert "not flushed: %s is restarting" % UNIT in capsys.readouterr().out
    systemctl("123 %s stop running\n" % UNIT)
    assert mer.main(["--flush", "-q", "--unless-restarting", UNIT]) == 0
    assert flushed == [True]


def test_unless_restarting_goes_with_flush(capsys):
    assert mer.main(["--unless-restarting", UNIT]) == mer.EXIT_USAGE
    assert "--unless-restarting goes with --flush" in capsys.readouterr().err


@pytest.mark.root
def test_sighup_starts_it_again_in_place_with_the_options_read_again(make_lab, watching, tmp_path):
    lab = make_lab()
    options = tmp_path / "options"
    options.write_text("# nothing yet\n")
    watcher = watching(lab, "--options-file", str(options)).ready()
    watcher.settle()
    applied = routing(lab)
    assert "22001" in str(applied)  # eth1's table
    pid = watcher.process.pid
    # an unchanged options file: in place, and nothing changes
    watcher.process.send_signal(signal.SIGHUP)
    watcher.wait_message("READY=1")
    assert watcher.process.poll() is None and watcher.process.pid == pid
    assert "reloading" in watcher.output()
    watcher.settle()
    assert routing(lab) == applied
    # eth1 excluded: the new watcher reads it and removes eth1's routing
    options.write_text("-x %s\n" % lab.enis[1].name)
    watcher.process.send_signal(signal.SIGHUP)
    watcher.wait_message("READY=1")
    wait_for(lambda: "22001" not in str(routing(lab)), 10, what="eth1's table gone after the reload")
    # a bad options file: refused, the watcher goes on with the options it has
    options.write_text("--bogus\n")
    before = watcher.output().count("reloading")
    watcher.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in watcher.output(), 10, what="the reload refused")
    time.sleep(0.5)
    assert watcher.process.poll() is None
    assert watcher.output().count("reloading") == before
    assert "unrecognized arguments: --bogus" in watcher.output()
    assert os.path.exists("/proc/%d" % pid)
