"""A real boot, once per distribution family's network stack: a fresh Debian
12 root (debootstrap from Debian's packages, cached by fresh_root.py) booted
with systemd-nspawn inside the lab's instance namespace, whose two veth ENIs
the stack configures, with the IMDS emulator answering and a Docker-like
container (the lab's bridge, DNAT of 8080 on eth1's second address).

The stacks (STACKS): systemd-networkd (Debian 13, AL2023), netplan rendering
to networkd (Ubuntu), NetworkManager with keyfiles (RHEL family), ifupdown
with ISC dhclient installed (Debian 12 cloud images). Unlike a real instance,
every stack gets static addresses (the ENIs' primary and secondary ones) from
its own configuration files, not DHCP; each has its wait-online service
enabled. Half of them run iptables-legacy (update-alternatives in the root),
the others iptables-nft; MER_BOOT_IPTABLES=both runs every stack with both.

Per stack, in file order on one machine: `sh install.sh --now` from a fresh
clone (every address answering, where before the install eth1's did not),
the stack's own reconfiguration of eth1 (first without the watcher: broken)
healed within 2 s, stop, the SysV script going through systemd, a broken
options file, a failed apply, a reboot, the first packet from a secondary
address at network-online over several boots (first without the unit's
ordering before network-online), and --uninstall. Each compares the lab's
routing state (rules, routes, mangle of both iptables backends, addresses,
sysctls) with the one before the install, byte for byte.

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
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fresh_root  # noqa: E402
from lab import (CLIENT4, DNAT_PORT, ECHO_PORT, TEST_NICS, Lab, eventually, lab_usable,  # noqa: E402
                 normalized_iptables, snapshot_diff, tool_lines, wait_for)

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
SRC = "/root/multi-eni-routing"
OPTIONS = "/etc/default/multi-eni-routing"
UNIT = "multi-eni-routing.service"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Paths whose content changes by itself while a machine runs (logs, caches,
# systemd's and the network stacks' own state: NetworkManager's, dhclient's
# leases), or that are the test's (the clone).
VOLATILE = ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache",
            "/var/lib/systemd", "/var/lib/dbus", "/var/lib/NetworkManager", "/var/lib/dhcp", SRC]


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


# The cgroup hierarchies systemd-nspawn puts a container in (hybrid: the
# named systemd one and the unified one; pure cgroup v2: the one).
CGROUP_HIERARCHIES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
CGROUP_V2 = "/sys/fs/cgroup"


def cgroup_hierarchies():
    found = [h for h in CGROUP_HIERARCHIES if os.path.exists(h + "/cgroup.procs")]
    return found or ([CGROUP_V2] if os.path.exists(CGROUP_V2 + "/cgroup.controllers") else [])


class Machine:
    """ROOT booted by systemd-nspawn in the network namespace NETNS.

    nspawn with --keep-unit puts the container's cgroups under its own, as
    `payload/`: started from the same cgroup (here every process is in the
    root one), two containers would share /payload/system.slice/..., and one
    stopping a unit would kill the other's processes of the same unit. So
    each machine's nspawn runs in a cgroup of its own (mer-nspawn-NETNS in
    each hierarchy), removed by kill()."""

    def __init__(self, root, netns, log, stack=None):
        self.root, self.netns, self.log = root, netns, log
        self.stack = stack or STACKS[0]  # the network stack that configures its ENIs
        self.nspawn = None
        self.pid1 = None
        self.cgroups = [os.path.join(h, "mer-nspawn-" + netns) for h in cgroup_hierarchies()]

    def boot(self, timeout=90):
        for cgroup in self.cgroups:
            os.makedirs(cgroup, exist_ok=True)
        # the shell moves itself into the cgroups, then becomes nspawn (same pid)
        enter = "".join('echo $$ >"%s/cgroup.procs" && ' % cgroup for cgroup in self.cgroups)
        self.nspawn = subprocess.Popen(
            ["/bin/sh", "-c", enter + 'exec "$@"', "sh",
             "systemd-nspawn", "-b", "-D", str(self.root), "--register=no", "--keep-unit",
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
        """Kill the container if it still runs, and remove its cgroups."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nspawn.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(timeout=20)
        self.pid1 = None
        if not self.running():
            self.remove_cgroups()

    def remove_cgroups(self, timeout=10):
        """rmdir the machine's cgroups, deepest first (the kernel frees those
        of processes just killed a moment later)."""
        deadline = time.monotonic() + timeout
        for cgroup in self.cgroups:
            while os.path.isdir(cgroup):
                for path, _, _ in os.walk(cgroup, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(path)
                if time.monotonic() > deadline:
                    raise AssertionError("cannot remove the cgroup %s" % cgroup)
                time.sleep(0.1) if os.path.isdir(cgroup) else None


class Stack(NamedTuple):
    """A network stack as a distribution family's cloud image runs it."""
    name: str
    flavour: str  # fresh_root.FLAVOURS
    configure: object  # (root, lab): its configuration files, its services enabled
    wait_online: str  # its wait-online service, enabled
    # Its own reconfigurations of eth1: (label, commands run one after the other)
    reconfigurations: tuple
    iptables: str  # "nft" or "legacy": the root's alternative
    # The first packet at network-online without the unit's ordering: lost on
    # at least one boot of several (networkd, netplan: the unit is ready after
    # network-online); elsewhere a race or fine by chance, only reported.
    unordered_fails: bool


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


def configure_networkd(root, lab):
    network = root / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    for name, text in networkd_config(lab).items():
        (network / name).write_text(text)
    enable(root, "systemd-networkd.service", "systemd-networkd-wait-online.service")


def netplan_config(lab):
    """One YAML for the ENIs, rendered to networkd (as Ubuntu's cloud-init writes it)."""
    lines = ["network:", "  version: 2", "  renderer: networkd", "  ethernets:"]
    for eni in lab.enis:
        lines += ["    %s:" % eni.name, "      accept-ra: false",
                  "      addresses: [%s]" % ", ".join("%s/%d" % (a, eni.subnet4.prefixlen)
                                                      for a in eni.addresses4)]
        if eni is lab.enis[0]:
            lines += ["      routes:", "        - to: default", "          via: %s" % eni.gateway4]
    return "\n".join(lines) + "\n"


def configure_netplan(root, lab):
    path = root / "etc/netplan/50-lab.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(netplan_config(lab))
    path.chmod(0o600)
    # No udevd in the container: `netplan apply` would fail on `udevadm
    # trigger/settle` (a lab quirk; on an instance udevd runs).
    shadow = root / "usr/local/sbin/udevadm"
    shadow.write_text("#!/bin/sh\n# lab: no udevd under systemd-nspawn\nexit 0\n")
    shadow.chmod(0o755)
    enable(root, "systemd-networkd.service", "systemd-networkd-wait-online.service")


def nm_keyfiles(lab):
    """A keyfile profile per ENI, as RHEL keeps them (plugins=keyfile)."""
    files = {}
    for eni in lab.enis:
        lines = ["[connection]", "id=%s" % eni.name, "uuid=%s" % uuid.uuid5(uuid.NAMESPACE_DNS, eni.name),
                 "type=ethernet", "interface-name=%s" % eni.name, "autoconnect=true", "",
                 "[ethernet]", "", "[ipv4]", "method=manual"]
        lines += ["address%d=%s/%d" % (i + 1, a, eni.subnet4.prefixlen) for i, a in enumerate(eni.addresses4)]
        if eni is lab.enis[0]:
            lines.append("gateway=%s" % eni.gateway4)
        lines += ["", "[ipv6]", "method=disabled"]
        files["%s.nmconnection" % eni.name] = "\n".join(lines) + "\n"
    return files


def configure_networkmanager(root, lab):
    conf = root / "etc/NetworkManager"
    (conf / "system-connections").mkdir(parents=True, exist_ok=True)
    # keyfiles only, as RHEL; the lab's bridge and container veth are not NM's
    (conf / "NetworkManager.conf").write_text(
        "[main]\nplugins=keyfile\nno-auto-default=*\n\n"
        "[keyfile]\nunmanaged-devices=*,except:interface-name:eth*\n")
    for name, text in nm_keyfiles(lab).items():
        (conf / "system-connections" / name).write_text(text)
        (conf / "system-connections" / name).chmod(0o600)
    enable(root, "NetworkManager.service", "NetworkManager-wait-online.service")


def ifupdown_interfaces(lab):
    """/etc/network/interfaces: an `auto` and static stanzas per ENI (one per address)."""
    lines = ["auto lo", "iface lo inet loopback"]
    for eni in lab.enis:
        lines += ["", "auto %s" % eni.name]
        for i, address in enumerate(eni.addresses4):
            lines += ["iface %s inet static" % eni.name,
                      "    address %s/%d" % (address, eni.subnet4.prefixlen)]
            if eni is lab.enis[0] and i == 0:
                lines.append("    gateway %s" % eni.gateway4)
    return "\n".join(lines) + "\n"


def configure_ifupdown(root, lab):
    (root / "etc/network/interfaces").write_text(ifupdown_interfaces(lab))
    enable(root, "networking.service", "ifupdown-wait-online.service")


STACKS = [
    Stack("networkd", "systemd", configure_networkd, "systemd-networkd-wait-online.service",
          (("networkctl reconfigure", ("networkctl reconfigure eth1",)),), "nft", True),
    Stack("netplan", "netplan", configure_netplan, "systemd-networkd-wait-online.service",
          (("netplan apply", ("netplan apply",)),), "legacy", True),
    Stack("networkmanager", "networkmanager", configure_networkmanager, "NetworkManager-wait-online.service",
          (("nmcli device reapply", ("nmcli device reapply eth1",)),
           ("nmcli connection down/up", ("nmcli connection down eth1", "nmcli connection up eth1"))),
          "nft", False),
    Stack("ifupdown", "ifupdown", configure_ifupdown, "ifupdown-wait-online.service",
          (("ifdown/ifup", ("ifdown eth1", "ifup eth1")),), "legacy", False),
]


def stack_params():
    """One run per stack; with MER_BOOT_IPTABLES=both, each with both backends."""
    if os.environ.get("MER_BOOT_IPTABLES") == "both":
        return [s._replace(iptables=b) for s in STACKS for b in ("nft", "legacy")]
    return STACKS


def enable(root, *units):
    subprocess.run(["systemctl", "--root", str(root), "enable", *units], check=True, capture_output=True)


# The lab's probe of readiness: a oneshot ordered after network-online, as a
# service that calls out from a secondary ENI address would be. One connect
# with a timeout under the first SYN retransmit (1 s): no retry hides a miss.
PROBE_UNIT = "mer-first-packet.service"
PROBE_LOG = "/var/log/mer-first-packet.log"
PROBE = """import socket, sys
source, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.socket()
sock.settimeout(0.9)
try:
    sock.bind((source, 0))
    sock.connect((target, port))
    result = "ok"
except OSError as exc:
    result = "failed: %s" % exc
with open("{log}", "a") as log:
    log.write(result + "\\n")
"""


def install_probe(root, lab):
    source = lab.enis[1].addresses4[0]
    (root / "usr/local/sbin/mer-first-packet").write_text(PROBE.format(log=PROBE_LOG))
    (root / "etc/systemd/system" / PROBE_UNIT).write_text("\n".join([
        "[Unit]", "Description=lab: the first packet from a secondary ENI address at network-online",
        "After=network-online.target", "Wants=network-online.target", "",
        "[Service]", "Type=oneshot", "RemainAfterExit=yes",
        "ExecStart=/usr/bin/python3 /usr/local/sbin/mer-first-packet %s %s %d" % (source, CLIENT4, ECHO_PORT),
        "", "[Install]", "WantedBy=multi-user.target", ""]))
    enable(root, PROBE_UNIT)


def lab_nics_dropin(root):
    """The lab's ENIs are veths, which the watcher knows no ENI is: the tool's
    test hook (lab.TEST_NICS) in the unit's environment, as a drop-in that is
    there before the install (the uninstall leaves it, as it leaves any admin's)."""
    dropin = root / "etc/systemd/system" / (UNIT + ".d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "lab-nics.conf").write_text("[Service]\n" + "".join(
        "Environment=%s=%s\n" % item for item in TEST_NICS.items()))


