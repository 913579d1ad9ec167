"""Lab scenarios for the data path (issue 16) and other software's marks (issue 18, item 9).

Each test first puts the mangle layout and fwmark rules the tool used before
issue 16 in place (`install_old_layout`: what the previous version left) and
shows the defect there, then runs the tool, which must replace that layout
(the upgrade converges) and fix it. Rule counters come from `iptables-save -c`,
the same counters `iptables -t mangle -L -v -x` shows: they tell which rules a
burst of packets walked, without any timing.
Needs root; builds namespaces named mer-<id>-*.
"""

import os
import re
import socket
import threading

import pytest

from lab import CLIENT4, CLIENT6, ECHO_PORT, IMDS4, IMDS6, applied, eventually, netns_socket

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="builds network namespaces, veths and iptables rules: run as root")

SO_MARK = getattr(socket, "SO_MARK", 36)
CHAIN = "MULTI-ENI-PREROUTING"
OLD_MASK = 0x3F00
WG_MARK, REWRITTEN = 0xCA6C, 0xC26C  # wg-quick's fwmark 51820; what the old restore made of it on eth1
WG_TABLE = 51820
BURST = 40


def tables(family, save=False):
    return ("ip6tables" if family == 6 else "iptables") + ("-save" if save else "")


def counters(lab, family):
    """{"CHAIN spec": packets} of every rule in mangle, from `iptables-save -c`."""
    text = lab.run(lab.instance, tables(family, save=True), "-c", "-t", "mangle").stdout
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^\[(\d+):\d+\] -A (.*)$", text, re.M)}


def install_old_layout(lab, family):
    """Replace the tool's mangle rules and fwmark rules by those of the version
    before issue 16 (tests/fixtures/applied-v2): every packet jumps into both
    chains, the per-ENI rules come first, the restore rewrites the mask's bits
    of any packet mark, and the fwmark rules match the mask only."""
    mask = "%#x" % OLD_MASK
    text = lab.run(lab.instance, tables(family, save=True), "-t", "mangle").stdout
    ours = [line[3:] for line in text.splitlines()
            if line.startswith(("-A PREROUTING ", "-A OUTPUT ")) and "--comment multi-eni-routing " in line]
    restore = ("-m conntrack --ctdir REPLY -m connmark ! --mark 0x0/{m} -j CONNMARK --restore-mark "
               "--nfmask {m} --ctmask {m}".format(m=mask))
    marking = ["-A %s -i %s -m conntrack --ctdir ORIGINAL -m connmark --mark 0x0/%s -j CONNMARK --set-xmark %#x/%s"
               % (CHAIN, eni.name, mask, (slot + 1) << 8, mask) for slot, eni in enumerate(lab.enis)]
    lines = (["*mangle"] + ["-D " + rule for rule in ours]
             + ["-F " + CHAIN, ("-F " if ":MULTI-ENI-OUTPUT " in text else "-N ") + "MULTI-ENI-OUTPUT"] + marking
             + ["-A %s %s" % (CHAIN, restore), "-A MULTI-ENI-OUTPUT " + restore,
                "-I PREROUTING 1 -m comment --comment multi-eni-routing -j " + CHAIN,
                "-I OUTPUT 1 -m comment --comment multi-eni-routing -j MULTI-ENI-OUTPUT", "COMMIT", ""])
    lab.iptables_restore(lab.instance, "\n".join(lines), v6=(family == 6), flush=False)
    rules = lab.run(lab.instance, "ip", "-%d" % family, "rule", "show").stdout
    found = re.findall(r"^(\d+):\s+from all fwmark (0x[0-9a-f]+)(/0x[0-9a-f]+)? lookup (\d+) proto 231", rules, re.M)
    assert len(found) == len(lab.enis), rules
    commands = []
    for priority, mark, masked, table in found:
        if masked:
            continue  # already as before
        commands += ["-%d rule del priority %s fwmark %s table %s protocol 231" % (family, priority, mark, table),
                     "-%d rule add priority %s fwmark %s/%s table %s protocol 231"
                     % (family, priority, mark, mask, table)]
    if commands:
        lab.ip(lab.instance, *[c[3:] if family == 4 else c for c in commands])
    assert "MULTI-ENI-OUTPUT" in lab.run(lab.instance, tables(family, save=True), "-t", "mangle").stdout


def entering_chain(counts):
    """Packets that entered the per-ENI marking chain: what the jumps to it counted."""
    return sum(n for rule, n in counts.items() if rule.endswith("-j " + CHAIN) and not rule.startswith(CHAIN))


def per_eni_rules(counts):
    """{interface: packets} of the per-ENI marking rules."""
    found = {}
    for rule, n in counts.items():
        match = re.match(r"%s -i (\S+) " % CHAIN, rule)
        if match:
            found[match.group(1)] = n
    return found


