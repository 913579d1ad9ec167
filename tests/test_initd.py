"""The SysV init script: its LSB header, how it runs the watcher as a daemon
with a pid file and maps the tool's exit codes to LSB ones (with a fake tool,
no root), its hand-over to systemctl where systemd runs, and its whole life
cycle in a lab namespace against the installed tool and its real watcher
(root). Under a real systemd: tests/test_boot.py."""

import os
import re
import signal
import subprocess
from pathlib import Path

from lab import wait_for

import pytest

from gapless import Watch

REPO = Path(__file__).resolve().parent.parent
INITD = REPO / "init.d" / "multi-eni-routing"
INSTALL = REPO / "install.sh"

# A stand-in for the tool: records its arguments; with --daemon it leaves a
# sleeping process behind as the watcher and writes its pid file.
FAKE_TOOL = """#!/bin/sh
printf '%s\\n' "$*" >>"$FAKE_CALLS"
case " $* " in
    *" --flush "*) exit "${FAKE_FLUSH_RC:-0}" ;;
    *" --daemon "*)
        if [ "${FAKE_APPLY_RC:-0}" -ne 2 ]; then
            sleep 300 </dev/null >/dev/null 2>&1 &
            echo $! >"$FAKE_PIDFILE"
        fi
        exit "${FAKE_APPLY_RC:-0}" ;;
esac
exit 0
"""


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MULTI_ENI_ROUTING", "FAKE_"))}
    env.update(extra)
    return env


def lsb_header(text):
    block = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields, key = {}, None
    for line in block.splitlines():
        match = re.match(r"# ([A-Za-z-]+):\s*(.*)", line)
        if match:
            key = match.group(1)
            fields[key] = match.group(2).strip()
        elif key and line.startswith("#  "):
            fields[key] += " " + line[1:].strip()
    return fields


# -- the header -------------------------------------------------------------------

def test_lsb_header_is_complete():
    fields = lsb_header(INITD.read_text())
    assert fields["Provides"] == "multi-eni-routing"
    assert set(fields["Required-Start"].split()) == {"$network", "$remote_fs", "$syslog"}
    assert set(fields["Required-Stop"].split()) == {"$network", "$remote_fs", "$syslog"}
    assert fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert fields["Default-Stop"].split() == ["0", "1", "6"]
    # before container runtimes; not before sshd (it need not wait for this)
    assert {"docker", "containerd", "kubelet"} <= set(fields["X-Start-Before"].split())
    assert not {"ssh", "sshd"} & set(fields["X-Start-Before"].split())
    assert fields["Short-Description"]
    assert fields["Description"]


def test_chkconfig_header():
    text = INITD.read_text()
    match = re.search(r"^# chkconfig: (\d+) (\d+) (\d+)$", text, re.M)
    assert match, "no chkconfig line"
    levels, start, stop = match.groups()
    assert levels == "2345"
    assert int(start) > 10  # after RHEL's network script (10)
    assert int(stop) < 90  # and stopped before it (90)
    assert re.search(r"^# description: \S", text, re.M)


# -- actions and exit codes, with a fake tool -----------------------------------------

@pytest.fixture
def fake(tmp_path):
    """run(action, **codes) -> (exit code, stdout, stderr, the tool's calls);
    run.pid() -> the fake watcher's pid, if it runs."""
    tool = tmp_path / "tool"
    tool.write_text(FAKE_TOOL)
    tool.chmod(0o755)
    calls = tmp_path / "calls"
    pidfile = tmp_path / "watch.pid"

    def run(*action, tool_path=tool, env=None, **codes):
        if calls.exists():
            calls.unlink()
        full_env = clean_env(MULTI_ENI_ROUTING=str(tool_path), MULTI_ENI_ROUTING_OPTIONS=OPTIONS,
                             MULTI_ENI_ROUTING_PIDFILE=str(pidfile), FAKE_PIDFILE=str(pidfile),
                             MULTI_ENI_ROUTING_SYSTEMD=str(tmp_path / "no-systemd"),
                             FAKE_CALLS=str(calls), **{k.upper(): str(v) for k, v in codes.items()})
        full_env.update(env or {})
        proc = subprocess.run(["sh", str(INITD), *action], capture_output=True, text=True,
                              env=full_env, timeout=30)
        made = calls.read_text().splitlines() if calls.exists() else []
        return proc.returncode, proc.stdout, proc.stderr, made

    def pid():
        try:
            number = int(pidfile.read_text())
            os.kill(number, 0)
            return number
        except (OSError, ValueError):
            return None

    run.pid = pid
    run.pidfile = pidfile
    yield run
    if pid():
        os.kill(pid(), signal.SIGKILL)


OPTIONS = "/etc/example/options"
START = "--watch --daemon --pidfile %s --options-file " + OPTIONS
FLUSH = "--flush -q --options-file " + OPTIONS