def prepare(root, lab, stack=None):
    """The machine as a cloud image boots it: STACK (default networkd)
    configures the ENIs, something wants network-online.target; and a fresh
    clone to install from."""
    stack = stack or STACKS[0]
    # the stack configures the addresses and the default route itself
    # (networkd fails, ERANGE, on addresses it finds already there)
    for eni in lab.enis:
        subprocess.run(["ip", "-n", lab.instance, "-4", "addr", "flush", "dev", eni.name],
                       check=True, capture_output=True)
    subprocess.run(["ip", "-n", lab.instance, "-4", "route", "del", "default"], capture_output=True)
    stack.configure(root, lab)
    install_probe(root, lab)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    if not (wants / "network-online.target").exists():
        (wants / "network-online.target").symlink_to("/lib/systemd/system/network-online.target")
    if stack.iptables == "legacy":
        for name in ("iptables", "ip6tables"):
            subprocess.run(["chroot", str(root), "update-alternatives", "--quiet", "--set", name,
                            "/usr/sbin/%s-legacy" % name], check=True, capture_output=True)
    # a persistent journal: what happened at a shutdown can be read afterwards
    (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
    lab_nics_dropin(root)
    (root / "usr/sbin/policy-rc.d").unlink()  # a booted machine starts its services
    copy_source(root)


def copy_source(root):
    """A clone of this checkout at SRC in the root, with the working tree as it
    is (uncommitted changes too): what is being tested."""
    clone = root / SRC.lstrip("/")
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True)
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)


