"""Hotplug: the debounced trigger that the udev rule and the network-manager
hooks run. Without root, against a fake tool: a burst of events gives one
run, nothing is applied while the service is stopped, no event is lost while
a run is under way, and the hooks pass the right events on. As root, in a
lab: an ENI attached to a running instance gets its routing (its address
answers), and a detached one loses its rules and table."""

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOTPLUG = REPO / "libexec" / "multi-eni-routing-hotplug"
INSTALL = REPO / "install.sh"
HOOKS = REPO / "hooks"

FAKE_TOOL = """#!/bin/sh
case " $* " in
    *" --status "*) printf 'status %s\\n' "$*" >>"$FAKE_CALLS"
                    exit "$(cat "$FAKE_STATUS_FILE" 2>/dev/null || echo 1)" ;;
esac
printf 'apply %s\\n' "$*" >>"$FAKE_CALLS"
sleep "${FAKE_SLEEP:-0}"
printf 'applied\\n' >>"$FAKE_CALLS"
exit 0
"""


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MULTI_ENI_ROUTING", "FAKE_"))}
    env["MULTI_ENI_ROUTING_NO_SYSTEMD_RUN"] = "1"
    env.update(extra)
    return env


def lock_is_free(path):
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def wait_idle(hotplug_dir, timeout=30):
    """Wait until no event is pending and no worker holds its lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not list(hotplug_dir.glob("*.pending")):
            locks = list(hotplug_dir.glob("*.lock"))
            if all(lock_is_free(lock) for lock in locks):
                return
        time.sleep(0.05)
    raise AssertionError("the hotplug worker did not finish within %ss" % timeout)


@pytest.fixture
def fake(tmp_path):
    """A fake tool, an options file and a hotplug directory; .trigger(...) runs
    the trigger like udev would, .calls() lists the tool's runs."""

    class Fake:
        dir = tmp_path / "hotplug"
        calls_file = tmp_path / "calls"
        status_file = tmp_path / "status"
        options = tmp_path / "options"
        log = tmp_path / "log"
        tool = tmp_path / "tool"

        def env(self, **extra):
            env = clean_env(MULTI_ENI_ROUTING=str(self.tool), MULTI_ENI_ROUTING_DEFAULTS=str(self.options),
                            MULTI_ENI_ROUTING_HOTPLUG_DIR=str(self.dir),
                            MULTI_ENI_ROUTING_HOTPLUG_LOG=str(self.log),
                            MULTI_ENI_ROUTING_DEBOUNCE="0.3", FAKE_CALLS=str(self.calls_file),
                            FAKE_STATUS_FILE=str(self.status_file))
            env.update(extra)
            return env

        def trigger(self, *args, **extra):
            args = args or ("udev", "eth-fake9", "add")
            return subprocess.run(["sh", str(HOTPLUG), *args], capture_output=True, text=True,
                                  env=self.env(**extra), timeout=30)

        def calls(self):
            return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []

        def applies(self):
            return [c for c in self.calls() if c.startswith("apply")]

    fake = Fake()
    fake.tool.write_text(FAKE_TOOL)
    fake.tool.chmod(0o755)
    fake.options.write_text('MULTI_ENI_ROUTING_OPTS="--state-dir /tmp/fake-state"\n')
    fake.status_file.write_text("1\n")
    yield fake
    if fake.dir.exists():
        wait_idle(fake.dir)


def test_a_burst_of_events_gives_one_run(fake):
    for index in range(5):
        result = fake.trigger("udev", "eth-fake%d" % index, "add")
        assert result.returncode == 0, result.stderr
    wait_idle(fake.dir)
    assert fake.calls() == ["status --status --state-dir /tmp/fake-state",
                            "apply --state-dir /tmp/fake-state", "applied"]
    assert "re-applied" in fake.log.read_text()


def test_the_trigger_returns_at_once(fake):
    started = time.monotonic()
    result = fake.trigger(MULTI_ENI_ROUTING_DEBOUNCE="2")
    assert result.returncode == 0
    assert time.monotonic() - started < 1.5
    assert fake.calls() == []  # the worker is still waiting for quiet
    wait_idle(fake.dir)
    assert len(fake.applies()) == 1