def hook_rules(counts, hook):
    return [rule for rule in counts if rule.startswith(hook + " ") and "multi-eni-routing" in rule]


def burst(session, count=BURST):
    assert all(session.exchange("burst %d" % n) for n in range(count))


# -- issue 16: the per-ENI rules see only a connection's first packets ----------------

@pytest.mark.parametrize("family", [4, 6], ids=["IPv4", "IPv6"])
def test_an_established_connection_never_reaches_the_per_eni_rules(make_lab, family):
    lab = make_lab(enis=3, addresses=1)
    eth0, eth1, eth2 = lab.enis
    address = (lambda eni: eni.addresses4[0]) if family == 4 else (lambda eni: eni.addresses6[0])
    client = CLIENT4 if family == 4 else CLIENT6

    # the layout before issue 16: every packet of an established connection walks the chain
    applied(lab)
    install_old_layout(lab, family)
    session = lab.session(lab.client, address(eth1))
    before = counters(lab, family)
    burst(session)
    after = counters(lab, family)
    assert entering_chain(after) - entering_chain(before) >= BURST, "the old layout should show it"
    session.close()

    # the tool replaces that layout (the upgrade converges) ...
    applied(lab)
    assert "in sync" in applied(lab).stdout
    assert set(per_eni_rules(counters(lab, family))) == {"eth0", "eth1", "eth2"}

    # ... a new connection increments exactly its ENI's rule, once ...
    for eni in (eth1, eth2, eth0):
        before = counters(lab, family)
        session = lab.session(lab.client, address(eni))
        assert session.greeting == address(eni)
        after = counters(lab, family)
        grown = {name: after_n - per_eni_rules(before)[name] for name, after_n in per_eni_rules(after).items()}
        assert grown == {e.name: int(e is eni) for e in lab.enis}, grown
        assert entering_chain(after) - entering_chain(before) == 1

        # ... and a burst of its packets (both ways) enters no chain of the tool's at all:
        # each packet met the two rules of PREROUTING or the one of OUTPUT, nothing more
        burst(session)
        final = counters(lab, family)
        assert entering_chain(final) == entering_chain(after), "a known connection entered the per-ENI chain"
        assert {r: n for r, n in final.items() if r.startswith(CHAIN)} == \
            {r: n for r, n in after.items() if r.startswith(CHAIN)}
        replies = sum(final[r] - after[r] for r in hook_rules(final, "OUTPUT"))
        assert replies >= BURST, "the replies were not given their ENI's mark"
        session.close()

    # a connection this host started (no mark of the tool's): its replies enter no chain either
    outbound = lab.session(lab.instance, client)
    before = counters(lab, family)
    burst(outbound)
    after = counters(lab, family)
    assert entering_chain(after) == entering_chain(before)
    assert all(after[r] == before[r] for r in hook_rules(after, "PREROUTING") + hook_rules(after, "OUTPUT"))
    # what the tool has in the hooks: two rules in PREROUTING, one in OUTPUT, the old chain gone
    assert len(hook_rules(after, "PREROUTING")) == 2 and len(hook_rules(after, "OUTPUT")) == 1
    assert "MULTI-ENI-OUTPUT" not in "".join(after)


# -- issue 18, item 9: a mark of someone else's is never changed --------------------------

