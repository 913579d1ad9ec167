"""A real boot: a fresh Debian 12 root (debootstrap, cached by fresh_root.py)
booted with systemd-nspawn inside the lab's instance namespace, whose two veth
ENIs systemd-networkd configures, with the IMDS emulator answering. The tests
run in file order on one machine: `sh install.sh --now` from a fresh clone,
`networkctl reconfigure` healed by the watcher, the SysV script going through
systemd, a broken options file, a reboot, and --uninstall. Each compares the
lab's routing state (rules, routes, mangle, addresses, sysctls) with the one
before the install, byte for byte.

How nspawn boots on these machines: ../shared/REAL-PARTS.md. Everything is
undone in finally: the container powered off or killed, the namespaces and
the extracted root deleted."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fresh_root  # noqa: E402
from lab import Lab, lab_usable, wait_for  # noqa: E402

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
SRC = "/root/multi-eni-routing"
OPTIONS = "/etc/default/multi-eni-routing"
UNIT = "multi-eni-routing.service"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Paths whose content changes by itself while a machine runs (logs, caches,
# systemd's own state), or that are the test's (the clone).
VOLATILE = ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache",
            "/var/lib/systemd", "/var/lib/dbus", SRC]


def cannot_boot():
    """Why nspawn cannot boot a root here, or ''."""
    reason = fresh_root.nested_reason()
    if reason:
        return reason
    usable, why = lab_usable()
    if not usable:
        return why
    ok, why = fresh_root.usable()
    if not ok:
        return why
    if not shutil.which("systemd-nspawn"):
        return "systemd-nspawn is not installed (apt-get install systemd-container)"
    if "--watch" not in subprocess.run([sys.executable, str(REPO / "multi_eni_routing.py"), "--help"],
                                       capture_output=True, text=True).stdout:
        return "the watcher (--watch), which the unit runs, is not in this tree"
    return ""


NSPAWN_STATE = "/run/systemd/nspawn"


class Machine:
    """ROOT booted by systemd-nspawn in the network namespace NETNS."""

    def __init__(self, root, netns, log):
        self.root, self.netns, self.log = root, netns, log
        self.nspawn = None
        self.pid1 = None

    def boot(self, timeout=90):
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-b", "-D", str(self.root), "--register=no", "--keep-unit",
             "--network-namespace-path=/run/netns/" + self.netns, "--private-network",
             "--console=pipe"], stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
            # no image lock: nspawn would leave its lock file in the host's /run for good
            env=dict(os.environ, SYSTEMD_NSPAWN_LOCK="0"))
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            self.pid1 = self._find_pid1()
            self._check_alive(deadline)
        state = ""
        while state not in ("running", "degraded"):
            result = self.sh("systemctl is-system-running", check=False)
            state = result.stdout.strip()
            self._check_alive(deadline, lambda: "state %r %s; jobs: %s" % (
                state, result.stderr, self.sh("systemctl list-jobs --no-pager", check=False).stdout))
        return state

    def _check_alive(self, deadline, why=lambda: ""):
        if self.nspawn.poll() is not None:
            raise AssertionError("systemd-nspawn exited with %s: %s" % (self.nspawn.returncode, self.console()))
        if time.monotonic() > deadline:
            raise AssertionError("the container did not boot in time: %s %s" % (why(), self.console()))
        time.sleep(0.2)

    def _find_pid1(self):
        """The container's systemd: a child of nspawn whose comm is systemd."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = Path("/proc/%s/stat" % entry).read_text()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                if ppid == self.nspawn.pid and comm == "systemd":
                    return int(entry)
        return None

    def console(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as handle:
            return handle.read()[-3000:]

    def sh(self, command, check=True, timeout=120):
        """Run COMMAND with /bin/sh inside the container (all its namespaces)."""
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "/usr/bin/env", "-i",
                                 "PATH=" + PATH, "LANG=C.UTF-8", "HOME=/root", "/bin/sh", "-c", command],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError("%r exited %d: %s%s" % (command, result.returncode, result.stdout,
                                                        result.stderr))
        return result

    def poweroff(self, timeout=60):
        """Shut down cleanly (the units stop); True if it did in time."""
        if not self.running():
            return True
        with contextlib.suppress(Exception):
            self.sh("systemctl poweroff", check=False, timeout=20)
        try:
            self.nspawn.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.pid1 = None
        return True

    def running(self):
        return self.nspawn is not None and self.nspawn.poll() is None

    def kill(self):
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nspawn.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(timeout=20)
        self.pid1 = None