def boot_machine(resources, root, lab, stack=None):
    """The root booted in the lab's instance namespace, powered off and killed
    when `resources` (an ExitStack) closes; a skip when nspawn cannot boot it
    (before anything of ours is installed: the host's limits)."""
    log = resources.enter_context(tempfile.NamedTemporaryFile("w+", prefix="mer-nspawn-", suffix=".log"))
    machine = Machine(root, lab.instance, log, stack)
    resources.callback(machine.kill)
    resources.callback(machine.poweroff)
    try:
        machine.boot()
    except AssertionError as exc:
        pytest.skip("systemd-nspawn cannot boot a Debian 12 root here: %s" % str(exc)[:500])
    return machine


@pytest.fixture(scope="module", params=stack_params(), ids=lambda s: "%s-%s" % (s.name, s.iptables))
def booted(request):
    """(machine, lab, state before the install, file list before the install);
    machine.stack is the Stack."""
    stack = request.param
    reason = cannot_boot()
    if reason:
        pytest.skip(reason)
    resources = contextlib.ExitStack()
    with resources:
        if not os.path.exists(NSPAWN_STATE):  # nspawn makes it in the host's /run: ours to remove
            resources.callback(shutil.rmtree, NSPAWN_STATE, ignore_errors=True)
        lab = resources.enter_context(Lab(enis=2, addresses=2, ipv6=False, container=True))
        started = time.monotonic()
        root = resources.enter_context(fresh_root.extracted(SUITE, stack.flavour))
        prepare(root, lab, stack)
        machine = boot_machine(resources, root, lab, stack)
        wait_online(machine)
        wait_for(lambda: all(r.icmp for r in lab.reachability(lab.addresses(lab.enis[0])).values()),
                 30, "eth0 answering before the install")
        version = machine.sh("iptables -V && ip6tables -V").stdout
        assert version.count({"nft": "(nf_tables)", "legacy": "(legacy)"}[stack.iptables]) == 2, version
        print("%s: root extracted and booted in %.0f s" % (stack.name, time.monotonic() - started))
        yield machine, lab, state(machine, lab), file_list(machine)
        print("%s: %.0f s in all" % (stack.name, time.monotonic() - started))


