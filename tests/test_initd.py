"""The SysV init script: its LSB header, how it maps actions to the tool and
the tool's exit codes to LSB ones (with a fake tool, no root), and its whole
life cycle in a lab namespace against the installed tool (root)."""

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INITD = REPO / "init.d" / "multi-eni-routing"
INSTALL = REPO / "install.sh"
HOTPLUG = REPO / "libexec" / "multi-eni-routing-hotplug"

FAKE_TOOL = """#!/bin/sh
printf '%s\\n' "$*" >>"$FAKE_CALLS"
case " $* " in
    *" --status "*) exit "${FAKE_STATUS_RC:-3}" ;;
    *" --flush "*) exit "${FAKE_FLUSH_RC:-0}" ;;
esac
exit "${FAKE_APPLY_RC:-0}"
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
    assert {"ssh", "sshd", "docker"} <= set(fields["X-Start-Before"].split())
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
    run.started() -> whether the hotplug trigger's marker says "started"."""
    tool = tmp_path / "tool"
    tool.write_text(FAKE_TOOL)
    tool.chmod(0o755)
    calls = tmp_path / "calls"
    options = tmp_path / "options"
    options.write_text('MULTI_ENI_ROUTING_OPTS="-x docker0 --state-dir /tmp/nowhere"\n')

    hotplug_dir = tmp_path / "hotplug"

    def run(*action, tool_path=tool, **codes):
        if calls.exists():
            calls.unlink()
        env = clean_env(MULTI_ENI_ROUTING=str(tool_path), MULTI_ENI_ROUTING_DEFAULTS=str(options),
                        MULTI_ENI_ROUTING_HOTPLUG_TRIGGER=str(HOTPLUG),
                        MULTI_ENI_ROUTING_HOTPLUG_DIR=str(hotplug_dir),
                        FAKE_CALLS=str(calls), **{k.upper(): str(v) for k, v in codes.items()})
        proc = subprocess.run(["sh", str(INITD), *action], capture_output=True, text=True,
                              env=env, timeout=30)
        made = calls.read_text().splitlines() if calls.exists() else []
        return proc.returncode, proc.stdout, proc.stderr, made

    run.started = lambda: bool(list(hotplug_dir.glob("*.started")))
    return run


OPTS = "-x docker0 --state-dir /tmp/nowhere"


def test_start_applies_with_the_options(fake):
    rc, _, _, calls = fake("start")
    assert rc == 0
    assert calls == [OPTS]
    assert fake.started()  # hotplug now routes ENIs attached later


def test_stop_flushes_with_the_options(fake):
    fake("start")
    rc, _, _, calls = fake("stop")
    assert rc == 0
    assert calls == ["--flush " + OPTS]
    assert not fake.started()


def test_a_failed_start_or_stop_leaves_the_hotplug_marker_alone(fake):
    assert fake("start", fake_apply_rc=1)[0] == 1
    assert not fake.started()
    assert fake("start")[0] == 0
    assert fake("stop", fake_flush_rc=1)[0] == 1
    assert fake.started()


@pytest.mark.parametrize("action", ["reload", "force-reload"])
def test_reload_reapplies(fake, action):
    rc, _, _, calls = fake(action)
    assert rc == 0
    assert calls == [OPTS]
    assert fake.started()


def test_restart_flushes_then_applies(fake):
    rc, _, _, calls = fake("restart")
    assert rc == 0
    assert calls == ["--flush " + OPTS, OPTS]


def test_restart_does_not_apply_when_the_flush_failed(fake):
    rc, _, _, calls = fake("restart", fake_flush_rc=1)
    assert rc == 1
    assert calls == ["--flush " + OPTS]


@pytest.mark.parametrize("status_rc, expected_calls", [(3, 1), (0, 3), (1, 3)])
def test_try_restart_only_when_applied(fake, status_rc, expected_calls):
    rc, _, _, calls = fake("try-restart", fake_status_rc=status_rc)
    assert rc == 0
    assert len(calls) == expected_calls


@pytest.mark.parametrize("tool_rc, status", [(0, 0), (1, 1), (3, 3), (2, 4), (4, 4), (5, 4), (9, 4)])
def test_status_exit_codes(fake, tool_rc, status):
    rc, out, _, calls = fake("status", fake_status_rc=tool_rc)
    assert rc == status
    assert calls == ["--status " + OPTS]