@pytest.mark.parametrize("status, meaning", [("0", "routing in sync"), ("3", "not applied")])
def test_no_apply_when_in_sync_or_stopped(fake, status, meaning):
    fake.status_file.write_text(status + "\n")
    fake.trigger()
    wait_idle(fake.dir)
    assert fake.applies() == []
    assert meaning in fake.log.read_text()


def test_started_service_reapplies_without_asking_for_status(fake):
    """With one ENI the tool applies nothing (status: "not applied"), yet a
    second ENI attached later must be routed: the service's marker says so."""
    subprocess.run(["sh", str(HOTPLUG), "--started"], env=fake.env(), check=True)
    fake.status_file.write_text("3\n")
    fake.trigger()
    wait_idle(fake.dir)
    assert fake.calls() == ["apply --state-dir /tmp/fake-state", "applied"]
    subprocess.run(["sh", str(HOTPLUG), "--stopped"], env=fake.env(), check=True)
    fake.trigger()
    wait_idle(fake.dir)
    assert fake.calls()[2:] == ["status --status --state-dir /tmp/fake-state"]


def test_no_apply_when_status_fails(fake):
    fake.status_file.write_text("2\n")
    fake.trigger()
    wait_idle(fake.dir)
    assert fake.applies() == []
    assert "status failed (exit code 2)" in fake.log.read_text()


def test_an_event_during_a_run_gives_one_more_run(fake):
    fake.trigger(FAKE_SLEEP="1.5")
    deadline = time.monotonic() + 10
    while not fake.applies() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.applies(), "the first run did not start"
    fake.trigger(FAKE_SLEEP="0")  # arrives while the first apply runs
    fake.trigger(FAKE_SLEEP="0")
    wait_idle(fake.dir)
    assert len(fake.applies()) == 2
    assert fake.calls()[-1] == "applied"


def test_disabled_in_the_options_file(fake):
    fake.options.write_text('MULTI_ENI_ROUTING_HOTPLUG="no"\n')
    result = fake.trigger()
    assert result.returncode == 0
    assert not fake.dir.exists() or not list(fake.dir.glob("*.pending"))
    time.sleep(0.5)
    assert fake.calls() == []


def test_loopback_events_are_ignored(fake):
    assert fake.trigger("ifupdown", "lo", "start").returncode == 0
    assert not fake.dir.exists()


def test_options_file_debounce_and_environment_override(fake):
    fake.options.write_text('MULTI_ENI_ROUTING_DEBOUNCE="0.1"\n')
    fake.trigger(MULTI_ENI_ROUTING_DEBOUNCE="")
    wait_idle(fake.dir)
    assert "re-apply in 0.1s" in fake.log.read_text()


def test_environment_wins_over_the_options_file_also_in_the_worker(fake):
    fake.options.write_text('MULTI_ENI_ROUTING_OPTS="-q"\nMULTI_ENI_ROUTING_DEBOUNCE="5"\n')
    started = time.monotonic()
    fake.trigger(MULTI_ENI_ROUTING_OPTS="-v")  # and MULTI_ENI_ROUTING_DEBOUNCE=0.3
    wait_idle(fake.dir)
    assert time.monotonic() - started < 4
    assert fake.calls() == ["status --status -v", "apply -v", "applied"]


def test_usage(fake):
    result = subprocess.run(["sh", str(HOTPLUG)], capture_output=True, text=True, env=fake.env())
    assert result.returncode == 2
    assert "Usage:" in result.stderr


# -- the hooks pass the right events to the trigger ------------------------------------

@pytest.fixture
def hook(tmp_path):
    """hook(name, *args, **env) -> the trigger's arguments (None if not called)."""
    recorder = tmp_path / "recorder"
    record = tmp_path / "record"
    recorder.write_text('#!/bin/sh\nprintf "%%s\\n" "$*" >"%s"\n' % record)
    recorder.chmod(0o755)

    def run(name, *args, **env):
        copy = tmp_path / name
        copy.write_text((HOOKS / name).read_text().replace(
            "/usr/libexec/multi-eni-routing-hotplug", str(recorder)))
        if record.exists():
            record.unlink()
        result = subprocess.run(["sh", str(copy), *args], capture_output=True, text=True,
                                env=dict(clean_env(), **env), timeout=10)
        assert result.returncode == 0, result.stderr
        return record.read_text().strip() if record.exists() else None

    return run


