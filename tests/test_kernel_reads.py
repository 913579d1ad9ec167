"""Discovery reads links, addresses, rules and routes through rtnetlink in
its own process (read_kernel), no longer by running `ip -j`. On one lab
instance, with objects of many shapes besides the tool's, both reads must
give the same System and the same plan, before the tool's apply and after.
Needs root; builds namespaces named mer-<id>-*.
"""

import errno
import json
import os
import subprocess
import sys

import pytest

import fresh_root
from lab import inside_netns
from recorded import mer

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="builds network namespaces, veths and iptables rules: run as root")

# Someone else's objects of every shape the kernel here can make (only veths
# and bridges as links: the lab's docker0 with a port, the admin's vpn0).
FOREIGN = [
    "rule add priority 100 fwmark 0x10/0xff table 100",
    "rule add priority 101 fwmark 0x20 table 101",
    "rule add priority 102 fwmark 0/0xff table 102",
    "rule add priority 103 iif vpn0 table 103",
    "rule add priority 104 oif vpn0 table 104",
    "rule add priority 105 from 198.18.40.0/24 to 198.18.41.0/24 table 105 proto static",
    "rule add priority 106 not from 198.18.42.7 table 106",
    "rule add priority 107 goto 110",
    "rule add priority 108 nop",
    "rule add priority 109 prohibit",
    "rule add priority 110 lookup main suppress_prefixlength 0",
    "rule add priority 111 lookup main suppress_ifgroup 5",
    "rule add priority 112 tos 0x10 table 112",
    "rule add priority 113 uidrange 1000-2000 table 113",
    "rule add priority 114 ipproto tcp dport 80 table 114",
    "rule add priority 115 from 198.18.43.9 table 4000000",
    "rule add priority 10001 from 198.51.100.77 table 10001",  # net-utils' shape
    "route add blackhole 198.18.44.0/24",
    "route add unreachable 198.18.45.0/24",
    "route add 198.18.46.0/24 nexthop via 198.51.100.1 dev eth0 nexthop via 203.0.113.1 dev eth1",
    "route add 198.18.47.0/24 via 198.51.100.1 dev eth0 onlink proto static metric 50",
    "route add 198.18.48.1 dev eth0",
    "route add 198.18.49.0/24 via inet6 fe80::1 dev eth1",
    "route add 198.18.50.0/24 via 198.51.100.1 dev eth0 table 22060 proto 231",
    "route add 198.18.51.0/24 via 198.51.100.1 dev eth0 table 5000 proto 231",
    "route add 198.18.52.0/24 via 198.51.100.1 dev eth0 table 22061",
    "address add 198.18.53.1 peer 198.18.53.2/32 dev vpn0",
    "address add 198.18.54.1/24 dev vpn0 scope link",
    "link set vpn0 group 5",
    "-6 rule add priority 100 from 2001:db8:40::/48 table 100",
    "-6 rule add priority 101 fwmark 0x3 iif eth1 table 101",
    "-6 rule add priority 102 to 2001:db8:41::1 table 22001 proto 231",
    "-6 route add 2001:db8:42::/48 via fe80::1 dev eth0",
    "-6 route add blackhole 2001:db8:43::/48",
    "-6 route add 2001:db8:44::1 dev eth1",
    "-6 route add 2001:db8:45::/48 nexthop via fe80::1 dev eth0 nexthop via fe80::1 dev eth1",
    "-6 route add 2001:db8:46::/48 via fe80::1 dev eth1 table 22062 proto 231",
    "-6 address add 2001:db8:a::99/64 dev eth0 nodad preferred_lft 0",
]


def both_reads(lab):
    """(what read_kernel reads, what `ip -j` prints) in the instance, by name."""
    with inside_netns(lab.instance):
        kernel = mer.read_kernel([name for name, _ in mer.KERNEL_READS])
    printed = {name: json.loads(lab.run(lab.instance, *argv).stdout) for name, argv in mer.KERNEL_READS}
    mangle = {name: lab.run(lab.instance, *argv).stdout for name, argv in mer.PROGRAM_READS}
    return dict(kernel, **mangle), dict(printed, **mangle)


def plan_of(system, interfaces):
    """The ENIs, the desired state and the changes (sysctls as unknown) for
    an apply told the interfaces, as converge() plans them."""
    options = mer.parse_args(["--no-imds"] + ["-i=" + name for name in interfaces])
    owned = mer.owned_state(system, mer.EMPTY_RECORD)
    enis, desired = mer.desired_state(options, system, owned, mer.EMPTY_RECORD, None, mer.find_netutils(system))
    return enis, desired, mer.render(mer.diff(desired, owned, {}, {}))