def wait_online(machine):
    """network-online.target reached, and the stack's wait-online service behind it."""
    wait_for(lambda: machine.sh("systemctl is-active network-online.target", check=False)
             .stdout.strip() == "active", 60, "network-online.target")
    unit = machine.stack.wait_online
    assert machine.sh("systemctl is-active %s" % unit, check=False).stdout.strip() == "active", (
        machine.sh("systemctl status --no-pager %s" % unit, check=False).stdout)


def state(machine, lab):
    """lab.snapshot() and the tables of the machine's own iptables backend,
    read with the host's iptables-legacy-save or iptables-nft-save in the lab
    namespace (the host's iptables-save shows only nft; this works also while
    the machine is powered off). Routes sorted: the kernel lists a table's
    routes in the order they were added, which a stack's own reconfiguration
    (ifdown/ifup) changes."""
    snap = lab.snapshot()
    for key in ("ip route", "ip -6 route"):
        snap[key] = "".join(sorted(snap[key].splitlines(True)))
    for save in ("iptables", "ip6tables"):
        program = "%s-%s-save" % (save, machine.stack.iptables)
        snap["machine " + program] = normalized_iptables(lab.run(lab.instance, program).stdout)
    return snap


def same_state(machine, lab, before):
    """Assert the state is byte for byte the one before, with a readable diff."""
    now = state(machine, lab)
    assert now == before, snapshot_diff(before, now)


