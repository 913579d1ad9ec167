"""Routing edge cases in the lab, one per defect that routing model v2 (issue 7)
mends: rules that grow with ENIs, main routes, DNAT backends, old UDP flows,
foreign socket marks, VPC CNI pods, multi-card numbering, an IPv6 router that
goes, a `#` in a name, a replaced interface, a NAT instance.

Each test first shows the failure without the fix (without the tool, or the
measure by which the old tool failed), then asserts the fixed behaviour.
Against the old model (before the merge of v2) every test here but the NAT
instance's failed at its assertion on the fixed behaviour.
Needs root; builds namespaces named mer-<id>-*.
"""

import os
import re
import socket
import threading

import pytest

from lab import (BOTH, CLIENT4, CONTAINER4, DNAT_PORT, ECHO_PORT, NEITHER, VPN_HOST, applied, eventually,
                 netns_socket, snapshot_diff, tcp_answer, tool_lines)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="builds network namespaces, veths and iptables rules: run as root")

SO_MARK = getattr(socket, "SO_MARK", 36)


def tool_rules(lab, family):
    """The tool's `ip rule` lines of one address family."""
    text = lab.run(lab.instance, "ip", "-%d" % family, "rule", "show").stdout
    return [line for line in text.splitlines() if "proto 231" in line]


def sysctl_value(lab, key):
    return lab.run(lab.instance, "sysctl", "-n", key).stdout.strip()


# -- 1. rules scale with ENIs, not addresses ----------------------------------------

def test_rules_scale_with_enis_and_a_new_address_answers_at_once(make_lab):
    lab = make_lab(enis=3, addresses=20, subnets="distinct")
    eth1 = lab.enis[1]
    assert len({eni.subnet4 for eni in lab.enis}) == 3
    before = lab.reachability(lab.addresses(eth1))
    assert set(before.values()) == {NEITHER}  # replies leave through eth0's default

    applied(lab)
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}
    for family in (4, 6):
        rules = tool_rules(lab, family)
        assert len(rules) <= 4 * len(lab.enis) + 4, "IPv%d: %d rules, e.g.:\n%s" % (
            family, len(rules), "\n".join(rules[:8]))

    # the admin adds an address while applied: it answers before the tool runs again
    new4, new6 = "203.0.113.99", "2001:db8:b::99"
    lab.add_address(eth1, new4)
    lab.add_address(eth1, new6)
    assert lab.reachability([new4, new6]) == {new4: BOTH, new6: BOTH}


# -- 2. a main route through another ENI does not take an ENI's traffic -------------

RESOLVER = "198.18.53.53"  # outside every ENI subnet, like a VPC resolver networkd routes to


def test_main_host_route_via_eth0_does_not_take_eth1s_traffic(make_lab):
    lab = make_lab(enis=2, admin_link=True)
    eth0, eth1 = lab.enis
    lab.add_internet_host(RESOLVER)
    # systemd-networkd's RoutesToDNS: a /32 to the resolver via eth0's gateway
    lab.ip(lab.instance, "route add %s via %s dev eth0 proto dhcp src %s metric 100"
           % (RESOLVER, eth0.gateway4, eth0.addresses4[0]))
    source = eth1.addresses4[0]
    assert lab.tcp_ok(lab.instance, RESOLVER, bind=eth0.addresses4[0])
    drops = lab.dropped(eth0)
    assert not lab.tcp_ok(lab.instance, RESOLVER, bind=source, timeout=1)
    assert lab.dropped(eth0) > drops  # left through eth0 with eth1's address

    applied(lab)
    assert lab.tcp_ok(lab.instance, RESOLVER, bind=eth0.addresses4[0])
    drops = lab.dropped(eth0)
    assert lab.tcp_ok(lab.instance, RESOLVER, bind=source), "eth1's socket does not reach the resolver"
    assert lab.dropped(eth0) == drops
    # a route in main through a device that is not an ENI still wins
    route = lab.run(lab.instance, "ip", "route", "get", VPN_HOST, "from", source).stdout
    assert " dev vpn0 " in route, route
    assert lab.tcp_ok(lab.instance, VPN_HOST, bind=source)


# -- 3. DNAT to a backend behind another ENI -------------------------------------------

BACKEND = "198.51.100.50"  # in eth0's subnet, reached through eth0
FORWARDED_PORT = 9000


