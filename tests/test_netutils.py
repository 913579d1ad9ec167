"""amazon-ec2-net-utils underneath (Amazon Linux 2023's default), and the tool's
policy for it (--net-utils coexist, the default).

Pure tests first (no root): how net-utils is recognised, the one rule the tool
adds ahead of its rules, what --status says, and that a flush removes exactly
that rule.

Then a real boot, once per version of net-utils:
  (a) "debian": Debian 12's package `amazon-ec2-net-utils` (2.3.0), from the
      archive, in the cached root (tests/fresh_root.py, flavour netutils-debian);
  (b) "amazon": what Amazon Linux 2023 ships (2.7.x): its source, from
      github.com/amazonlinux/amazon-ec2-net-utils, installed into the root as
      its RPM spec does (`make install DESTDIR=ROOT PREFIX=/usr`, then its %post
      for a new install). The source is never part of this repository: the test
      takes the tarball MER_NETUTILS_SOURCE names, else the one cached in
      fresh_root.CACHE, made (like its `release-sources` target) from a local
      git snapshot at MER_NETUTILS_GIT when there is one; with none of them (CI
      reaches only package registries) (b) is skipped and says so.
Each root boots under systemd-nspawn in a lab namespace (tests/test_boot.py).

Where the lab differs from an instance, on purpose:
- DHCP: busybox udhcpd on each ENI's router port, a static lease per ENI (its
  primary address, the subnet's router), as the VPC's DHCP gives.
- 80-ec2.network matches the drivers ena, ixgbevf and vif; the lab's ENIs are
  veths, so its match is widened to them by name (eth0, eth1), and only to them.
- No udevd runs in nspawn: `systemctl enable --now --no-block
  policy-routes@ethN.service`, the command its udev rule runs, is run by hand.
- (b)'s %post also enables systemd-resolved and points /etc/resolv.conf at it;
  Debian 12's systemd-resolved is a package of its own and the lab has no DNS,
  so that part is left out. Its sysctl file is installed and applied at boot.
- No IPv6 (the lab's router sends no RAs here).

The checks (each a name -> bool): ICMP and TCP from outside to every address,
outbound TCP and ICMP from every address, the DNAT'd container-like service on
a secondary address, and the container-like namespace reaching a host service
on every address. net-utils alone first shows its two failures; after
`install.sh --now` every check passes; stop and uninstall leave net-utils'
state byte-identical (rules, routes of every table, addresses, links, sysctls,
mangle, and its files in /run)."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fresh_root  # noqa: E402
import lab as lablib  # noqa: E402
from recorded import mer  # noqa: E402
from lab import wait_for  # noqa: E402
from test_boot import (NSPAWN_STATE, SRC, SUITE, UNIT, boot_machine, cannot_boot, copy_source,  # noqa: E402
                       lab_nics_dropin)

REPO = Path(__file__).resolve().parent.parent
ENI_NAMES = ("eth0", "eth1")
NETUTILS_VERSION = "2.7.4"  # of the Amazon source the cache is made from (its GNUmakefile says)
SOURCE_TARBALL = "amazon-ec2-net-utils-%s.tar.gz"
LEASE_SECONDS = 86400  # no renewal while a test runs: addresses keep their lifetimes' shape
NETWORKD_FILES = "/usr/lib/systemd/network/80-ec2.network"
NETUTILS_FILES = "find /run/systemd/network /run/amazon-ec2-net-utils /etc/systemd/network -xdev " \
                 "\\( -type f -o -type l \\) 2>/dev/null | sort | while read -r f; do " \
                 "printf '%s ' \"$f\"; if [ -L \"$f\" ]; then readlink \"$f\"; " \
                 "else md5sum <\"$f\" | cut -d' ' -f1; fi; done"


# -- Pure: recognising net-utils, the rule ahead of it, status, flush. ------------

# `ip -j rule` of a booted lab instance with net-utils 2.7.4 (eth1: device 1).
NETUTILS_RULES = [
    {"priority": 0, "src": "all", "table": "local"},
    {"priority": 10001, "src": "203.0.113.10", "table": "10001"},
    {"priority": 10001, "src": "203.0.113.11", "table": "10001"},
    {"priority": 32766, "src": "all", "table": "main"},
    {"priority": 32767, "src": "all", "table": "default"},
]


def system_with(rules):
    return mer.System([], [], [], mer.parse_rules(rules, 4), [], {4: mer.NO_MANGLE, 6: mer.NO_MANGLE}, {}, True)


def test_netutils_is_recognised_by_its_rules_or_its_program(tmp_path):
    absent = str(tmp_path / "setup-policy-routes")
    assert mer.find_netutils(system_with(NETUTILS_RULES), absent) == mer.NetUtils(True, None, 2)
    # an admin's rule at 100, the VPC CNI's at 512 and 1536: not net-utils
    others = [{"priority": 100, "src": "198.51.100.99", "table": "100"},
              {"priority": 1536, "src": "198.51.100.98", "table": "2"},
              {"priority": 10001, "src": "all", "fwmark": "0x1", "table": "10001"}]
    assert mer.find_netutils(system_with(others), absent) == mer.NetUtils(False, None, 0)
    program = tmp_path / "setup-policy-routes"
    program.write_text("#!/bin/sh\n")
    assert mer.find_netutils(system_with(others), str(program)) == mer.NetUtils(True, str(program), 0)


def two_enis():
    family = lambda *addresses: mer.EniFamily(addresses, (), (), None, (), ())
    v4 = {"eth0": mer.EniFamily(("198.51.100.10",), (), (mer.ipaddress.ip_network("198.51.100.0/24"),),
                                "198.51.100.1", (), ()),
          "eth1": mer.EniFamily(("203.0.113.10", "203.0.113.11"), (),
                                (mer.ipaddress.ip_network("203.0.113.0/24"),), "203.0.113.1", (), ())}
    return [mer.Eni(name, i + 2, "02:00:00:00:00:%02x" % (i + 1), i, 0, i, "imds", {4: v4[name], 6: family()})
            for i, name in enumerate(ENI_NAMES)]


def test_coexist_adds_exactly_one_rule_ahead_of_netutils_and_flush_removes_it():
    enis = two_enis()
    alone = mer.plan(enis)
    coexisting = mer.plan(enis, ahead_of_netutils=True)
    ahead = mer.rule(4, mer.PRIO_NETUTILS, mer.TABLE_MAIN, suppress_ifgroup=mer.ENI_GROUP)
    assert coexisting.rules - alone.rules == {ahead}
    assert coexisting._replace(rules=alone.rules) == alone  # nothing else differs
    assert mer.PRIO_NETUTILS < mer.NETUTILS_PRIO_FIRST
    add = mer.diff(coexisting, alone, {}, {})
    assert mer.render(add) == ["ip -4 rule add priority 9900 table main suppress_ifgroup 231 protocol 231"]
    flush = mer.diff(mer.NOTHING, coexisting, {}, {})
    assert mer.rule_command("del", ahead) in flush.commands
    # one ENI: no policy routing, so nothing to put ahead of net-utils either
    assert mer.plan(enis[:1], ahead_of_netutils=True).rules == frozenset()


def test_coexist_puts_the_rule_ahead_in_each_family_the_tool_routes():
    enis = two_enis()
    v6 = mer.EniFamily(("2001:db8:b::10",), (), (mer.ipaddress.ip_network("2001:db8:b::/64"),), "fe80::1", (), ())
    enis[1] = enis[1]._replace(families={4: enis[1].families[4], 6: v6})
    enis[0] = enis[0]._replace(families={4: enis[0].families[4], 6: v6._replace(
        addresses=("2001:db8:a::10",), subnets=(mer.ipaddress.ip_network("2001:db8:a::/64"),))})
    ahead = {r.family for r in mer.plan(enis, ahead_of_netutils=True).rules if r.priority == mer.PRIO_NETUTILS}
    assert ahead == {4, 6}


def test_status_says_netutils_is_present_and_what_the_tool_does():
    found = mer.NetUtils(True, mer.NETUTILS_PROGRAM, 2)
    report = mer.status_report([], mer.NOTHING, mer.NO_CHANGES, found)
    assert report["net_utils"] == {"present": True, "program": mer.NETUTILS_PROGRAM, "rules": 2,
                                   "policy": "coexist", "rule_priority": 9900, "adds_imds_addresses": False}
    line = mer.netutils_line(report["net_utils"])
    assert line.startswith("amazon-ec2-net-utils: present (/usr/bin/setup-policy-routes, 2 rules at 10000-13199)")
    assert "coexist" in line and "9900" in line
    ignoring = mer.netutils_report(found, "ignore")
    assert ignoring["rule_priority"] is None and "ignore" in mer.netutils_line(ignoring)
    assert mer.netutils_line(mer.netutils_report(mer.NetUtils(False, None, 0), "coexist")) \
        == "amazon-ec2-net-utils: not found"


def test_status_text_names_netutils_right_after_the_state_line(capsys):
    found = mer.NetUtils(True, mer.NETUTILS_PROGRAM, 0)
    mer.print_status(mer.status_report([], mer.NOTHING, mer.NO_CHANGES, found))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "multi-eni-routing: not applied"
    assert lines[1].startswith("amazon-ec2-net-utils: present (/usr/bin/setup-policy-routes); --net-utils coexist")


def test_net_utils_option_takes_coexist_or_ignore(tmp_path):
    assert mer.parse_args([]).net_utils == "coexist"
    options = tmp_path / "options"
    options.write_text("--net-utils ignore\n")
    assert mer.parse_args(["--options-file", str(options)]).net_utils == "ignore"
    with pytest.raises(mer.UsageError, match="invalid choice: 'takeover'"):
        mer.parse_args(["--net-utils", "takeover"])


# -- The source of Amazon's version (b). ------------------------------------------

def amazon_source():
    """(tarball, '') of Amazon's net-utils source, or (None, why not)."""
    named = os.environ.get("MER_NETUTILS_SOURCE")
    if named:
        return (named, "") if os.path.isfile(named) else (None, "MER_NETUTILS_SOURCE=%s: no such file" % named)
    cached = fresh_root.CACHE / (SOURCE_TARBALL % NETUTILS_VERSION)
    if cached.is_file():
        return str(cached), ""
    snapshot = os.environ.get("MER_NETUTILS_GIT", "")  # a bare clone or snapshot of its repository
    if not snapshot or not os.path.isdir(snapshot):
        return None, ("Amazon's amazon-ec2-net-utils %s source is not here: neither MER_NETUTILS_SOURCE, nor %s, "
                      "nor a git snapshot at MER_NETUTILS_GIT (CI reaches only package registries)"
                      % (NETUTILS_VERSION, cached))
    version = subprocess.run(["git", "--git-dir", snapshot, "show", "HEAD:GNUmakefile"], capture_output=True,
                             text=True).stdout
    if "version=%s" % NETUTILS_VERSION not in version:
        return None, "the snapshot at %s is not version %s" % (snapshot, NETUTILS_VERSION)
    fresh_root.CACHE.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".partial")
    with open(partial, "wb") as out:  # its own `make release-sources`
        subprocess.run(["git", "--git-dir", snapshot, "archive", "--format", "tar.gz",
                        "--prefix", "amazon-ec2-net-utils-%s/" % NETUTILS_VERSION, "HEAD"],
                       stdout=out, check=True)
    partial.rename(cached)
    return str(cached), ""