def file_list(machine):
    """Every path of the machine but VOLATILE ones and Python's byte-code
    caches (netplan's Python writes them when it first runs)."""
    prune = " -o ".join(["-path %s" % path for path in VOLATILE] + ["-name __pycache__"])
    return set(machine.sh("find / -xdev \\( %s \\) -prune -o -print" % prune).stdout.splitlines())


def all_answer(lab):
    reach = lab.reachability(lab.addresses())
    return all(r.icmp and r.tcp for r in reach.values())


def active(machine):
    return machine.sh("systemctl is-active %s" % UNIT, check=False).stdout.strip()


def unit_journal(machine, lines=40):
    """The unit's last journal lines, for an assertion's message."""
    return machine.sh("journalctl -q --no-pager -o short-monotonic -n %d -u %s" % (lines, UNIT),
                      check=False).stdout


def every_path_works(lab):
    """{check: ok} of everything that must work with the routing in place."""
    secondary = lab.enis[1].addresses4[0]
    reach = lab.reachability(lab.addresses())
    out = lab.paths([(a, CLIENT4) for a in lab.addresses()])
    checks = {"%s answers from outside (ICMP+TCP)" % a: r.icmp and r.tcp for a, r in reach.items()}
    checks.update({"outbound from %s" % s: r.icmp and r.tcp for (s, _), r in out.items()})
    checks["DNAT'd container on %s:%d" % (lab.dnat_address, DNAT_PORT)] = lab.tcp_ok(
        lab.client, lab.dnat_address, DNAT_PORT, timeout=1)
    checks["container to a host service on %s" % secondary] = lab.tcp_ok(lab.container, secondary, timeout=1)
    return checks


def failing(lab):
    return sorted(check for check, ok in every_path_works(lab).items() if not ok)


def test_install_now_routes_every_address(booted):
    machine, lab, before, _ = booted
    secondary = lab.enis[1].addresses4[0]
    # Without the tool: eth1's addresses, outbound from them and the DNAT'd
    # container fail; eth0 and the container's path to the host work.
    broken = failing(lab)
    assert broken == sorted(["%s answers from outside (ICMP+TCP)" % a for a in lab.enis[1].addresses4]
                            + ["outbound from %s" % a for a in lab.enis[1].addresses4]
                            + ["DNAT'd container on %s:%d" % (lab.dnat_address, DNAT_PORT)]), broken
    result = machine.sh("cd %s && sh install.sh --now" % SRC)
    print(result.stdout + result.stderr)
    assert "enabled %s" % UNIT in result.stdout
    assert active(machine) == "active", unit_journal(machine)
    wait_for(lambda: not failing(lab), 10, "every check passing: %s" % failing(lab))
    assert lab.tcp_ok(lab.client, secondary)
    status = machine.sh("systemctl show -p StatusText --value %s" % UNIT).stdout
    assert status.startswith("applied") or status.startswith("in sync"), status
    assert machine.sh("man -w multi-eni-routing 2>/dev/null || ls /usr/share/man/man8/multi-eni-routing.8.gz").stdout
    # Again: nothing changes, and the running watcher is left alone.
    pid = machine.sh("systemctl show -p MainPID --value %s" % UNIT).stdout
    snap = state(machine, lab)
    again = machine.sh("cd %s && sh install.sh --now" % SRC)
    assert "not restarted" in again.stdout and "installed " not in again.stdout
    assert machine.sh("systemctl show -p MainPID --value %s" % UNIT).stdout == pid
    same_state(machine, lab, snap)