def test_dnat_to_a_backend_behind_eth0_replies_through_eth1(make_lab):
    lab = make_lab(enis=2)
    eth0, eth1 = lab.enis
    lab.add_vpc_host("backend", BACKEND, eth0)
    entry = eth1.addresses4[0]
    lab.sysctl(lab.instance, **{"net.ipv4.ip_forward": 1})
    lab.iptables_restore(lab.instance, "\n".join([
        "*nat",
        "-A PREROUTING -d %s/32 -p tcp --dport %d -j DNAT --to-destination %s:5000"
        % (entry, FORWARDED_PORT, BACKEND),
        "-A POSTROUTING -d %s/32 -o eth0 -p tcp --dport 5000 -j MASQUERADE" % BACKEND,
        "COMMIT", ""]), flush=False)
    assert lab.tcp_ok(lab.instance, BACKEND)
    drops = lab.dropped(eth0)
    assert tcp_answer(lab.client, entry, FORWARDED_PORT, timeout=1) is None
    assert lab.dropped(eth0) > drops  # the backend's reply left eth0 with eth1's address

    applied(lab)
    drops = lab.dropped(eth0)
    assert tcp_answer(lab.client, entry, FORWARDED_PORT) == BACKEND
    assert lab.dropped(eth0) == drops


# -- 4. a flow tracked before the first apply ------------------------------------------

class UdpEcho:
    """Echoes every datagram on PORT in namespace NS."""

    def __init__(self, ns, port):
        self.sock = netns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
                self.sock.sendto(data, peer)
            except OSError:
                return

    def close(self):
        self.sock.close()


class UdpClient:
    """Sends a datagram every INTERVAL on one 5-tuple and counts the echoes."""

    def __init__(self, ns, address, port, interval=0.05):
        self.sock = netns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(0.2)
        self.sock.connect((address, port))
        self.sent, self.replies, self.stopped = 0, 0, threading.Event()
        self.interval = interval
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._receive, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _send(self):
        while not self.stopped.wait(self.interval):
            try:
                self.sock.send(b"ping")
                self.sent += 1
            except OSError:
                pass  # an ICMP error reported on the socket; keep going

    def _receive(self):
        while not self.stopped.is_set():
            try:
                if self.sock.recv(2048) == b"ping":
                    self.replies += 1
            except OSError:
                pass

    def close(self):
        self.stopped.set()
        for thread in self.threads:  # the receiver wakes within its 0.2 s timeout
            thread.join(timeout=2)
        self.sock.close()


@pytest.mark.parametrize("rp_filter", [0, 2], ids=["rp_filter=0", "rp_filter=2"])
def test_udp_flow_tracked_before_the_first_apply_gets_its_replies(make_lab, rp_filter):
    lab = make_lab(enis=2, container=True, rp_filter=rp_filter)
    published = lab.dnat_address  # eth1's secondary
    lab.iptables_restore(lab.instance, "\n".join([
        "*nat",
        "-A DOCKER -d %s/32 ! -i docker0 -p udp -m udp --dport %d -j DNAT --to-destination %s:80"
        % (published, DNAT_PORT, CONTAINER4),
        "COMMIT",
        "*filter",
        "-A DOCKER -d %s/32 ! -i docker0 -o docker0 -p udp -m udp --dport 80 -j ACCEPT" % CONTAINER4,
        "COMMIT", ""]), flush=False)
    echo = UdpEcho(lab.container, 80)
    client = UdpClient(lab.client, published, DNAT_PORT)
    try:
        # tens of datagrams sent, and the round trips of the first ones long over
        assert eventually(lambda: client.sent >= 30), "the client does not send"
        assert client.replies == 0
        tracked = lab.run(lab.instance, "conntrack", "-L", "-p", "udp", "--orig-dst", published,
                          check=False).stdout
        assert CONTAINER4 in tracked, "the flow is not tracked before the apply: %r" % tracked

        applied(lab)
        assert eventually(lambda: client.replies > 0, timeout=10), "no reply after apply"
    finally:
        client.close()
        echo.close()


# -- 5. other software's socket marks ------------------------------------------------------