def networkd_config(lab):
    """.network files giving each veth ENI its lab addresses, as DHCP would."""
    files = {}
    for eni in lab.enis:
        lines = ["[Match]", "Name=%s" % eni.name, "", "[Network]", "IPv6AcceptRA=no"]
        lines += ["Address=%s/%d" % (a, eni.subnet4.prefixlen) for a in eni.addresses4]
        if eni is lab.enis[0]:
            lines.append("Gateway=%s" % eni.gateway4)
        files["10-%s.network" % eni.name] = "\n".join(lines) + "\n"
    return files


def prepare(root, lab):
    """The machine as a cloud image boots it: networkd configures the ENIs,
    something wants network-online.target; and a fresh clone to install from."""
    # networkd configures the addresses itself (it fails, ERANGE, on ones it
    # finds already there)
    for eni in lab.enis:
        subprocess.run(["ip", "-n", lab.instance, "-4", "addr", "flush", "dev", eni.name],
                       check=True, capture_output=True)
    network = root / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    for name, text in networkd_config(lab).items():
        (network / name).write_text(text)
    subprocess.run(["systemctl", "--root", str(root), "enable", "systemd-networkd.service",
                    "systemd-networkd-wait-online.service"], check=True, capture_output=True)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "network-online.target").symlink_to("/lib/systemd/system/network-online.target")
    (root / "usr/sbin/policy-rc.d").unlink()  # a booted machine starts its services
    clone = root / SRC.lstrip("/")
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True)
    # the working tree as it is (uncommitted changes too): what is being tested
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)


@pytest.fixture(scope="module")
def booted():
    """(machine, lab, state before the install, file list before the install)."""
    reason = cannot_boot()
    if reason:
        pytest.skip(reason)
    stack = contextlib.ExitStack()
    with stack:
        if not os.path.exists(NSPAWN_STATE):  # nspawn makes it in the host's /run: ours to remove
            stack.callback(shutil.rmtree, NSPAWN_STATE, ignore_errors=True)
        lab = stack.enter_context(Lab(enis=2, addresses=2, ipv6=False))
        root = stack.enter_context(fresh_root.extracted(SUITE, "systemd"))
        prepare(root, lab)
        log = stack.enter_context(tempfile.NamedTemporaryFile("w+", prefix="mer-nspawn-", suffix=".log"))
        machine = Machine(root, lab.instance, log)
        stack.callback(machine.kill)
        stack.callback(machine.poweroff)
        try:
            machine.boot()
        except AssertionError as exc:  # before anything of ours is installed: the host's limits
            pytest.skip("systemd-nspawn cannot boot a Debian 12 root here: %s" % str(exc)[:500])
        wait_for(lambda: machine.sh("systemctl is-active network-online.target", check=False)
                 .stdout.strip() == "active", 60, "network-online.target")
        wait_for(lambda: all(r.icmp for r in lab.reachability(lab.addresses(lab.enis[0])).values()),
                 30, "eth0 answering before the install")
        yield machine, lab, lab.snapshot(), file_list(machine)


def file_list(machine):
    prune = " -o ".join("-path %s" % path for path in VOLATILE)
    return set(machine.sh("find / -xdev \\( %s \\) -prune -o -print" % prune).stdout.splitlines())


def all_answer(lab):
    reach = lab.reachability(lab.addresses())
    return all(r.icmp and r.tcp for r in reach.values())


def active(machine):
    return machine.sh("systemctl is-active %s" % UNIT, check=False).stdout.strip()