def test_the_unit_runs_sandboxed(booted):
    machine, _, _, _ = booted
    show = machine.sh("systemctl show -p CapabilityBoundingSet -p ProtectSystem -p NoNewPrivileges %s"
                      % UNIT).stdout
    assert "CapabilityBoundingSet=cap_net_admin cap_net_raw\n" in show, show
    assert "ProtectSystem=strict" in show and "NoNewPrivileges=yes" in show, show
    pid = machine.sh("systemctl show -p MainPID --value %s" % UNIT).stdout.strip()
    status = machine.sh("grep -E '^(CapBnd|NoNewPrivs)' /proc/%s/status" % pid).stdout
    assert "CapBnd:\t0000000000003000" in status and "NoNewPrivs:\t1" in status, status
    # its file system: read-only but for /proc/sys/net and /run
    mounts = {mount: machine.sh("awk '$5 == \"%s\" {print $6}' /proc/%s/mountinfo" % (mount, pid)).stdout.split(",")[0]
              for mount in ("/", "/proc/sys/net", "/run")}
    assert mounts == {"/": "ro", "/proc/sys/net": "rw", "/run": "rw"}, mounts


@contextlib.contextmanager
def pause_watcher(machine):
    """The watcher stopped (SIGSTOP) inside the block."""
    machine.sh("systemctl kill --kill-who=main -s SIGSTOP %s" % UNIT)
    try:
        yield
    finally:
        machine.sh("systemctl kill --kill-who=main -s SIGCONT %s" % UNIT)


def test_the_stacks_own_reconfiguration_is_healed_within_2_s(booted):
    machine, lab, _, _ = booted
    secondary = lab.enis[1].addresses4[0]
    broke = []
    for label, commands in machine.stack.reconfigurations:
        wait_for(lambda: all_answer(lab), 10, "every address answering before %s" % label)
        # Without the watcher (paused): does the reconfiguration break eth1's routing?
        with pause_watcher(machine):
            for command in commands:
                machine.sh(command)
            if eventually(lambda: not lab.tcp_ok(lab.client, secondary, timeout=0.5), 5):
                time.sleep(2)  # and it stays broken
                assert not lab.tcp_ok(lab.client, secondary, timeout=0.5)
                broke.append(label)
        wait_for(lambda: all_answer(lab), 10, "the routing healed once the watcher runs again")
        # With the watcher running: every address answers within 2 s of the
        # reconfiguration's last command (after its repair, in the journal,
        # where the reconfiguration broke something).
        since = machine.sh("sleep 1; date +%s").stdout.strip()
        for command in commands:
            machine.sh(command)
        healed = wait_for(lambda: all_answer(lab), 2, "every address answering within 2 s of %s" % label)
        print("%s %s: every address answering again after %.2f s (without the watcher it %s)"
              % (machine.stack.name, label, healed, "broke eth1" if label in broke else "broke nothing"))
        if label in broke:
            wait_for(lambda: "applied:" in machine.sh("journalctl -q -o cat -u %s --since @%s"
                                                      % (UNIT, since)).stdout, 10, "the repair's log line")
        assert not failing(lab), failing(lab)
    assert broke, "no reconfiguration of %s broke the routing without the watcher: the test shows nothing" % (
        machine.stack.name)