def mark_counts(lab):
    """Packets counted in mangle POSTROUTING by mark: {0xca6c: n, 0xc06c: n}."""
    text = lab.run(lab.instance, "iptables", "-t", "mangle", "-nvxL", "POSTROUTING").stdout
    counts = {}
    for mark in (0xca6c, 0xc06c):
        match = re.search(r"^\s*(\d+)\s+\d+\s+RETURN.*mark match %#x\b" % mark, text, re.M)
        counts[mark] = int(match.group(1)) if match else None
    return counts


def send_marked(lab, mark, count=5):
    with netns_socket(lab.instance, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        for _ in range(count):
            sock.sendto(b"marked", (CLIENT4, 9999))


def test_a_foreign_socket_mark_is_not_rewritten(make_lab):
    lab = make_lab(enis=2)
    lab.iptables_restore(lab.instance, "\n".join([
        "*mangle",
        "-A POSTROUTING -p udp --dport 9999 -m mark --mark 0xca6c -j RETURN",
        "-A POSTROUTING -p udp --dport 9999 -m mark --mark 0xc06c -j RETURN",
        "COMMIT", ""]), flush=False)
    send_marked(lab, 0xca6c)
    assert mark_counts(lab) == {0xca6c: 5, 0xc06c: 0}  # the rules count what they should

    applied(lab)
    send_marked(lab, 0xca6c)
    assert mark_counts(lab) == {0xca6c: 10, 0xc06c: 0}, "wg-quick's mark was rewritten"


# -- 6. a VPC CNI pod's address is not taken by the host ------------------------------------

POD = "203.0.113.20"
POD_PORT = 5050  # only the pod listens here: the host's answer would be a refusal


def test_vpc_cni_pod_address_is_not_added_and_the_pod_keeps_answering(make_lab):
    lab = make_lab(enis=2)
    eth1 = lab.enis[1]
    lab.add_address(eth1, POD, on_instance=False)  # IMDS lists it as eth1's secondary
    pod = lab.add_pod(POD)
    lab.serve(pod, POD_PORT)
    # the CNI's rules (secondary-IP mode): to the pod via main, from it via table 2
    lab.ip(lab.instance, "rule add pref 512 to %s lookup main" % POD,
           "rule add pref 1536 from %s lookup 2" % POD,
           "route add %s dev eth1 scope link table 2" % eth1.gateway4,
           "route add default via %s dev eth1 table 2" % eth1.gateway4)
    assert tcp_answer(lab.client, POD, POD_PORT) == POD

    applied(lab)
    addresses = lab.run(lab.instance, "ip", "-o", "addr", "show", "dev", "eth1").stdout
    assert POD not in addresses, "the tool added the pod's address to eth1"
    assert tcp_answer(lab.client, POD, POD_PORT) == POD
    status = lab.run_tool("--status")
    assert POD in status.stdout + status.stderr, status


# -- 7. multi-card instances --------------------------------------------------------------

CARDS = [(0, 0), (0, 1), (4, 0), (10, 0), (31, 0)]


def test_multi_card_instance_applies_answers_and_flushes_clean(make_lab):
    lab = make_lab(enis=5, addresses=1, subnets="distinct", cards=CARDS)
    before = lab.snapshot()
    reach = lab.reachability(lab.addresses())
    assert {a: reach[a] for a in lab.addresses(*lab.enis[1:])} == \
        {a: NEITHER for a in lab.addresses(*lab.enis[1:])}

    applied(lab)
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}
    applied(lab, "--flush")
    after = lab.snapshot()
    assert tool_lines(after) == []
    diff = snapshot_diff(before, after)
    assert not diff, "flush left:\n" + diff


# -- 8. an IPv6 default goes when its router goes -------------------------------------

def test_ipv6_default_leaves_the_eni_table_when_the_router_goes(make_lab):
    lab = make_lab(enis=2)
    applied(lab)
    table = lab.run(lab.instance, "ip", "-6", "route", "show", "table", "22001").stdout
    assert "default" in table, table
    # the router stops sending RAs: the kernel drops the default it learned
    lab.ip(lab.instance, "-6 route del default dev eth1")

    applied(lab)
    table = lab.run(lab.instance, "ip", "-6", "route", "show", "table", "22001").stdout
    assert "default" not in table, table
    status = lab.run_tool("--status")
    assert status.rc == 0, status


# -- 9. interface names iproute2 or iptables would misread ------------------------------

ODD_NAME = "d#x"