def install_amazon_source(root, tarball):
    """As its RPM spec: `make install DESTDIR=%{buildroot} PREFIX=/usr`, then
    %post of a new install ($1 = 1) on a machine not booted yet."""
    work = Path(tempfile.mkdtemp(prefix="mer-netutils-src-"))
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(work)
        source = next(work.iterdir())
        subprocess.run(["make", "-C", str(source), "install", "DESTDIR=" + str(root), "PREFIX=/usr"],
                       check=True, capture_output=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # %post: systemctl enable systemd-networkd.service (resolved: see the docstring)
    subprocess.run(["systemctl", "--root", str(root), "enable", "systemd-networkd.service"],
                   check=True, capture_output=True)
    return NETUTILS_VERSION


def debian_version(root):
    out = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Version}", "amazon-ec2-net-utils"],
                         capture_output=True, text=True)
    return out.stdout.strip()


# -- The lab around it: DHCP from the router, ENIs as net-utils wants them. ------

def start_dhcp(lab, stack):
    """busybox udhcpd on each ENI's router port: the ENI's primary address for
    its MAC, the subnet's router. DHCP's first packets come from 0.0.0.0, which
    the VPC's source check would drop: the router lets them in."""
    busybox = shutil.which("busybox")
    processes = []
    for eni in lab.enis:
        conf = Path(lab.tmpdir, "udhcpd-%s.conf" % eni.name)
        leases = Path(lab.tmpdir, "udhcpd-%s.leases" % eni.name)
        leases.write_text("")
        conf.write_text("\n".join([
            "interface %s" % eni.port, "start %s" % eni.addresses4[0], "end %s" % eni.addresses4[0],
            "max_leases 1", "static_lease %s %s" % (eni.mac, eni.addresses4[0]),
            "option subnet %s" % eni.subnet4.netmask, "option router %s" % eni.gateway4,
            "option lease %d" % LEASE_SECONDS, "lease_file %s" % leases,
            "pidfile %s" % Path(lab.tmpdir, "udhcpd-%s.pid" % eni.name), ""]))
        process = subprocess.Popen(["ip", "netns", "exec", lab.router, busybox, "udhcpd", "-f", str(conf)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(stop_process, process)
        processes.append(process)
    lab.run(lab.router, "iptables", "-t", "raw", "-I", "PREROUTING", "-p", "udp", "--sport", "68",
            "--dport", "67", "-j", "ACCEPT")
    return processes


def stop_process(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prepare(root, lab):
    """The lab's ENIs as an instance has them before DHCP: no IPv4 address, no
    default route; networkd (and net-utils) configure them. Its .network file
    matched to the lab's veth ENIs by name; and a clone to install from."""
    for eni in lab.enis:
        lab.run(lab.instance, "ip", "-4", "addr", "flush", "dev", eni.name)
    lab.run(lab.instance, "ip", "route", "flush", "table", "main", "default", check=False)
    network = root / NETWORKD_FILES.lstrip("/")
    text = network.read_text()
    assert re.search(r"^Driver=ena ixgbevf vif$", text, re.M), text
    network.write_text(re.sub(r"^Driver=.*$", "Name=" + " ".join(ENI_NAMES), text, flags=re.M))
    subprocess.run(["systemctl", "--root", str(root), "enable", "systemd-networkd.service",
                    "systemd-networkd-wait-online.service"], check=True, capture_output=True)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "network-online.target").symlink_to("/lib/systemd/system/network-online.target")
    lab_nics_dropin(root)  # the watcher takes the lab's veth ENIs for NICs
    (root / "usr/sbin/policy-rc.d").unlink()  # a booted machine starts its services
    copy_source(root)


def trigger_netutils(machine):
    """What its udev rule runs for each ENI's "add" (no udevd in nspawn)."""
    rules = machine.sh("cat /usr/lib/udev/rules.d/99-vpc-policy-routes.rules").stdout
    assert "systemctl enable --now --no-block policy-routes@$name.service" in rules, rules
    for name in ENI_NAMES:
        machine.sh("systemctl enable --now --no-block policy-routes@%s.service" % name)


def netutils_done(machine, lab):
    """net-utils has configured eth1: its rules and its secondary address."""
    rules = machine.sh("ip rule").stdout
    addresses = machine.sh("ip -4 -o addr show dev eth1").stdout
    return all("from %s lookup 10001" % a in rules and " %s/" % a in addresses
               for a in lab.enis[1].addresses4)


# -- What must answer, and the state to keep. --------------------------------------

def checks(lab):
    """{check: passed} for everything an instance's addresses must do."""
    addresses = lab.addresses(v6=False)
    results = {}
    for address, reach in lab.reachability(addresses).items():
        results["from outside to %s (ICMP and TCP)" % address] = reach.icmp and reach.tcp
    for (source, _), reach in lab.paths([(a, lablib.CLIENT4) for a in addresses]).items():
        results["outbound from %s (ICMP and TCP)" % source] = reach.icmp and reach.tcp
    calls = [lambda: lab.tcp_ok(lab.client, lab.dnat_address, lablib.DNAT_PORT, timeout=1)]
    calls += [lambda a=a: lab.tcp_ok(lab.container, a, lablib.ECHO_PORT, timeout=1) for a in addresses]
    answers = lablib.in_parallel(calls)
    results["DNAT'd container service on %s:%d" % (lab.dnat_address, lablib.DNAT_PORT)] = answers[0]
    for address, answer in zip(addresses, answers[1:]):
        results["container to a host service on %s" % address] = answer
    return results


def failing(lab):
    return sorted(name for name, passed in checks(lab).items() if not passed)


def state(lab, machine):
    """The instance's routing state and net-utils' files, to compare byte for
    byte: DHCP addresses' remaining lifetimes left out (they count down)."""
    snapshot = lab.snapshot()
    snapshot["addresses"] = re.sub(r"valid_lft \S+ preferred_lft \S+", "", snapshot["addresses"])
    snapshot["net-utils files"] = machine.sh(NETUTILS_FILES).stdout
    return snapshot


def secondary_failures(lab):
    """The two checks net-utils alone fails: replies leave by its From= rules."""
    return sorted(["DNAT'd container service on %s:%d" % (lab.dnat_address, lablib.DNAT_PORT)]
                  + ["container to a host service on %s" % a for a in lab.enis[1].addresses4])


# -- The boot, once per version. ------------------------------------------------------

@pytest.fixture(scope="module", params=["debian", "amazon"])
def booted(request):
    """(machine, lab, version, state before the install)."""
    reason = cannot_boot()
    if reason:
        pytest.skip(reason)
    if not shutil.which("busybox"):
        pytest.skip("busybox is not installed (apt-get install busybox-static): the lab's DHCP server")
    if request.param == "amazon":
        tarball, why = amazon_source()
        if not tarball:
            pytest.skip(why)
        if not shutil.which("make"):
            pytest.skip("make is not installed: its RPM spec installs it with `make install`")
    stack = contextlib.ExitStack()
    with stack:
        if not os.path.exists(NSPAWN_STATE):
            stack.callback(shutil.rmtree, NSPAWN_STATE, ignore_errors=True)
        lab = stack.enter_context(lablib.Lab(enis=2, addresses=2, ipv6=False, container=True))
        flavour = "netutils-debian" if request.param == "debian" else "netutils-source"
        root = stack.enter_context(fresh_root.extracted(SUITE, flavour))
        if request.param == "amazon":
            version = install_amazon_source(root, tarball)
        else:
            version = debian_version(root)
        print("amazon-ec2-net-utils %s (%s)" % (version, request.param))
        start_dhcp(lab, stack)
        prepare(root, lab)
        machine = boot_machine(stack, root, lab)
        wait_for(lambda: machine.sh("systemctl is-active network-online.target", check=False)
                 .stdout.strip() == "active", 60, "network-online.target")
        trigger_netutils(machine)
        wait_for(lambda: netutils_done(machine, lab), 90, "net-utils configuring eth1 (rules, addresses)")
        for name in ENI_NAMES:
            wait_for(lambda: machine.sh("systemctl is-active policy-routes@%s.service" % name,
                                        check=False).stdout.strip() == "active", 60, "policy-routes@" + name)
        wait_for(lambda: not failing(lab) or failing(lab) == secondary_failures(lab), 30,
                 "every address answering (net-utils alone)")
        yield machine, lab, version, state(lab, machine)


@pytest.mark.root
def test_netutils_alone_fails_the_container_checks(booted):
    machine, lab, version, before = booted
    print(machine.sh("ip rule; ip route show table 10001").stdout)
    assert failing(lab) == secondary_failures(lab)
    assert "proto 231" not in "".join(before.values())


@pytest.mark.root
def test_install_now_passes_every_check_and_status_names_netutils(booted):
    machine, lab, version, before = booted
    result = machine.sh("cd %s && sh install.sh --now" % SRC)
    print(result.stdout + result.stderr)
    wait_for(lambda: not failing(lab), 15, "every check passing after install.sh --now: still failing %s"
             % failing(lab))
    rules = machine.sh("ip rule").stdout
    print(rules)
    assert re.search(r"^9900:\s+from all lookup main suppress_ifgroup 231 proto 231", rules, re.M), rules
    status = machine.sh("multi-eni-routing.py --status").stdout
    print(status)
    assert "amazon-ec2-net-utils: present" in status and "coexist" in status
    report = machine.sh("multi-eni-routing.py --status --json").stdout
    assert '"present": true' in report and '"rule_priority": 9900' in report
    # its own configuration untouched: only what carries the tool's markers was added
    now = state(lab, machine)
    assert now["net-utils files"] == before["net-utils files"]
    assert [line for line in now["addresses"].splitlines()] == before["addresses"].splitlines()


@pytest.mark.root
def test_with_net_utils_ignore_the_container_check_fails_again(booted):
    """The rule ahead of net-utils is what fixes the container's replies: without
    it (--net-utils ignore) the tool's own rules come too late for them."""
    machine, lab, version, before = booted
    options = "/etc/default/multi-eni-routing"
    good = machine.sh("cat %s" % options).stdout
    try:
        machine.sh("printf '%%s\\n' '--net-utils ignore' >>%s && systemctl restart %s" % (options, UNIT))
        container = ["container to a host service on %s" % a for a in lab.enis[1].addresses4]
        wait_for(lambda: failing(lab) == container, 15, "only the container checks failing: %s" % failing(lab))
        assert "9900:" not in machine.sh("ip rule").stdout
        assert "--net-utils ignore: nothing done" in machine.sh(
            "multi-eni-routing.py --options-file %s --status" % options).stdout
    finally:
        machine.sh("cat >%s <<'EOF'\n%sEOF" % (options, good))
    machine.sh("systemctl restart %s" % UNIT)
    wait_for(lambda: not failing(lab), 15, "every check passing with coexist again: still failing %s"
             % failing(lab))


@pytest.mark.root
def test_netutils_refresh_and_networkd_reload_keep_every_check_passing(booted):
    machine, lab, version, before = booted
    machine.sh("systemctl start refresh-policy-routes@eth1.service", check=False)
    machine.sh("networkctl reload")
    wait_for(lambda: not failing(lab), 15, "every check passing after a net-utils refresh and a networkd reload")


def journal(machine):
    return machine.sh("journalctl -q -o short-precise -u %s -u systemd-networkd -u 'policy-routes@*' "
                      "-u 'refresh-policy-routes@*' | tail -40" % UNIT, check=False).stdout


@pytest.mark.root
def test_reboot_with_both_starting_on_their_own(booted):
    """At boot the tool and net-utils start in no particular order (the units
    net-utils' udev command enabled start again here; the command is run once
    more, as udev's coldplug would): the tool adds no address of its own that
    net-utils configures too, and its rule ahead of net-utils is back."""
    machine, lab, version, before = booted
    assert machine.poweroff(), "the container did not power off in time"
    for eni in lab.enis:  # as the instance's ENIs come up at boot: DHCP's to configure
        lab.run(lab.instance, "ip", "-4", "addr", "flush", "dev", eni.name)
    machine.boot()
    wait_for(lambda: machine.sh("systemctl is-active %s" % UNIT, check=False).stdout.strip() == "active", 60,
             "the service after the reboot")
    wait_for(lambda: "9900:" in machine.sh("ip rule").stdout, 30, "the rule ahead of net-utils after the reboot")
    trigger_netutils(machine)
    wait_for(lambda: netutils_done(machine, lab), 90, "net-utils configuring eth1 after the reboot")
    wait_for(lambda: not failing(lab), 30, "every check passing after the reboot: still failing %s"
             % failing(lab))
    status = machine.sh("multi-eni-routing.py --status").stdout
    assert "(added from IMDS)" not in status, status
    assert "9900:" in machine.sh("ip rule").stdout


@pytest.mark.root
def test_stop_leaves_netutils_state_byte_identical(booted):
    machine, lab, version, before = booted
    machine.sh("systemctl stop %s" % UNIT)
    difference = lablib.snapshot_diff(before, state(lab, machine))
    assert difference == "", difference + "\n" + journal(machine)
    assert failing(lab) == secondary_failures(lab)  # net-utils alone again
    machine.sh("systemctl start %s" % UNIT)
    wait_for(lambda: not failing(lab), 15, "every check passing after start")


@pytest.mark.root
def test_uninstall_leaves_netutils_state_byte_identical(booted):
    machine, lab, version, before = booted
    machine.sh("cd %s && sh install.sh --uninstall" % SRC)
    difference = lablib.snapshot_diff(before, state(lab, machine))
    assert difference == "", difference + "\n" + journal(machine)
    for name in ENI_NAMES:
        assert machine.sh("systemctl is-active policy-routes@%s.service" % name,
                          check=False).stdout.strip() == "active"