def test_systemctl_stop_restores_the_state_before_the_install(booted):
    machine, lab, before, _ = booted
    machine.sh("systemctl stop %s" % UNIT)
    assert active(machine) == "inactive", unit_journal(machine)
    same_state(machine, lab, before)
    machine.sh("systemctl start %s" % UNIT)
    wait_for(lambda: all_answer(lab), 10, "every address answering after start")


def test_sysv_script_stops_through_systemd(booted):
    machine, lab, before, _ = booted
    assert active(machine) == "active", unit_journal(machine)
    result = machine.sh("/etc/init.d/multi-eni-routing stop")
    assert "systemctl stop %s" % UNIT in result.stdout
    assert active(machine) == "inactive", unit_journal(machine)
    same_state(machine, lab, before)
    result = machine.sh("/etc/init.d/multi-eni-routing start")
    assert active(machine) == "active", unit_journal(machine)
    wait_for(lambda: all_answer(lab), 10, "every address answering after the SysV start")
    assert machine.sh("/etc/init.d/multi-eni-routing status").returncode == 0


def test_broken_options_file_fails_restart_in_one_line_and_stop_still_flushes(booted):
    machine, lab, before, _ = booted
    good = machine.sh("cat %s" % OPTIONS).stdout
    try:
        machine.sh("printf '%%s\\n' '-x eth9 --bogus' >>%s" % OPTIONS)
        machine.sh("systemctl stop %s" % UNIT)  # ExecStopPost flushes despite the file
        same_state(machine, lab, before)
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
        same_state(machine, lab, before)
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
        assert active(machine) == "active", unit_journal(machine)
        status = lambda: machine.sh("systemctl show -p StatusText --value %s" % UNIT).stdout.strip()
        first = status()
        assert first.startswith("apply failed: ") and "retrying in" in first, first
        wait_for(lambda: status() != first and status().startswith("apply failed: "), 10,
                 "a second attempt in systemctl status")
        assert "retrying in" in machine.sh("systemctl status --no-pager %s" % UNIT).stdout
        same_state(machine, lab, before)  # each failed attempt was rolled back
    finally:
        machine.sh("rm -rf %s && systemctl daemon-reload" % dropin)
    machine.sh("systemctl restart %s" % UNIT)
    wait_for(lambda: all_answer(lab), 10, "every address answering once applies succeed")


def reboot(machine, lab, before):
    """Power off (the routing removed: the state before the install), boot, wait for network-online."""
    assert machine.poweroff(), "the container did not power off in time"
    # (not the state before the install: ifupdown, say, removes its addresses at shutdown)
    left = tool_lines(state(machine, lab))
    assert left == [], "the shutdown left routing of the tool: %s\n%s" % (left, journal_of_last_boot(machine))
    machine.boot()
    wait_online(machine)


def journal_of_last_boot(machine):
    """The machine's journal (persistent: see prepare) of its last boot, read from the host."""
    return subprocess.run(["journalctl", "-D", str(machine.root / "var/log/journal"), "-b", "-0", "-q",
                           "--no-pager", "-o", "short-monotonic"],
                          capture_output=True, text=True).stdout[-6000:]


def test_reboot_applies_again_without_a_manual_step(booted):
    machine, lab, before, _ = booted
    reboot(machine, lab, before)
    wait_for(lambda: active(machine) == "active", 30, "the service after the reboot")
    wait_for(lambda: not failing(lab), 15, "every check passing after the reboot: %s" % failing(lab))


BOOTS = int(os.environ.get("MER_BOOTS", "3"))


def first_packets(machine, lab, before, boots):
    """The probe's result at each of BOOTS boots: ["ok", "failed: ...", ...]."""
    results = []
    for _ in range(boots):
        reboot(machine, lab, before)
        wait_for(lambda: machine.sh("systemctl is-active %s" % PROBE_UNIT, check=False).stdout.strip()
                 in ("active", "failed"), 60, "the probe's run")
        results.append(machine.sh("tail -n 1 %s" % PROBE_LOG).stdout.strip())
    return results