def test_an_eni_named_with_a_hash_is_refused(make_lab):
    lab = make_lab(enis=2)
    eth0 = lab.enis[0]
    lab.run(lab.instance, "ip", "link", "set", "eth1", "down")
    lab.run(lab.instance, "ip", "link", "set", "eth1", "name", ODD_NAME)
    lab.run(lab.instance, "ip", "link", "set", ODD_NAME, "up")
    # why: -batch reads '#' as a comment, so the route lands elsewhere (or nowhere)
    misread = lab.run(lab.instance, "ip", "-batch", "-", check=False,
                      input="route add 198.18.99.0/24 dev %s table 999\n" % ODD_NAME)
    assert misread.returncode != 0 and '"d"' in misread.stderr, misread

    result = applied(lab)
    warnings = [line for line in result.stderr.splitlines() if ODD_NAME in line]
    assert len(warnings) == 1, result.stderr
    assert lab.reachability(eth0.addresses4) == {a: BOTH for a in eth0.addresses4}
    named = lab.run_tool("-i", ODD_NAME)
    assert named.rc == 2 and len(named.stderr.strip().splitlines()) == 1, named
    assert ODD_NAME in named.stderr
    routes = lab.run(lab.instance, "ip", "route", "show", "table", "all").stdout
    routes += lab.run(lab.instance, "ip", "-6", "route", "show", "table", "all").stdout
    assert not [line for line in routes.splitlines()
                if "proto 231" in line and (ODD_NAME in line or re.search(r" dev d( |$)", line))]


# -- 11. the state record of an interface that is gone -------------------------------------

def test_a_reattached_eni_does_not_inherit_the_gone_interfaces_record(make_lab):
    """eth1 goes and comes back as a new interface (new ifindex) whose
    rp_filter is 1; flush must give it back 1, not the gone eth1's 0."""
    lab = make_lab(enis=2)
    eth1 = lab.enis[1]
    assert sysctl_value(lab, "net.ipv4.conf.eth1.rp_filter") == "0"
    applied(lab)
    assert sysctl_value(lab, "net.ipv4.conf.eth1.rp_filter") == "2"
    # one record per namespace, named by the namespace's own inode (not PID 1's)
    inode = os.stat("/run/netns/" + lab.instance).st_ino
    assert "state-netns-%d.json" % inode in os.listdir(lab.state_dir), os.listdir(lab.state_dir)
    old_index = lab.run(lab.instance, "cat", "/sys/class/net/eth1/ifindex").stdout
    lab.detach_eni(eth1)
    lab.attach_eni(eni=eth1)
    lab.sysctl(lab.instance, **{"net.ipv4.conf.eth1.rp_filter": 1})
    assert lab.run(lab.instance, "cat", "/sys/class/net/eth1/ifindex").stdout != old_index

    applied(lab)
    assert sysctl_value(lab, "net.ipv4.conf.eth1.rp_filter") == "2"
    applied(lab, "--flush")
    assert sysctl_value(lab, "net.ipv4.conf.eth1.rp_filter") == "1", \
        "flush wrote the gone eth1's original rp_filter to the new eth1"
    assert tool_lines(lab.snapshot()) == []


# -- 12. a NAT instance's private hosts --------------------------------------------------

PRIVATE_HOST = "203.0.113.60"  # in eth1's subnet; its route table sends 0/0 to eth1


def test_nat_instance_private_host_reaches_the_internet_before_and_after(make_lab):
    lab = make_lab(enis=2)
    eth1 = lab.enis[1]
    lab.disable_source_check(eth1)  # a NAT instance's ENI
    private = lab.add_vpc_host("priv", PRIVATE_HOST, eth1, gateway_eni=eth1)
    lab.sysctl(lab.instance, **{"net.ipv4.ip_forward": 1})
    # without the NAT rule its packets leave eth0 with its own address: dropped
    assert tcp_answer(private, CLIENT4, ECHO_PORT, timeout=1) is None
    lab.iptables_restore(lab.instance, "*nat\n-A POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n",
                         flush=False)
    assert tcp_answer(private, CLIENT4, ECHO_PORT) == CLIENT4

    applied(lab)
    assert tcp_answer(private, CLIENT4, ECHO_PORT) == CLIENT4
    session_ok = lab.session(private, CLIENT4).exchange("through the NAT instance")
    assert session_ok