class MarkedUdpEcho:
    """Echoes datagrams to ADDRESS:PORT from a socket bound there and marked MARK,
    as wg-quick marks its own."""

    def __init__(self, ns, address, port, mark):
        family = 6 if ":" in address else 4
        self.sock = netns_socket(ns, socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.sock.bind((address, port))
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
                if peer is None:  # shut down
                    return
                self.sock.sendto(data, peer)
            except OSError:
                return

    def close(self):
        with_suppressed(self.sock.shutdown, socket.SHUT_RDWR)
        self.sock.close()


def with_suppressed(call, *args):
    try:
        call(*args)
    except OSError:
        pass


def udp_answer(lab, address, port, timeout=1.0):
    """Whether a datagram from the client to ADDRESS:PORT is echoed (a new connection each time)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns_socket(lab.client, family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"hello", (address, port))
        try:
            return sock.recv(2048) == b"hello"
        except OSError:
            return False


def add_wg_quick_rules(lab, family):
    """What `wg-quick up` adds for a full tunnel: a table with the default route
    into the tunnel (a veth whose peer has no address here: what enters it is gone), `not fwmark
    0xca6c` into it, main's non-default routes first; and IMDS kept out of the
    tunnel, as on EC2 one must."""
    f = "-6 " if family == 6 else ""
    lab.ip(lab.instance, "link add wg0 type veth peer name wg0-peer", "link set wg0 up", "link set wg0-peer up")
    lab.ip(lab.instance, f + "route add default dev wg0 table %d" % WG_TABLE,
           f + "rule add priority 19997 to %s lookup main" % (IMDS6 if family == 6 else IMDS4),
           f + "rule add priority 19998 lookup main suppress_prefixlength 0",
           f + "rule add priority 19999 not fwmark %#x lookup %d" % (WG_MARK, WG_TABLE))


def reply_marks(lab, family, port):
    """Packets of the echo's replies in mangle POSTROUTING: {mark: n} anywhere, "eth1": n marked 0xca6c out of eth1."""
    counts = counters(lab, family)
    found = {}
    for mark in (WG_MARK, REWRITTEN):
        rule = "POSTROUTING -p udp -m udp --sport %d -m mark --mark %#x" % (port, mark)
        found[mark] = counts.get(rule)
    out = "POSTROUTING -o eth1 -p udp -m udp --sport %d -m mark --mark %#x" % (port, WG_MARK)
    found["eth1"] = counts.get(out)
    return found


@pytest.mark.parametrize("family", [4, 6], ids=["IPv4", "IPv6"])
def test_a_wg_quick_marked_socket_answers_a_connection_from_a_secondary_eni_with_its_mark(make_lab, family):
    lab = make_lab(enis=2)
    eth1 = lab.enis[1]
    address = eth1.addresses4[0] if family == 4 else eth1.addresses6[0]
    port = ECHO_PORT + 1
    lab.iptables_restore(lab.instance, "\n".join([
        "*mangle",
        "-A POSTROUTING -o eth1 -p udp -m udp --sport %d -m mark --mark %#x" % (port, WG_MARK),
        "-A POSTROUTING -p udp -m udp --sport %d -m mark --mark %#x" % (port, WG_MARK),
        "-A POSTROUTING -p udp -m udp --sport %d -m mark --mark %#x" % (port, REWRITTEN),
        "COMMIT", ""]), v6=(family == 6), flush=False)
    echo = MarkedUdpEcho(lab.instance, address, port, WG_MARK)
    try:
        # without the tool: the reply leaves through eth0 with eth1's address and is dropped
        assert not udp_answer(lab, address, port)
        assert reply_marks(lab, family, port) == {WG_MARK: 1, REWRITTEN: 0, "eth1": 0}

        applied(lab)
        add_wg_quick_rules(lab, family)
        # the layout before issue 16 rewrote the mask's bits of the socket's mark: 0xca6c
        # became 0xc26c, which wg-quick's `not fwmark 0xca6c` sends into the tunnel
        install_old_layout(lab, family)
        assert not udp_answer(lab, address, port)
        assert reply_marks(lab, family, port) == {WG_MARK: 1, REWRITTEN: 1, "eth1": 0}

        # the tool replaces that layout: the reply keeps 0xca6c, leaves eth1 and answers
        applied(lab)
        assert eventually(lambda: udp_answer(lab, address, port), timeout=5), reply_marks(lab, family, port)
        marks = reply_marks(lab, family, port)
        assert marks[REWRITTEN] == 1 and marks[WG_MARK] >= 2 and marks["eth1"] == marks[WG_MARK] - 1, marks
    finally:
        echo.close()


def marked_tcp_answer(lab, bind, address, mark, timeout=1.0):
    """The greeting of the client's LineServer to a socket bound to BIND and marked MARK, or None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns_socket(lab.instance, family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.settimeout(timeout)
        try:
            sock.bind((bind, 0))
            sock.connect((address, ECHO_PORT))
            with sock.makefile("rb") as reader:
                return reader.readline().decode().strip() or None
        except OSError:
            return None


def test_a_foreign_mark_never_selects_an_enis_table(make_lab):
    # with mask 0x300, 0xca6c's bits in the mask are 0x200: eth1's mark
    lab = make_lab(enis=2)
    eth0 = lab.enis[0]
    applied(lab, "--mark-mask", "0x300")
    rules = lab.run(lab.instance, "ip", "-4", "rule", "show").stdout
    assert re.search(r"fwmark 0x200 lookup 22001 proto 231", rules), rules
    source = eth0.addresses4[0]
    assert marked_tcp_answer(lab, source, CLIENT4, WG_MARK) == CLIENT4

    # a masked fwmark rule (as before) sends eth0's traffic marked 0xca6c out of eth1: dropped
    drops = lab.dropped(eth0) + lab.dropped(lab.enis[1])
    lab.ip(lab.instance, "rule del priority 20001 fwmark 0x200 table 22001 protocol 231",
           "rule add priority 20001 fwmark 0x200/0x300 table 22001 protocol 231")
    assert marked_tcp_answer(lab, source, CLIENT4, WG_MARK) is None
    assert lab.dropped(lab.enis[1]) + lab.dropped(eth0) > drops

    applied(lab, "--mark-mask", "0x300")
    assert marked_tcp_answer(lab, source, CLIENT4, WG_MARK) == CLIENT4