@pytest.mark.parametrize("tool_rc, lsb", [(1, 1), (2, 6), (4, 4), (5, 5), (7, 1)])
def test_start_maps_tool_failures_to_lsb_codes(fake, tool_rc, lsb):
    rc, _, _, _ = fake("start", fake_apply_rc=tool_rc)
    assert rc == lsb


def test_missing_tool(fake, tmp_path):
    missing = tmp_path / "no-such-tool"
    assert fake("start", tool_path=missing)[0] == 5
    assert fake("stop", tool_path=missing)[0] == 5
    assert fake("status", tool_path=missing)[0] == 4


@pytest.mark.parametrize("action", [[], ["bogus"], ["START"], [""]])
def test_unknown_action_prints_usage_and_exits_2(fake, action):
    rc, _, err, calls = fake(*action)
    assert rc == 2
    assert "Usage:" in err and "start|stop|restart" in err
    assert calls == []


def test_empty_options_file_means_no_options(fake, tmp_path):
    (tmp_path / "options").write_text("# nothing set\n")
    rc, _, _, calls = fake("start")
    assert rc == 0
    assert calls == [""]


# -- the life cycle in a lab, against the installed tool (root) ---------------------------

@pytest.mark.root
def test_lifecycle_in_a_lab_namespace(make_lab, tmp_path):
    lab = make_lab(ipv6=False)
    root = tmp_path / "root"
    installed = subprocess.run(["sh", str(INSTALL), "-q"], env=clean_env(DESTDIR=str(root)),
                               capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    options = root / "etc/default/multi-eni-routing"
    options.write_text('MULTI_ENI_ROUTING_OPTS="-i eth0 -i eth1 --no-imds --state-dir %s"\n'
                       % lab.state_dir)
    env = clean_env(MULTI_ENI_ROUTING=str(root / "usr/bin/multi-eni-routing.py"),
                    MULTI_ENI_ROUTING_DEFAULTS=str(options),
                    MULTI_ENI_ROUTING_HOTPLUG_TRIGGER=str(root / "usr/libexec/multi-eni-routing-hotplug"),
                    MULTI_ENI_ROUTING_HOTPLUG_DIR=str(tmp_path / "hotplug"))
    initd = str(root / "etc/init.d/multi-eni-routing")
    secondary = lab.enis[1].addresses4[0]  # eth1

    def action(name):
        return lab.run(lab.instance, "sh", initd, name, check=False, env=env, timeout=90)

    def our_rules():
        out = subprocess.run(["ip", "-n", lab.instance, "-d", "rule", "show"],
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "proto 231" in line]

    # Before: nothing applied, and the secondary ENI's address does not answer.
    assert action("status").returncode == 3
    assert not lab.tcp_ok(lab.client, secondary)

    result = action("start")
    assert result.returncode == 0, result.stderr
    assert action("status").returncode == 0
    assert any("from %s" % secondary in rule for rule in our_rules())
    assert lab.tcp_ok(lab.client, secondary)

    result = action("start")  # already applied
    assert result.returncode == 0, result.stderr
    assert action("status").returncode == 0

    result = action("stop")
    assert result.returncode == 0, result.stderr
    assert action("status").returncode == 3
    assert our_rules() == []
    assert not lab.tcp_ok(lab.client, secondary)

    result = action("stop")  # nothing applied
    assert result.returncode == 0, result.stderr
    assert action("status").returncode == 3

    result = action("restart")
    assert result.returncode == 0, result.stderr
    assert action("status").returncode == 0
    assert lab.tcp_ok(lab.client, secondary)

    # Stale: someone removed one of the rules; status says so, reload repairs.
    rule = next(r for r in our_rules() if "from %s" % secondary in r)
    lab.ip(lab.instance, "rule del priority %s from %s" % (rule.split(":")[0], secondary + "/32"))
    assert action("status").returncode == 1
    for name in ("reload", "force-reload"):
        result = action(name)
        assert result.returncode == 0, result.stderr
        assert action("status").returncode == 0

    assert action("bogus").returncode == 2

    result = action("stop")
    assert result.returncode == 0, result.stderr
    assert our_rules() == []