def test_the_first_packet_from_a_secondary_address_at_network_online_gets_out(booted):
    """A service ordered after network-online sends its first packet from
    eth1's address: it gets out at every boot, because the unit is ready (its
    first apply done) before network-online. Without that ordering (the unit
    as it was: After=network.target only), it is lost at boot on networkd
    and netplan."""
    machine, lab, before, _ = booted
    unordered = "/etc/systemd/system/%s" % UNIT
    machine.sh("sed -e '/^Before=network-online.target/d' -e '/^After=ifupdown-wait-online/d' "
               "-e 's/^After=network.target .*/After=network.target/' /usr/lib/systemd/system/%s >%s "
               "&& systemctl daemon-reload" % (UNIT, unordered))
    try:
        assert "network-online.target" not in machine.sh("systemctl show -p Before --value %s" % UNIT).stdout
        without = first_packets(machine, lab, before, BOOTS)
    finally:
        machine.sh("rm -f %s && systemctl daemon-reload" % unordered)
    print("%s, the unit not ordered before network-online: %d of %d first packets got out: %s"
          % (machine.stack.name, without.count("ok"), BOOTS, without))
    if machine.stack.unordered_fails:
        assert without.count("ok") < BOOTS, "the first packet got out without the ordering: the test shows nothing"
    assert "network-online.target" in machine.sh("systemctl show -p Before --value %s" % UNIT).stdout
    results = first_packets(machine, lab, before, BOOTS)
    print("%s, as installed: %d of %d first packets got out: %s"
          % (machine.stack.name, results.count("ok"), BOOTS, results))
    assert results == ["ok"] * BOOTS
    wait_for(lambda: not failing(lab), 15, "every check passing after the boots: %s" % failing(lab))


IMDS_TIMEOUT = 5.0  # the tool's --imds-timeout default: the bound of the first attempt's IMDS requests
APPLY_MARGIN = 2.0  # the apply itself and a loaded 2-core machine


def monotonic_usec(machine, unit, prop):
    return int(machine.sh("systemctl show -p %s --value %s" % (prop, unit)).stdout.strip())


def test_a_silent_imds_delays_network_online_only_boundedly(booted):
    """IMDS drops every packet (as when it is disabled, or behind a hop limit):
    network-online.target is still reached, at most --imds-timeout plus the
    apply after the stack's wait-online service, and the unit is active.
    When IMDS answers again, every address answers."""
    machine, lab, before, _ = booted
    lab.imds.go_silent()
    try:
        reboot(machine, lab, before)
        waited = (monotonic_usec(machine, "network-online.target", "ActiveEnterTimestampMonotonic")
                  - monotonic_usec(machine, machine.stack.wait_online, "ActiveEnterTimestampMonotonic")) / 1e6
        status = machine.sh("systemctl show -p StatusText --value %s" % UNIT).stdout.strip()
        print("%s, IMDS silent: network-online reached %.2f s after %s; the unit: %s"
              % (machine.stack.name, waited, machine.stack.wait_online, status))
        assert active(machine) == "active", unit_journal(machine)
        assert waited <= IMDS_TIMEOUT + APPLY_MARGIN
    finally:
        lab.imds.silent4 = lab.imds.silent6 = False
        lab._apply_source_checks()
    machine.sh("systemctl restart %s" % UNIT)  # rather than wait for the retry's backoff
    wait_for(lambda: not failing(lab), 15, "every check passing with IMDS back: %s" % failing(lab))


def test_uninstall_leaves_the_machine_as_before_the_install(booted):
    machine, lab, before, files_before = booted
    machine.sh("cd %s && sh install.sh --uninstall" % SRC)
    same_state(machine, lab, before)
    files_after = file_list(machine)
    assert files_after - files_before == set()
    assert files_before - files_after == set()
    leftovers = machine.sh("find /run -name '*multi-eni-routing*' -not -path '/run/systemd/*'").stdout
    assert leftovers == ""
    assert machine.sh("systemctl cat %s" % UNIT, check=False).returncode != 0