@pytest.mark.parametrize("action, expected", [
    ("up", "networkmanager eth1 up"), ("down", "networkmanager eth1 down"),
    ("dhcp4-change", "networkmanager eth1 dhcp4-change"),
    ("dhcp6-change", "networkmanager eth1 dhcp6-change"),
    ("pre-up", None), ("hostname", None), ("connectivity-change", None)])
def test_networkmanager_dispatcher_hook(hook, action, expected):
    assert hook("networkmanager-dispatcher", "eth1", action) == expected


@pytest.mark.parametrize("iface, mode, expected", [
    ("eth1", "start", "ifupdown eth1 start"), ("eth1", "stop", "ifupdown eth1 stop"),
    ("lo", "start", None), ("--all", "start", None)])
def test_ifupdown_hook(hook, iface, mode, expected):
    assert hook("ifupdown", IFACE=iface, MODE=mode) == expected


def test_networkd_dispatcher_hook(hook):
    assert hook("networkd-dispatcher", IFACE="ens6", STATE="routable") == "networkd ens6 routable"
    assert hook("networkd-dispatcher") is None


def test_udev_rule_runs_the_trigger_for_eni_drivers_on_add_and_remove():
    rule = (REPO / "udev" / "90-multi-eni-routing.rules").read_text()
    assert 'SUBSYSTEM!="net", GOTO="multi_eni_routing_end"' in rule
    assert 'ACTION!="add|remove", GOTO="multi_eni_routing_end"' in rule
    assert 'DRIVERS=="ena|ixgbevf|vif", ENV{MULTI_ENI_ROUTING_ENI}="1"' in rule
    # remove events have no DRIVERS: the mark from "add" (udev database) selects them
    assert 'ENV{MULTI_ENI_ROUTING_ENI}=="1", RUN+="/usr/libexec/multi-eni-routing-hotplug udev $name' in rule


# -- in a lab (root) -----------------------------------------------------------------------