def test_start_runs_the_watcher_as_a_daemon_with_the_options_file(fake):
    rc, _, _, calls = fake("start")
    assert rc == 0
    assert calls == [START % fake.pidfile]
    assert fake.pid()
    assert fake("status")[0] == 0


def test_start_when_running_starts_nothing(fake):
    fake("start")
    first = fake.pid()
    rc, out, _, calls = fake("start")
    assert rc == 0 and calls == [] and "already running" in out
    assert fake.pid() == first


def test_stop_ends_the_watcher_then_flushes(fake):
    fake("start")
    watcher = fake.pid()
    rc, _, _, calls = fake("stop")
    assert rc == 0
    assert calls == [FLUSH]
    assert fake.pid() is None and not fake.pidfile.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(watcher, 0)
    assert fake("status")[0] == 3


def test_stop_flushes_also_when_nothing_runs(fake):
    rc, _, _, calls = fake("stop")
    assert rc == 0
    assert calls == [FLUSH]


def test_a_failed_flush_fails_stop(fake):
    fake("start")
    assert fake("stop", fake_flush_rc=1)[0] == 1


@pytest.mark.parametrize("action", ["restart", "reload", "force-reload"])
def test_restart_and_reload_replace_the_watcher_without_a_flush(fake, action):
    """No flush between the two watchers: the routing stays in place."""
    fake("start")
    first = fake.pid()
    rc, _, _, calls = fake(action)
    assert rc == 0
    assert calls == [START % fake.pidfile]
    assert fake.pid() and fake.pid() != first


def test_restart_of_a_stopped_service_starts_it(fake):
    rc, _, _, calls = fake("restart")
    assert rc == 0
    assert calls == [START % fake.pidfile]


def test_try_restart_only_when_running(fake):
    assert fake("try-restart") == (0, "", "", [])
    fake("start")
    rc, _, _, calls = fake("try-restart")
    assert rc == 0 and calls == [START % fake.pidfile]


def test_status_of_a_dead_watcher_with_its_pid_file(fake):
    fake.pidfile.write_text("999999\n")
    assert fake("status")[0] == 1
    fake.pidfile.write_text("garbage\n")
    assert fake("status")[0] == 1


@pytest.mark.parametrize("tool_rc, lsb", [(1, 1), (2, 6), (4, 4), (5, 5), (7, 1)])
def test_start_maps_tool_failures_to_lsb_codes(fake, tool_rc, lsb):
    rc, _, err, _ = fake("start", fake_apply_rc=tool_rc)
    assert rc == lsb
    if tool_rc == 2:
        assert err.strip().splitlines() == ["multi-eni-routing: bad option in %s (see above)" % OPTIONS]


def test_missing_tool(fake, tmp_path):
    missing = tmp_path / "no-such-tool"
    assert fake("start", tool_path=missing)[0] == 5
    assert fake("stop", tool_path=missing)[0] == 5
    assert fake("status", tool_path=missing)[0] == 3


@pytest.mark.parametrize("action", [[], ["bogus"], ["START"], [""]])
def test_unknown_action_prints_usage_and_exits_2(fake, action):
    rc, _, err, calls = fake(*action)
    assert rc == 2
    assert "Usage:" in err and "start|stop|restart" in err
    assert calls == []


# -- on a systemd host: systemctl does it -------------------------------------------------

@pytest.fixture
def systemd_host(tmp_path):
    """Environment of a systemd host with a fake systemctl that records its arguments."""
    (tmp_path / "systemd").mkdir()
    systemctl = tmp_path / "systemctl"
    systemctl.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >>"$FAKE_SYSTEMCTL_CALLS"\nexit "${FAKE_SYSTEMCTL_RC:-0}"\n')
    systemctl.chmod(0o755)
    return {"MULTI_ENI_ROUTING_SYSTEMD": str(tmp_path / "systemd"),
            "MULTI_ENI_ROUTING_SYSTEMCTL": str(systemctl),
            "FAKE_SYSTEMCTL_CALLS": str(tmp_path / "systemctl-calls")}


@pytest.mark.parametrize("action, verb", [("start", "start"), ("stop", "stop"), ("restart", "restart"),
                                          ("reload", "reload"), ("force-reload", "reload-or-restart"),
                                          ("try-restart", "try-restart"), ("status", "status")])
def test_on_a_systemd_host_every_action_goes_through_systemctl(fake, systemd_host, action, verb):
    rc, _, _, calls = fake(action, env=systemd_host)
    assert rc == 0
    assert calls == []  # the tool itself was not run
    assert Path(systemd_host["FAKE_SYSTEMCTL_CALLS"]).read_text() == "%s multi-eni-routing.service\n" % verb