def test_install_now_routes_every_address(booted):
    machine, lab, before, _ = booted
    secondary = lab.enis[1].addresses4[0]
    assert not lab.tcp_ok(lab.client, secondary), "eth1 answers without the tool: the lab is wrong"
    result = machine.sh("cd %s && sh install.sh --now" % SRC)
    print(result.stdout + result.stderr)
    assert "enabled %s" % UNIT in result.stdout
    assert active(machine) == "active"
    wait_for(lambda: all_answer(lab), 10, "every address answering")
    status = machine.sh("systemctl show -p StatusText --value %s" % UNIT).stdout
    assert status.startswith("applied") or status.startswith("in sync"), status
    assert machine.sh("man -w multi-eni-routing 2>/dev/null || ls /usr/share/man/man8/multi-eni-routing.8.gz").stdout
    # Again: nothing changes, and the running watcher is left alone.
    pid = machine.sh("systemctl show -p MainPID --value %s" % UNIT).stdout
    state = lab.snapshot()
    again = machine.sh("cd %s && sh install.sh --now" % SRC)
    assert "not restarted" in again.stdout and "installed " not in again.stdout
    assert machine.sh("systemctl show -p MainPID --value %s" % UNIT).stdout == pid
    assert lab.snapshot() == state


def test_networkctl_reconfigure_is_healed_within_10_s(booted):
    machine, lab, _, _ = booted
    eth1, secondary = lab.enis[1].name, lab.enis[1].addresses4[0]
    wait_for(lambda: all_answer(lab), 10, "every address answering before the reconfigure")
    # Without the watcher (paused), the reconfigure breaks eth1's routing. (Only
    # the main process: signalling the whole cgroup fails now and then under
    # nspawn with cgroup v1, EIO, when a process of the unit exits meanwhile.)
    machine.sh("systemctl kill --kill-who=main -s SIGSTOP %s" % UNIT)
    try:
        machine.sh("networkctl reconfigure %s" % eth1)
        wait_for(lambda: not lab.tcp_ok(lab.client, secondary, timeout=0.5), 10,
                 "networkctl reconfigure to break the routing")
        time.sleep(2)  # and it stays broken
        assert not lab.tcp_ok(lab.client, secondary, timeout=0.5)
    finally:
        machine.sh("systemctl kill --kill-who=main -s SIGCONT %s" % UNIT)
    wait_for(lambda: all_answer(lab), 10, "the routing healed once the watcher runs again")
    # With the watcher running: healed within 10 s of the reconfigure (the
    # watcher's log line of the repair shows that there was something to heal).
    since = machine.sh("sleep 1; date +%s").stdout.strip()
    started = time.monotonic()
    machine.sh("networkctl reconfigure %s" % eth1)
    wait_for(lambda: "applied:" in machine.sh("journalctl -q -o cat -u %s --since @%s" % (UNIT, since)).stdout
             and all_answer(lab), 10, "the routing healed after networkctl reconfigure")
    healed = time.monotonic() - started
    print("networkctl reconfigure %s: every address answering again after %.1f s" % (eth1, healed))
    assert healed < 10


def test_systemctl_stop_restores_the_state_before_the_install(booted):
    machine, lab, before, _ = booted
    machine.sh("systemctl stop %s" % UNIT)
    assert active(machine) == "inactive"
    assert lab.snapshot() == before
    machine.sh("systemctl start %s" % UNIT)
    wait_for(lambda: all_answer(lab), 10, "every address answering after start")


def test_sysv_script_stops_through_systemd(booted):
    machine, lab, before, _ = booted
    assert active(machine) == "active"
    result = machine.sh("/etc/init.d/multi-eni-routing stop")
    assert "systemctl stop %s" % UNIT in result.stdout
    assert active(machine) == "inactive"
    assert lab.snapshot() == before
    result = machine.sh("/etc/init.d/multi-eni-routing start")
    assert active(machine) == "active"
    wait_for(lambda: all_answer(lab), 10, "every address answering after the SysV start")
    assert machine.sh("/etc/init.d/multi-eni-routing status").returncode == 0