def assert_same_reads(lab):
    """Both reads parse to one System and plan the same changes; the System."""
    kernel, printed = both_reads(lab)
    systems = [mer.parse_system(outputs, {}) for outputs in (kernel, printed)]
    assert systems[0] == systems[1]
    for name in ("addr", "link"):  # each read alone too (parse_system merges these two)
        assert mer.parse_links(kernel[name]) == mer.parse_links(printed[name])
    assert plan_of(systems[0], ["eth0", "eth1"]) == plan_of(systems[1], ["eth0", "eth1"])
    return systems[0]


@pytest.mark.root
def test_the_kernel_read_through_netlink_is_what_ip_j_prints(make_lab):
    lab = make_lab(container=True, admin_link=True)
    # The comparison can fail: a read made before one more rule differs.
    kernel, _ = both_reads(lab)
    lab.ip(lab.instance, "rule add priority 99 from 198.18.55.5 table 99")
    _, printed = both_reads(lab)
    assert mer.parse_system(kernel, {}) != mer.parse_system(printed, {})

    lab.ip(lab.instance, *FOREIGN)
    system = assert_same_reads(lab)
    links = {link.name: link for link in system.links}
    assert links["veth0c"].master == "docker0" and links["vpn0"].group == 5 and links["eth0"].up
    assert ("198.18.53.1", 32) in links["vpn0"].addresses[4] and ("2001:db8:a::99", 64) in links["eth0"].addresses[6]
    assert {r.priority for r in system.foreign_rules} >= {100, 102, 107, 115, 10001}
    assert mer.Route(4, 22060, "198.18.50.0/24", "198.51.100.1", "eth0") in system.routes
    assert mer.MainRoute(4, "198.18.47.0/24", "198.51.100.1", "eth0") in system.main_routes

    applied = lab.run_tool("-i", "eth0", "-i", "eth1", "--no-imds")
    assert applied.rc == 0, applied.stderr
    system = assert_same_reads(lab)
    assert len(system.rules) > 4 and system.mangle[4].chains and {link.group for link in system.links} >= {231}
    assert plan_of(system, ["eth0", "eth1"])[2] == []  # in sync, read either way


@pytest.fixture
def empty_netns():
    """A namespace as `ip netns add` makes it: lo down, no address, no route,
    so no main table yet (a chroot's scratch namespace, an instance's
    container before its network is up). Deleted afterwards."""
    with fresh_root.scratch_netns() as name:
        yield name


def test_a_namespace_without_any_route_reads_as_ip_j_prints_it(empty_netns, tmp_path):
    """Before: the kernel, asked for the routes of a table that does not exist
    yet (strict checking), answers ENOENT, and every run there failed with
    "reading the kernel's ... (netlink) failed": install.sh --uninstall in a
    fresh chroot's scratch namespace could not flush."""
    with inside_netns(empty_netns):
        kernel = mer.read_kernel([name for name, _ in mer.KERNEL_READS])
    printed = {name: json.loads(subprocess.run(["ip", "netns", "exec", empty_netns] + list(argv),
                                               capture_output=True, text=True, check=True).stdout or "[]")
               for name, argv in mer.KERNEL_READS}
    assert printed["route4"] == [] and printed["rule4"] != []
    no_mangle = {name: "" for name, _ in mer.PROGRAM_READS}
    assert mer.parse_system(dict(kernel, **no_mangle), {}) == mer.parse_system(dict(printed, **no_mangle), {})
    flush = subprocess.run(["ip", "netns", "exec", empty_netns, sys.executable, mer.__file__, "-f",
                            "--state-dir", str(tmp_path)], capture_output=True, text=True)
    assert flush.returncode == 0, flush.stderr


@pytest.mark.parametrize("error, outcome", [
    (errno.ENOENT, []),  # the table does not exist yet: no routes
    (errno.EPERM, "reading the kernel's links, addresses, rules and routes (netlink) failed: "
                  "Operation not permitted"),
])
def test_a_route_dump_refused_by_the_kernel(monkeypatch, error, outcome):
    """Only "no such table" reads as no routes; any other refusal is the one
    error type, one line for the user (read-only: the reads only ask)."""
    dump = mer.netlink_dump

    def refusing(sock, request, body):
        if request == mer.RTM_GETROUTE:
            raise OSError(error, os.strerror(error))
        return dump(sock, request, body)
    monkeypatch.setattr(mer, "netlink_dump", refusing)
    if isinstance(outcome, list):
        assert mer.read_kernel(["route4"]) == {"route4": outcome}
    else:
        with pytest.raises(mer.ToolError) as raised:
            mer.read_kernel(["route4"])
        assert str(raised.value) == outcome