def test_systemctl_exit_code_is_passed_on(fake, systemd_host):
    env = dict(systemd_host, FAKE_SYSTEMCTL_RC="3")
    assert fake("status", env=env)[0] == 3


def test_systemctl_skip_redirect(fake, systemd_host):
    rc, _, _, calls = fake("stop", env=dict(systemd_host, SYSTEMCTL_SKIP_REDIRECT="1"))
    assert rc == 0 and calls == [FLUSH]
    assert not Path(systemd_host["FAKE_SYSTEMCTL_CALLS"]).exists()


# -- the life cycle in a lab, against the installed tool and its watcher (root) -------------

def watcher_in_tree():
    import sys
    help_text = subprocess.run([sys.executable, str(REPO / "multi_eni_routing.py"), "--help"],
                               capture_output=True, text=True).stdout
    return "--daemon" in help_text


@pytest.mark.root
def test_lifecycle_in_a_lab_namespace(make_lab, tmp_path):
    if not watcher_in_tree():
        pytest.skip("the watcher (--watch --daemon) is not in this tree")
    lab = make_lab(ipv6=False)
    root = tmp_path / "root"
    installed = subprocess.run(["sh", str(INSTALL), "-q"], env=clean_env(DESTDIR=str(root)),
                               capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    launcher = root / "usr/bin/multi-eni-routing.py"  # staged: point it at the staged module
    launcher.write_text(launcher.read_text().replace('"/usr/lib/multi-eni-routing"',
                                                     '"%s"' % (root / "usr/lib/multi-eni-routing")))
    options = root / "etc/default/multi-eni-routing"
    options.write_text("# the lab's ENIs\n-i eth0 -i eth1 --no-imds\n--state-dir '%s'\n" % lab.state_dir)
    pidfile = tmp_path / "watch.pid"
    env = clean_env(MULTI_ENI_ROUTING=str(root / "usr/bin/multi-eni-routing.py"),
                    MULTI_ENI_ROUTING_OPTIONS=str(options), MULTI_ENI_ROUTING_PIDFILE=str(pidfile),
                    MULTI_ENI_ROUTING_SYSTEMD=str(tmp_path / "no-systemd"))
    initd = str(root / "etc/init.d/multi-eni-routing")
    secondary = lab.enis[1].addresses4[0]  # eth1

    def action(name):
        return lab.run(lab.instance, "sh", initd, name, check=False, env=env, timeout=90)

    def our_rules():
        out = subprocess.run(["ip", "-n", lab.instance, "-d", "rule", "show"],
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "proto 231" in line]

    def watcher():
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    before = lab.snapshot()
    # Before: not running, and the secondary ENI's address does not answer.
    assert action("status").returncode == 3
    assert not lab.tcp_ok(lab.client, secondary)

    result = action("start")
    assert result.returncode == 0, result.stderr
    assert action("status").returncode == 0
    assert watcher()
    applied = our_rules()
    assert applied
    assert lab.tcp_ok(lab.client, secondary)

    # The daemon repairs what another program deletes: eth1's source rule.
    assert any(r.startswith("20301:") for r in applied)
    lab.ip(lab.instance, "rule del priority 20301")
    wait_for(lambda: our_rules() == applied, 10, "the watcher restoring the rule", interval=0.2)
    assert lab.tcp_ok(lab.client, secondary)

    result = action("start")  # already running
    assert result.returncode == 0, result.stderr

    pid = watcher()
    result = action("stop")
    assert result.returncode == 0, result.stderr
    assert action("status").returncode == 3
    assert watcher() is None and not pidfile.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert lab.snapshot() == before

    result = action("restart")
    assert result.returncode == 0, result.stderr
    assert lab.tcp_ok(lab.client, secondary)

    # What restart was before, stop then start, loses pings: the flush in between.
    with Watch(lab, lab.addresses(), secondary) as watch:
        assert action("stop").returncode == 0 and action("start").returncode == 0
    print("SysV stop, then start: %s" % watch.summary())
    assert watch.lost(), watch.report
    # A restart of a running watcher keeps every address answering throughout.
    pid = watcher()
    with Watch(lab, lab.addresses(), secondary) as watch:
        result = action("restart")
    assert result.returncode == 0, result.stderr
    assert watcher() and watcher() != pid
    watch.check("SysV restart without systemd")

    # A bad option: start fails with LSB 6 and one line from the tool; stop still flushes.
    options.write_text(options.read_text() + "--bogus\n")
    result = action("stop")
    assert result.returncode == 0, result.stderr
    assert lab.snapshot() == before
    result = action("start")
    assert result.returncode == 6
    tool_lines = [line for line in result.stderr.splitlines() if "--bogus" in line]
    assert len(tool_lines) == 1, result.stderr
    assert watcher() is None
    assert action("bogus").returncode == 2