def test_broken_options_file_fails_restart_in_one_line_and_stop_still_flushes(booted):
    machine, lab, before, _ = booted
    good = machine.sh("cat %s" % OPTIONS).stdout
    try:
        machine.sh("printf '%%s\\n' '-x eth9 --bogus' >>%s" % OPTIONS)
        machine.sh("systemctl stop %s" % UNIT)  # ExecStopPost flushes despite the file
        assert lab.snapshot() == before
        time.sleep(1.1)  # journalctl --since has one-second resolution
        since = machine.sh("date +%s").stdout.strip()
        result = machine.sh("systemctl restart %s" % UNIT, check=False)
        assert result.returncode != 0
        assert machine.sh("systemctl is-failed %s" % UNIT, check=False).stdout.strip() == "failed"
        journal = machine.sh("journalctl -q -o cat -u %s --since @%s" % (UNIT, since)).stdout
        ours = [line for line in journal.splitlines()
                if line.startswith(("multi-eni-routing:", "multi-eni-routing.py:"))]
        assert len(ours) == 1, journal
        assert "--bogus" in ours[0] and "error" in ours[0], journal
        assert lab.snapshot() == before
    finally:
        machine.sh("cat >%s <<'EOF'\n%sEOF" % (OPTIONS, good))
    machine.sh("systemctl restart %s" % UNIT)
    wait_for(lambda: all_answer(lab), 10, "every address answering with the options repaired")


def test_a_failed_apply_does_not_block_start_and_is_retried_in_sight(booted):
    """As at boot when the first apply fails: the unit is started (nothing
    ordered after it waits), and `systemctl status` shows the retries."""
    machine, lab, before, _ = booted
    dropin = "/run/systemd/system/%s.d" % UNIT
    machine.sh("systemctl stop %s" % UNIT)  # (before the drop-in: it would fail the flush too)
    machine.sh("mkdir -p %s && printf '[Service]\\nEnvironment=MULTI_ENI_ROUTING_FAIL_AFTER=1\\n' "
               ">%s/fail.conf && systemctl daemon-reload" % (dropin, dropin))
    try:
        machine.sh("systemctl start %s" % UNIT)  # returns: ready after the first attempt
        assert active(machine) == "active"
        status = lambda: machine.sh("systemctl show -p StatusText --value %s" % UNIT).stdout.strip()
        first = status()
        assert first.startswith("apply failed: ") and "retrying in" in first, first
        wait_for(lambda: status() != first and status().startswith("apply failed: "), 10,
                 "a second attempt in systemctl status")
        assert "retrying in" in machine.sh("systemctl status --no-pager %s" % UNIT).stdout
        assert lab.snapshot() == before  # each failed attempt was rolled back
    finally:
        machine.sh("rm -rf %s && systemctl daemon-reload" % dropin)
    machine.sh("systemctl restart %s" % UNIT)
    wait_for(lambda: all_answer(lab), 10, "every address answering once applies succeed")


def test_reboot_applies_again_without_a_manual_step(booted):
    machine, lab, before, _ = booted
    assert machine.poweroff(), "the container did not power off in time"
    assert lab.snapshot() == before  # the shutdown removed the routing
    machine.boot()
    wait_for(lambda: machine.sh("systemctl is-active network-online.target", check=False)
             .stdout.strip() == "active", 60, "network-online.target after the reboot")
    wait_for(lambda: active(machine) == "active", 30, "the service after the reboot")
    wait_for(lambda: all_answer(lab), 15, "every address answering after the reboot")


def test_uninstall_leaves_the_machine_as_before_the_install(booted):
    machine, lab, before, files_before = booted
    machine.sh("cd %s && sh install.sh --uninstall" % SRC)
    assert lab.snapshot() == before
    files_after = file_list(machine)
    assert files_after - files_before == set()
    assert files_before - files_after == set()
    leftovers = machine.sh("find /run -name '*multi-eni-routing*' -not -path '/run/systemd/*'").stdout
    assert leftovers == ""
    assert machine.sh("systemctl cat %s" % UNIT, check=False).returncode != 0