def our_rules(lab):
    out = subprocess.run(["ip", "-n", lab.instance, "-d", "rule", "show"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "proto 231" in line]


def table_routes(lab, table):
    return subprocess.run(["ip", "-n", lab.instance, "route", "show", "table", str(table)],
                          capture_output=True, text=True).stdout.strip()


class InstalledInLab:
    """install.sh into a DESTDIR; run the installed trigger and init script in
    a lab's instance namespace, with the installed tool."""

    def __init__(self, tmp_path):
        self.root = tmp_path / "root"
        installed = subprocess.run(["sh", str(INSTALL), "-q"], env=dict(clean_env(), DESTDIR=str(self.root)),
                                   capture_output=True, text=True, timeout=60)
        assert installed.returncode == 0, installed.stderr
        self.hotplug_dir = tmp_path / "hotplug"
        self.log = tmp_path / "log"
        self.options = self.root / "etc/default/multi-eni-routing"

    def env(self, lab, **extra):
        self.options.write_text('MULTI_ENI_ROUTING_OPTS="--state-dir %s"\n' % lab.state_dir)
        env = clean_env(MULTI_ENI_ROUTING=str(self.root / "usr/bin/multi-eni-routing.py"),
                        MULTI_ENI_ROUTING_DEFAULTS=str(self.options),
                        MULTI_ENI_ROUTING_HOTPLUG_TRIGGER=str(self.root / "usr/libexec/multi-eni-routing-hotplug"),
                        MULTI_ENI_ROUTING_HOTPLUG_DIR=str(self.hotplug_dir),
                        MULTI_ENI_ROUTING_HOTPLUG_LOG=str(self.log), MULTI_ENI_ROUTING_DEBOUNCE="0.3",
                        MULTI_ENI_ROUTING_HOTPLUG_VIRTUAL="yes")
        env.update(extra)
        return env

    def trigger(self, lab, iface, event, source="udev", **extra):
        """What udev (or the refresh timer, without IFACE) runs; waits for the
        worker; the log so far."""
        trigger = self.root / "usr/libexec/multi-eni-routing-hotplug"
        event_args = [iface, event] if iface else []
        result = lab.run(lab.instance, "sh", str(trigger), source, *event_args,
                         env=self.env(lab, **extra), check=False)
        assert result.returncode == 0, result.stderr
        if self.hotplug_dir.exists():
            wait_idle(self.hotplug_dir, timeout=60)
        return self.log.read_text() if self.log.exists() else ""

    def initd(self, lab, action):
        initd = self.root / "etc/init.d/multi-eni-routing"
        result = lab.run(lab.instance, "sh", str(initd), action, env=self.env(lab), check=False, timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr
        return result


@pytest.fixture
def installed(tmp_path):
    return InstalledInLab(tmp_path)


@pytest.mark.root
def test_attached_eni_is_routed_and_detached_eni_is_cleaned_up(make_lab, installed):
    lab = make_lab()
    installed.initd(lab, "start")
    eni = lab.attach_eni()
    address = eni.addresses4[0]
    # Attached but not yet routed: its address does not answer.
    assert lab.run_tool("--status").rc == 1
    assert not lab.tcp_ok(lab.client, address)

    # A veth is virtual: without the lab switch, its event is not even recorded.
    assert installed.trigger(lab, eni.name, "add", MULTI_ENI_ROUTING_HOTPLUG_VIRTUAL="no") == ""
    assert lab.run_tool("--status").rc == 1

    log = installed.trigger(lab, eni.name, "add")
    assert "re-applied" in log, log
    assert lab.run_tool("--status").rc == 0
    rules = our_rules(lab)
    mine = [rule for rule in rules if "from %s " % address in rule + " "]
    assert mine, rules
    table = int(mine[0].split("lookup ")[1].split()[0])
    assert "default via" in table_routes(lab, table)
    assert lab.tcp_ok(lab.client, address)
    for other in lab.addresses(v6=False):
        assert lab.tcp_ok(lab.client, other), other

    lab.detach_eni(eni)
    log = installed.trigger(lab, eni.name, "remove")
    assert log.count("re-applied") == 2, log
    assert lab.run_tool("--status").rc == 0
    assert not any(address in rule or "lookup %d " % table in rule + " " for rule in our_rules(lab))
    assert table_routes(lab, table) == ""
    for other in lab.addresses(v6=False):
        assert lab.tcp_ok(lab.client, other), other


@pytest.mark.root
def test_second_eni_attached_to_a_single_eni_instance(make_lab, installed):
    """The common case: one ENI at boot (nothing to route), a second attached
    later."""
    lab = make_lab(enis=1, ipv6=False)
    installed.initd(lab, "start")
    assert our_rules(lab) == []
    eni = lab.attach_eni()
    address = eni.addresses4[0]
    assert not lab.tcp_ok(lab.client, address)
    log = installed.trigger(lab, eni.name, "add")
    assert "re-applied" in log, log
    assert any("from %s " % address in rule + " " for rule in our_rules(lab))
    assert lab.tcp_ok(lab.client, address)
    assert lab.tcp_ok(lab.client, lab.enis[0].addresses4[0])


@pytest.mark.root
def test_hotplug_does_not_apply_while_the_service_is_stopped(make_lab, installed):
    lab = make_lab(ipv6=False)
    installed.initd(lab, "start")
    installed.initd(lab, "stop")
    eni = lab.attach_eni()
    log = installed.trigger(lab, eni.name, "add")
    assert "service not started; routing not applied; nothing to do" in log, log
    assert our_rules(lab) == []
    assert lab.run_tool("--status").rc == 3


@pytest.mark.root
def test_routing_applied_by_hand_is_kept_up_to_date(make_lab, installed):
    """No service, but someone ran the tool: stale routing is re-applied."""
    lab = make_lab(ipv6=False)
    assert lab.run_tool().rc == 0
    eni = lab.attach_eni()
    log = installed.trigger(lab, eni.name, "add")
    assert "re-applied" in log, log
    assert lab.run_tool("--status").rc == 0
    assert lab.tcp_ok(lab.client, eni.addresses4[0])


@pytest.mark.root
def test_refresh_timer_routes_an_address_assigned_in_ec2_at_run_time(make_lab, installed):
    """No link event tells of a secondary address assigned in EC2 while the
    instance runs: the refresh timer's run of the trigger adds and routes it."""
    lab = make_lab(enis=2, ipv6=False, configure_secondaries=False)
    installed.initd(lab, "start")
    eth1, new = lab.enis[1], "203.0.113.20"
    lab.add_address(eth1, new, on_instance=False)  # assigned in the VPC: IMDS lists it
    assert not lab.tcp_ok(lab.client, new)
    log = installed.trigger(lab, None, None, source="timer")
    assert "re-applied" in log, log
    assert lab.tcp_ok(lab.client, new), log + lab.run(lab.instance, "ip", "-o", "-4", "addr").stdout
