"""A simulated EC2 VPC built from Linux network namespaces.

    client (internet)                      VPC peer
    198.18.0.10/24                         203.0.113.50
    2001:db8:ff::10/64                          |
          |                                     |
          +------------- router ----------------+   IMDS 169.254.169.254,
                 (the VPC: gateways, proxy ARP,     [fd00:ec2::254] on its lo
                  source/destination check)
                 |            |            |
               eth0         eth1         eth2 ...      <- instance namespace
          198.51.100.10  203.0.113.10  198.51.100.30      (ENIs = veths)
                            .11 (DNAT 8080 -> container 198.19.0.2:80, docker0)

Each ENI is a veth pair: its instance end (eth0, eth1, ... or ens5, ens6, ...)
and its port on the router (vpc-eth0, ...). The router, like the VPC, knows
which ENI owns which address (host routes), answers ARP for whole subnets
(proxy ARP) and drops a packet that arrives on an ENI's port with a source
address that ENI does not own (chain SRC-CHECK-<eni> in its raw table).

Usage:
    with Lab(enis=2, container=True) as lab:
        lab.tcp_ok(lab.client, "203.0.113.10", ECHO_PORT)
        rc, out, err = lab.run_tool("--dry-run")

Everything lives in namespaces named mer-<id>-<role>; nothing touches the
root namespace. Needs root.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import difflib
import http.client
import ipaddress
import itertools
import json
import os
import re
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TESTS_DIR = Path(__file__).resolve().parent
TOOL = TESTS_DIR.parent / "multi_eni_routing.py"
IMDS_EMULATOR = TESTS_DIR / "imds_emulator.py"
# The tool runs under this interpreter; set MER_TOOL_PYTHON to try 3.8 etc.
TOOL_PYTHON = os.environ.get("MER_TOOL_PYTHON", sys.executable)

# --- address plan -----------------------------------------------------------
SUBNET_A = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:a::/64"))
SUBNET_B = (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8:b::/64"))
VPC_CIDRS = ["198.51.100.0/24", "203.0.113.0/24"]
CLIENT4, CLIENT_GW4 = "198.18.0.10", "198.18.0.1"  # "on the internet"
CLIENT6, CLIENT_GW6 = "2001:db8:ff::10", "2001:db8:ff::1"
PEER4 = "203.0.113.50"  # another host in the VPC, in subnet B
RA_ROUTER = "fe80::1"  # default link-local address of every router port
IMDS4, IMDS6 = "169.254.169.254", "fd00:ec2::254"
DOCKER_GW, CONTAINER4 = "198.19.0.1", "198.19.0.2"
VPN_LOCAL, VPN_REMOTE = "198.18.100.1", "198.18.100.2"  # an admin's extra link
VPN_NETWORK, VPN_HOST = "198.18.200.0/24", "198.18.200.1"  # reached through it

ECHO_PORT = 5000  # a LineServer listens here in instance, client, peer, vpn
CONTAINER_PORT = 80
DNAT_PORT = 8080  # published by "docker" on the DNAT address
INSTANCE_ID = "i-0123456789abcdef0"
# The lab's ENIs are veths, a link kind the watcher knows no ENI has: this test
# hook of the tool's has it take links so named for NICs (see may_be_eni).
TEST_NICS = {"MULTI_ENI_ROUTING_TEST_NICS": "eth[0-9]*,ens[0-9]*"}

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    pass


class ToolResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


class Reach(NamedTuple):
    icmp: bool
    tcp: bool


def lab_usable():
    """(True, "") if this process can build labs, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, veths, iptables)"
    name = "mer-%s-probe" % secrets.token_hex(3)
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return False, "`ip netns` is unusable here: %s" % e
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True, ""


# --- ENIs -------------------------------------------------------------------

@dataclass
class Eni:
    """One elastic network interface: its instance end, router port and IMDS data."""
    device_number: int
    name: str  # in the instance: eth1, ens6, ...
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network | None  # None: no IPv6 on this ENI
    addresses4: list = field(default_factory=list)  # first = primary
    addresses6: list = field(default_factory=list)
    prefixes4: list = field(default_factory=list)  # delegated, e.g. a /28
    prefixes6: list = field(default_factory=list)  # delegated, e.g. a /80
    network_card: int = 0
    index: int = -1  # position in the lab; numbers MACs where device numbers repeat (cards)
    source_check: bool = True  # the VPC drops what it sends from addresses it does not own

    @property
    def number(self):
        """Unique in the lab: the device number unless a multi-card plan set index."""
        return self.index if self.index >= 0 else self.device_number

    @property
    def mac(self):
        return "02:00:00:00:00:%02x" % (self.number + 1)

    @property
    def port(self):
        """Its port on the VPC router."""
        return "vpc-" + self.name

    @property
    def port_mac(self):
        return "02:00:00:00:01:%02x" % (self.number + 1)

    @property
    def gateway4(self):
        return str(self.subnet4[1])

    @property
    def interface_id(self):
        return "eni-%017x" % (self.number + 1)

    @property
    def owned(self):
        """Every source address the VPC accepts from this ENI."""
        return [*self.addresses4, *self.prefixes4, *self.addresses6, *self.prefixes6]


def distinct_subnets(index):
    """Subnets of ENI INDEX when no two ENIs share one: eth1 in subnet B, the
    others in /26es of 198.51.100.0/24 (eth0 .0/26, eth2 .64/26, ... eth4
    .192/26) and 2001:db8:a:N::/64."""
    if index == 1:
        return SUBNET_B
    quarter = 0 if index == 0 else index - 1
    if quarter > 3:
        raise LabError("distinct subnets: at most 5 ENIs")
    return (ipaddress.ip_network("198.51.100.%d/26" % (64 * quarter)),
            ipaddress.ip_network("2001:db8:a:%x::/64" % quarter))


BENCHMARK_VPC = "198.18.128.0/17"  # clear of the client, admin link and Docker ranges in 198.18.0.0/15


def benchmark_subnets(index):
    """Subnets of ENI INDEX in the benchmark's plan, which scales to 63 ENIs
    (the default mark mask numbers 63) of up to 245 addresses (.10 on): ENI k
    in 198.18.(128 + k).0/24 and 2001:db8:18:K::/64."""
    if not 0 <= index < 63:
        raise LabError("benchmark subnets: at most 63 ENIs")
    return (ipaddress.ip_network("198.18.%d.0/24" % (128 + index)),
            ipaddress.ip_network("2001:db8:18:%x::/64" % index))


def plan_eni(index, addresses, same_subnet, ipv6, names, distinct=False, subnets=None):
    """ENI INDEX of the address plan.

    eth0 lives in 198.51.100.0/24 (.10, .11, ...), eth1 in 203.0.113.0/24
    (.10, ...) or, with same_subnet, in 198.51.100.0/24 (.20, ...); eth2 and
    later are in 198.51.100.0/24 (.30, .40, ...). IPv6 follows the same hosts.
    distinct (or subnets="distinct"): every ENI in a subnet of its own
    (distinct_subnets), hosts .10 on; subnets="benchmark": benchmark_subnets,
    hosts .10 on.
    """
    in_b = index == 1 and not same_subnet
    subnet4, subnet6 = SUBNET_B if in_b else SUBNET_A
    first_host = 10 if in_b else 10 * (index + 1)
    if distinct or subnets in ("distinct", "benchmark"):
        subnet4, subnet6 = (benchmark_subnets if subnets == "benchmark" else distinct_subnets)(index)
        first_host = 10
    hosts = range(first_host, first_host + addresses)
    name = "eth%d" % index if names == "eth" else "ens%d" % (5 + index)
    return Eni(
        device_number=index, name=name, subnet4=subnet4,
        subnet6=subnet6 if ipv6 else None,
        addresses4=[str(subnet4[h]) for h in hosts],
        addresses6=["%s%d" % (subnet6[0], h) for h in hosts] if ipv6 else [],
    )


# --- running things in namespaces ---------------------------------------------

def _run(argv, input=None, check=True, timeout=30, env=None):
    proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise LabError("%s failed (%d): %s\n%s" % (
            " ".join(argv), proc.returncode, proc.stderr.strip(), input or ""))
    return proc


def _setns(fd):
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "setns: " + os.strerror(errno))


@contextlib.contextmanager
def inside_netns(name):
    """Run the block with this thread in namespace NAME.

    setns() switches only the calling thread, and a socket keeps the namespace
    it was created in, so probes and servers can run in this process.
    """
    with open("/proc/thread-self/ns/net") as home, open("/run/netns/" + name) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def netns_socket(name, family, kind, proto=0):
    """A socket created in namespace NAME."""
    with inside_netns(name):
        return socket.socket(family, kind, proto)


def family_of(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def plain(address):
    """198.51.100.10 for ::ffff:198.51.100.10 (a v4 client of a v6 socket)."""
    return address[7:] if address.startswith("::ffff:") else address


class LineServer:
    """A TCP server on all addresses of a namespace. It greets each connection
    with the local address it was reached at, then echoes every line."""

    def __init__(self, ns, port):
        self.sock = netns_socket(ns, socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::", port))
        self.sock.listen(64)
        self.connections = set()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.sendall(plain(conn.getsockname()[0]).encode() + b"\n")
            for line in conn.makefile("rb"):
                conn.sendall(b"echo " + line)
        except OSError:
            pass
        finally:
            conn.close()
            self.connections.discard(conn)

    def close(self):
        # shutdown() wakes the accept()/recv() of the serving threads
        for s in [self.sock, *list(self.connections)]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Session:
    """A long-lived TCP connection to a LineServer, to check it survives."""

    def __init__(self, ns, address, port, timeout=2):
        self.sock = netns_socket(ns, family_of(address), socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((address, port))
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reader.readline().decode().strip()

    def exchange(self, text):
        """True if the server echoed TEXT."""
        try:
            self.sock.sendall(text.encode() + b"\n")
            return self.reader.readline().decode().strip() == "echo " + text
        except OSError:
            return False

    def close(self):
        self.reader.close()
        self.sock.close()


_icmp_ids = itertools.count(secrets.randbelow(30000) + 1)


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns, address, bind=None, timeout=2.0):
    """True if ADDRESS answers an ICMP(v6) echo sent from namespace NS."""
    v6 = ":" in address
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    ident = next(_icmp_ids) & 0xFFFF
    payload = b"mer-lab-probe"
    header = struct.pack("!BBHHH", request_type, 0, 0, ident, 1)
    if not v6:  # the kernel fills in the ICMPv6 checksum, not the ICMP one
        header = struct.pack("!BBHHH", request_type, 0, _checksum(header + payload), ident, 1)
    deadline = time.monotonic() + timeout
    with netns_socket(ns, family_of(address), socket.SOCK_RAW, proto) as sock:
        if bind:
            sock.bind((bind, 0))
        try:
            sock.sendto(header + payload, (address, 0))
        except OSError:
            return False
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, sender = sock.recvfrom(65535)
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]  # skip the IPv4 header
            kind, _, _, got_id, _ = struct.unpack("!BBHHH", data[:8])
            same_sender = ipaddress.ip_address(sender[0].split("%")[0]) == ipaddress.ip_address(address)
            if kind == reply_type and got_id == ident and same_sender:
                return True
    return False


def tcp_answer(ns, address, port, bind=None, timeout=2.0):
    """The greeting line of the LineServer at ADDRESS:PORT, or None."""
    with netns_socket(ns, family_of(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            if bind:
                sock.bind((bind, 0))
            sock.connect((address, port))
            with sock.makefile("rb") as reader:
                return reader.readline().decode().strip() or None
        except OSError:
            return None


def in_parallel(calls):
    """Run zero-argument CALLS concurrently; their results in order."""
    if not calls:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(calls))) as pool:
        return list(pool.map(lambda call: call(), calls))


# --- the IMDS emulator ----------------------------------------------------------

class Imds:
    """Controls the metadata the emulator serves and how it misbehaves."""

    def __init__(self, lab, mode):
        self.lab = lab
        self.mode = mode  # "v2" | "optional" | "v1" | "refused" | "v6-only" | "absent"
        # the router silently drops packets to a silent endpoint: clients time out
        self.silent4 = mode in ("absent", "v6-only")
        self.silent6 = mode == "absent"
        self.config_path = Path(lab.tmpdir, "imds.json")
        self.log_path = Path(lab.tmpdir, "imds.log")
        self.behaviour = {"tokens": {"v2": "required", "optional": "optional",
                                     "v1": "v1-only", "refused": "refused"}.get(mode, "required")}
        self.overrides = {}  # path below meta-data -> body
        self.process = None

    def tree(self):
        enis = self.lab.enis
        tree = {
            "instance-id": INSTANCE_ID,
            "local-ipv4": enis[0].addresses4[0] if enis else "",
            "mac": enis[0].mac if enis else "",
            "network": {"interfaces": {"macs": {
                eni.mac: eni_metadata(eni, self.lab.multi_card, self.lab.vpc_cidrs) for eni in enis}}},
        }
        for path, body in self.overrides.items():
            *parents, leaf = path.strip("/").split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = body
        return tree

    def write(self):
        """Publish the current tree and behaviour (atomically: the server
        re-reads the file on every request)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta-data": self.tree(), "behaviour": self.behaviour}))
        tmp.replace(self.config_path)

    def misbehave(self, **behaviour):
        """E.g. delay=0.5, throttle_first=3, mac_404_first={mac: 2}, tokens="refused"."""
        self.behaviour.update(behaviour)
        self.write()

    def override(self, path, body):
        """Serve BODY at PATH (below /latest/meta-data/): junk, a wrong-family
        address, {"huge": 10_000_000}, or "" for a 404."""
        self.overrides[path] = body
        self.write()

    def start(self):
        self.write()
        self.log_path.write_text("")
        argv = ["ip", "netns", "exec", self.lab.router, sys.executable, str(IMDS_EMULATOR),
                "--config", str(self.config_path), "--log", str(self.log_path)]
        if self.lab.ipv6:
            argv += ["--ipv6", IMDS6]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if not select.select([self.process.stdout], [], [], 10)[0] \
                or self.process.stdout.readline().strip() != b"ready":
            self.stop()
            raise LabError("the IMDS emulator did not start: %s" % self.process.stderr.read().decode())

    def go_silent(self):
        """From now on neither endpoint answers (packets are dropped)."""
        self.silent4 = self.silent6 = True
        self.lab._apply_source_checks()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.process.stdout.close()
            self.process.stderr.close()

    def requests(self):
        """Every request served so far, as dicts (method, path, status, ...)."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


def eni_metadata(eni, multi_card=False, vpc_cidrs=VPC_CIDRS):
    """The IMDS directory network/interfaces/macs/<mac>/ of ENI. `network-card`
    only on multi-card instance types, as on AWS ("" is absent: not listed, 404)."""
    lines = "\n".join
    return {
        "device-number": str(eni.device_number),
        "network-card": str(eni.network_card) if multi_card else "",
        "interface-id": eni.interface_id,
        "mac": eni.mac,
        "local-ipv4s": lines(eni.addresses4),
        "subnet-ipv4-cidr-block": str(eni.subnet4),
        "vpc-ipv4-cidr-block": vpc_cidrs[0],
        "vpc-ipv4-cidr-blocks": lines(vpc_cidrs),
        "ipv6s": lines(eni.addresses6),
        "subnet-ipv6-cidr-blocks": str(eni.subnet6) if eni.subnet6 else "",
        "ipv4-prefix": lines(eni.prefixes4),
        "ipv6-prefix": lines(eni.prefixes6),
        "subnet-id": "subnet-%017x" % (int(eni.subnet4.network_address) & 0xFFFF),
        "vpc-id": "vpc-0000000000000000a",
    }


# --- namespaces: what every lab is built in ---------------------------------------

def remove_namespace(ns):
    """Kill what still runs in namespace NS (a hung tool run, a server), then delete it."""
    for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    _run(["ip", "netns", "del", ns], check=False)


class Namespaces:
    """Network namespaces mer-<id>-<role> that this object creates and deletes
    again, and the primitives to run things in them. Lab builds a VPC on it;
    bench/bench.py uses Lab, tests/fixtures/record.py builds its layouts on it."""

    def __init__(self, id=None):
        self.id = id or secrets.token_hex(3)
        self.namespaces = []  # the ones created so far, for teardown

    def _ns(self, role):
        return "mer-%s-%s" % (self.id, role)

    def __enter__(self):
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc):
        self.teardown()

    def build(self):
        """Create the namespaces and what lives in them (in subclasses)."""

    def teardown(self):
        """Remove everything, also after a failed build; never raises."""
        self.remove_namespaces()

    def _add_namespace(self, ns):
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self.ip(ns, "link set lo up")

    def remove_namespaces(self):
        """Delete every namespace created, last first; never raises."""
        for ns in reversed(self.namespaces):
            remove_namespace(ns)
        self.namespaces = []

    def run(self, ns, *argv, input=None, check=True, timeout=30, env=None):
        """Run ARGV (no shell) inside namespace NS."""
        return _run(["ip", "netns", "exec", ns, *argv], input=input, check=check,
                    timeout=timeout, env=env)

    def ip(self, ns, *commands):
        """Run `ip` COMMANDS (one per string, e.g. "route add ...") in batches:
        first those without a family, then those starting with "-6 "."""
        plain = [c for c in commands if not c.startswith("-6 ")]
        v6 = [c[3:] for c in commands if c.startswith("-6 ")]
        for options, batch in [([], plain), (["-6"], v6)]:
            if batch:
                _run(["ip", "-n", ns, *options, "-batch", "-"], input="\n".join(batch) + "\n")

    def sysctl(self, ns, **settings):
        """sysctl(ns, **{"net.ipv4.ip_forward": 1})"""
        self.run(ns, "sysctl", "-q", "-w", *["%s=%s" % kv for kv in settings.items()])

    def iptables_restore(self, ns, rules, v6=False, flush=True):
        argv = ["ip6tables-restore" if v6 else "iptables-restore"]
        self.run(ns, *argv, *([] if flush else ["--noflush"]), input=rules)


# --- the lab -----------------------------------------------------------------

class Lab(Namespaces):
    """A VPC with one instance. Build it with `with Lab(...) as lab:`.

    enis:            number of ENIs (1..n)
    addresses:       addresses per ENI, an int or one int per ENI
    same_subnet:     eth1 in eth0's subnet (198.51.100.20) instead of 203.0.113.0/24
    ipv6:            IPv6 addresses and RA default routes on every ENI
    imds:            "v2" (tokens enforced), "optional", "v1", "refused",
                     "v6-only" (169.254.169.254 silent), "absent" (both silent)
    container:       a Docker-like bridge, container and DNAT of DNAT_PORT on
                     dnat_address (default: eth1's second address)
    admin_link:      an extra non-ENI link with an admin route in main
    rp_filter:       value for net.ipv4.conf.{all,default}.rp_filter (1 = strict)
    ra_router:       the routers' link-local address, announced as IPv6 default
    names:           "eth" (eth0, eth1) or "ens" (ens5, ens6)
    subnets:         "plan" (as above), "distinct" (no two ENIs share a subnet)
                     or "benchmark" (ENI k in 198.18.(128 + k).0/24, VPC
                     198.18.128.0/17; up to 63 ENIs of up to 245 addresses)
    cards:           [(network card, device number)] per ENI (multi-card
                     instances; default: card 0, device = position)
    configure_secondaries: put secondary addresses on the interfaces (else only
                     IMDS knows them, as on a fresh Ubuntu instance)
    dhcp:            the default route as a DHCP client leaves it (proto dhcp,
                     src the primary address)
    id:              names the namespaces mer-<id>-<role> (default: random)
    """

    def __init__(self, enis=2, addresses=2, same_subnet=False, ipv6=True, imds="v2",
                 container=False, dnat_address=None, admin_link=False, rp_filter=0,
                 ra_router=RA_ROUTER, names="eth", configure_secondaries=True,
                 subnets="plan", cards=None, dhcp=False, id=None):
        super().__init__(id)
        counts = [addresses] * enis if isinstance(addresses, int) else list(addresses)
        self.same_subnet, self.ipv6, self.names = same_subnet, ipv6, names
        self.enis = [plan_eni(i, n, same_subnet, ipv6, names, subnets=subnets)
                     for i, n in enumerate(counts)]
        self.vpc_cidrs = [BENCHMARK_VPC] if subnets == "benchmark" else VPC_CIDRS
        self.dhcp = dhcp
        self.multi_card = bool(cards)
        for i, (card, device) in enumerate(cards or []):
            self.enis[i].index, self.enis[i].network_card, self.enis[i].device_number = i, card, device
        self.rp_filter = rp_filter
        self.configure_secondaries = configure_secondaries
        self.ra_router = ra_router
        if container and not dnat_address:
            dnat_address = self.enis[1].addresses4[1]
        self.dnat_address = dnat_address

        self.instance, self.router = self._ns("instance"), self._ns("router")
        self.client, self.peer = self._ns("client"), self._ns("peer")
        self.container = self._ns("container") if container else None
        self.vpn = self._ns("vpn") if admin_link else None
        self.tmpdir = tempfile.mkdtemp(prefix="mer-%s-" % self.id)
        self.state_dir = os.path.join(self.tmpdir, "state")
        self.imds = Imds(self, imds)
        self.servers = []
        self.sessions = []

    # -- lifecycle --

    def build(self):
        for ns in [self.instance, self.router, self.client, self.peer, self.container, self.vpn]:
            if ns:
                self._add_namespace(ns)
        # before the ENIs exist, so that they inherit "default"
        self.sysctl(self.instance, **{"net.ipv4.conf.all.rp_filter": self.rp_filter,
                                      "net.ipv4.conf.default.rp_filter": self.rp_filter})
        self._build_router()
        self._build_instance()
        self._build_client_and_peer()
        if self.container:
            self._build_container()
        if self.vpn:
            self._build_admin_link()
        self._apply_source_checks()
        if self.imds.mode != "absent":
            self.imds.start()
        for ns in [self.instance, self.client, self.peer, self.vpn]:
            if ns:
                self.serve(ns, ECHO_PORT)
        if self.container:
            self.serve(self.container, CONTAINER_PORT)

    def teardown(self):
        """Remove everything, also after a failed build; never raises."""
        for thing in [*self.sessions, *self.servers]:
            with contextlib.suppress(Exception):
                thing.close()
        with contextlib.suppress(Exception):
            self.imds.stop()
        super().teardown()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _add_namespace(self, ns):
        super()._add_namespace(ns)
        # no DAD, so IPv6 addresses are usable at once
        self.sysctl(ns, **{"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})

    # -- the VPC router --

    def _build_router(self):
        self.sysctl(self.router, **{
            "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
            "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
            "net.ipv4.conf.all.proxy_arp": 1,
        })
        commands = [
            # the internet: a routed link to the client
            "link add name vpc-inet type veth peer name inet0 netns " + self.client,
            "link set vpc-inet up",
            "addr add %s/24 dev vpc-inet" % CLIENT_GW4,
            "addr add %s/64 dev vpc-inet nodad" % CLIENT_GW6,
            # a VPC peer in subnet B, behind its own port
            "link add name vpc-peer type veth peer name peer0 netns " + self.peer,
            "link set vpc-peer up",
            "addr add %s/32 dev vpc-peer" % SUBNET_B[0][1],
            "route add %s/32 dev vpc-peer" % PEER4,
        ]
        if self.imds.mode != "absent":
            commands += ["addr add %s/32 dev lo" % IMDS4]
            if self.ipv6:
                commands += ["addr add %s/128 dev lo" % IMDS6]
        for eni in self.enis:
            commands += self._router_port_commands(eni)
        self.ip(self.router, *commands)
        self._answer_arp_at_once(["vpc-inet", "vpc-peer", *[e.port for e in self.enis]])

    def _answer_arp_at_once(self, ports):
        """Proxy ARP answers broadcasts after a random delay unless told not to."""
        self.sysctl(self.router, **{"net.ipv4.neigh.%s.proxy_delay" % p: 0 for p in ports})

    def _router_port_commands(self, eni):
        """Create ENI's veth pair (instance end in the instance namespace),
        and make the router its gateway that knows its addresses."""
        commands = [
            "link add name %s address %s type veth peer name %s address %s netns %s"
            % (eni.port, eni.port_mac, eni.name, eni.mac, self.instance),
            "link set %s up" % eni.port,
            "addr add %s/32 dev %s" % (eni.gateway4, eni.port),
        ]
        if eni.subnet6:
            commands += ["addr add %s/64 dev %s nodad" % (self.ra_router, eni.port)]
        commands += ["route replace %s dev %s" % (owned, eni.port) for owned in eni.owned]
        return commands

    def _apply_source_checks(self):
        """The VPC's source/destination check: rebuilt from the ENI list."""
        self.iptables_restore(self.router, self._source_check_rules(v6=False))
        if self.ipv6:
            self.iptables_restore(self.router, self._source_check_rules(v6=True), v6=True)

    def _source_check_rules(self, v6):
        lines = ["*raw", ":PREROUTING ACCEPT", ":OUTPUT ACCEPT"]
        rules = []
        for eni in self.enis:
            chain = "SRC-CHECK-" + eni.name
            lines.append(":%s -" % chain)
            rules.append("-A PREROUTING -i %s -j %s" % (eni.port, chain))
            owned = [a for a in eni.owned if (":" in a) == v6]
            if v6:  # neighbour discovery and DAD use these
                owned += ["fe80::/10", "::/128"]
            rules += ["-A %s -s %s -j RETURN" % (chain, a) for a in owned]
            if eni.source_check:
                rules.append("-A %s -j DROP" % chain)
        if self.imds.silent6 if v6 else self.imds.silent4:
            rules.append("-A PREROUTING -d %s -j DROP" % (IMDS6 if v6 else IMDS4))
        return "\n".join(lines + rules + ["COMMIT", ""])

    def dropped(self, eni):
        """Packets the source/destination check dropped on ENI's port (v4 + v6)."""
        total = 0
        for save in ["iptables-save", "ip6tables-save"] if self.ipv6 else ["iptables-save"]:
            text = self.run(self.router, save, "-c", "-t", "raw").stdout
            match = re.search(r"^\[(\d+):\d+\] -A SRC-CHECK-%s -j DROP$" % eni.name, text, re.M)
            total += int(match.group(1)) if match else 0
        return total

    # -- the instance --

    def _build_instance(self):
        commands = []
        for eni in self.enis:
            commands += self._instance_eni_commands(eni)
        # what DHCP leaves: one default route, via the primary ENI
        primary = self.enis[0]
        commands.append("route add default via %s dev %s" % (primary.gateway4, primary.name)
                        + (" proto dhcp src %s" % primary.addresses4[0] if self.dhcp else ""))
        self.ip(self.instance, *commands)

    def _instance_eni_commands(self, eni):
        configured = slice(None) if self.configure_secondaries else slice(1)
        commands = ["link set %s up" % eni.name]
        commands += ["addr add %s/%d dev %s" % (a, eni.subnet4.prefixlen, eni.name)
                     for a in eni.addresses4[configured]]
        commands += ["addr add %s/%d dev %s nodad" % (a, eni.subnet6.prefixlen, eni.name)
                     for a in eni.addresses6[configured]]
        if eni.subnet6:
            # what a router advertisement installs; the kernel refuses two
            # userspace defaults with one metric, so each ENI gets its own
            commands.append("-6 route add default via %s dev %s proto ra metric %d"
                            % (self.ra_router, eni.name, 1024 + eni.number))
        return commands

    # -- client, peer, container, admin link --

    def _build_client_and_peer(self):
        self.ip(self.client, "link set inet0 up", "addr add %s/24 dev inet0" % CLIENT4,
                "addr add %s/64 dev inet0 nodad" % CLIENT6,
                "route add default via " + CLIENT_GW4, "-6 route add default via " + CLIENT_GW6)
        self.ip(self.peer, "link set peer0 up", "addr add %s/24 dev peer0" % PEER4,
                "route add default via %s" % SUBNET_B[0][1])

    def _build_container(self):
        """A container publishing CONTAINER_PORT as DNAT_PORT, the way Docker does."""
        self.sysctl(self.instance, **{"net.ipv4.ip_forward": 1})
        self.ip(self.instance,
                "link add name docker0 address 02:42:c6:13:00:01 type bridge",
                "link set docker0 up",
                "addr add %s/24 dev docker0" % DOCKER_GW,
                "link add name veth0c address 02:42:c6:13:00:fe type veth peer name eth0"
                " address 02:42:c6:13:00:02 netns " + self.container,
                "link set veth0c master docker0 up")
        self.ip(self.container, "link set eth0 up", "addr add %s/24 dev eth0" % CONTAINER4,
                "route add default via " + DOCKER_GW)
        self.iptables_restore(self.instance, docker_rules(self.dnat_address))

    def _build_admin_link(self):
        """A link that is not an ENI (a VPN, say) and an admin's route over it."""
        self.ip(self.instance,
                "link add name vpn0 address 02:00:00:00:02:01 type veth peer name vpn0 netns " + self.vpn,
                "link set vpn0 up", "addr add %s/24 dev vpn0" % VPN_LOCAL,
                "route add %s via %s dev vpn0 proto static" % (VPN_NETWORK, VPN_REMOTE))
        self.ip(self.vpn, "link set vpn0 up", "addr add %s/24 dev vpn0" % VPN_REMOTE,
                "addr add %s/32 dev lo" % VPN_HOST, "route add default via " + VPN_LOCAL)

    # -- changing the VPC while it runs --

    def add_address(self, eni, address, on_instance=True):
        """Assign ADDRESS to ENI in the VPC (router, IMDS) and, if asked, on
        the instance's interface."""
        v6 = ":" in address
        (eni.addresses6 if v6 else eni.addresses4).append(address)
        # The VPC knows which ENI owns an address: it does not ask (ARP, ND), so
        # a probe sent before the instance took the address leaves no failed
        # neighbour entry behind.
        family = "-6 " if v6 else ""
        self.ip(self.router, "%sroute replace %s dev %s" % (family, address, eni.port),
                "%sneigh replace %s lladdr %s dev %s nud permanent" % (family, address, eni.mac, eni.port))
        self._apply_source_checks()
        self.imds.write()
        if on_instance:
            prefix = eni.subnet6.prefixlen if v6 else eni.subnet4.prefixlen
            self.ip(self.instance, "addr add %s/%d dev %s%s" % (address, prefix, eni.name, " nodad" if v6 else ""))

    def remove_address(self, eni, address, on_instance=True):
        v6 = ":" in address
        (eni.addresses6 if v6 else eni.addresses4).remove(address)
        family = "-6 " if v6 else ""
        self.ip(self.router, "%sneigh flush to %s dev %s nud all" % (family, address, eni.port),
                "%sroute del %s dev %s" % (family, address, eni.port))
        self._apply_source_checks()
        self.imds.write()
        if on_instance:
            prefix = eni.subnet6.prefixlen if v6 else eni.subnet4.prefixlen
            self.ip(self.instance, "addr del %s/%d dev %s" % (address, prefix, eni.name))

    def delegate_prefix(self, eni, prefix):
        """Delegate PREFIX (an ipv4-prefix /28 or ipv6-prefix /80) to ENI in the
        VPC: the router routes it to the ENI and accepts it as a source."""
        v6 = ":" in prefix
        (eni.prefixes6 if v6 else eni.prefixes4).append(prefix)
        # Via the ENI's own address: the VPC hands the prefix to the ENI, it does
        # not ask (ARP, ND) for each of its addresses.
        self.ip(self.router, "%sroute replace %s via %s dev %s" % (
            "-6 " if v6 else "", prefix, (eni.addresses6 if v6 else eni.addresses4)[0], eni.port))
        self._apply_source_checks()
        self.imds.write()

    def add_pod(self, address4, address6=None):
        """A pod as a CNI wires one: its own namespace on a veth to the instance,
        which routes ADDRESS (from a delegated prefix) to it and forwards."""
        pod = self._ns("pod")
        self._add_namespace(pod)
        self.sysctl(self.instance, **{"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
        self.ip(self.instance, "link add name vethpod type veth peer name eth0 netns " + pod,
                "link set vethpod up", "addr add 169.254.1.1/32 dev vethpod",
                "route add %s dev vethpod" % address4)
        self.ip(pod, "link set eth0 up", "addr add %s/32 dev eth0" % address4,
                "route add 169.254.1.1 dev eth0", "route add default via 169.254.1.1")
        if address6:
            self.ip(self.instance, "-6 addr add fe80::1:1/64 dev vethpod nodad",
                    "-6 route add %s dev vethpod" % address6)
            self.ip(pod, "-6 addr add %s/128 dev eth0 nodad" % address6,
                    "-6 route add default via fe80::1:1 dev eth0")
        self.serve(pod, ECHO_PORT)
        return pod

    def disable_source_check(self, eni):
        """Turn the VPC's source/destination check off for ENI (NAT instances)."""
        eni.source_check = False
        self._apply_source_checks()

    def add_internet_host(self, address):
        """One more address "on the internet" (in the client namespace, whose
        LineServer answers on it too), routed there by the VPC router."""
        self.ip(self.client, "addr add %s/32 dev lo" % address)
        self.ip(self.router, "route add %s via %s" % (address, CLIENT4))

    def add_vpc_host(self, role, address, subnet_of, gateway_eni=None):
        """A host in the VPC, in the subnet of ENI SUBNET_OF, behind its own
        router port (like the peer) and serving ECHO_PORT. With GATEWAY_ENI its
        subnet's route table sends 0/0 to that ENI (a NAT instance's private
        host): the router forwards everything it sends elsewhere to the ENI."""
        ns = self._ns(role)
        self._add_namespace(ns)
        port = "vpc-" + role
        self.ip(self.router, "link add name %s type veth peer name %s0 netns %s" % (port, role, ns),
                "link set %s up" % port, "addr add %s/32 dev %s" % (subnet_of.gateway4, port),
                "route add %s/32 dev %s" % (address, port))
        self._answer_arp_at_once([port])
        self.ip(ns, "link set %s0 up" % role,
                "addr add %s/%d dev %s0" % (address, subnet_of.subnet4.prefixlen, role),
                "route add default via %s" % subnet_of.gateway4)
        if gateway_eni:
            table = 100 + len(self.namespaces)
            self.ip(self.router, "route add default via %s dev %s table %d"
                    % (gateway_eni.addresses4[0], gateway_eni.port, table),
                    "rule add iif %s lookup %d" % (port, table))
        self.serve(ns, ECHO_PORT)
        return ns

    def attach_eni(self, addresses=1, eni=None):
        """Hot-plug one more ENI (next device number, in subnet A), or ENI
        again after detach_eni (same name and MAC, a new interface)."""
        if eni is None:
            index = max(e.device_number for e in self.enis) + 1
            eni = plan_eni(index, addresses, True, self.ipv6, self.names)
        self.enis.append(eni)
        self.ip(self.router, *self._router_port_commands(eni))
        self._answer_arp_at_once([eni.port])
        self.ip(self.instance, *self._instance_eni_commands(eni))
        self._apply_source_checks()
        self.imds.write()
        return eni

    def detach_eni(self, eni):
        """Hot-unplug ENI: its veth pair disappears, so does its IMDS entry."""
        self.enis.remove(eni)
        self.ip(self.instance, "link del " + eni.name)  # takes the router port along
        self._apply_source_checks()
        self.imds.write()

    # -- services and probes --

    def serve(self, ns, port):
        server = LineServer(ns, port)
        self.servers.append(server)
        return server

    def session(self, ns, address, port=ECHO_PORT):
        session = Session(ns, address, port)
        self.sessions.append(session)
        return session

    def tcp_ok(self, src_ns, dst_addr, port=ECHO_PORT, bind=None, timeout=2):
        """True only if the LineServer at DST_ADDR:PORT answered."""
        return tcp_answer(src_ns, dst_addr, port, bind, timeout) is not None

    def ping_ok(self, src_ns, dst_addr, bind=None, timeout=2):
        return ping(src_ns, dst_addr, bind, timeout)

    def reachability(self, addresses, src_ns=None, port=ECHO_PORT, timeout=1.0):
        """{address: Reach(icmp, tcp)} from SRC_NS (default: the client), all
        probes at once."""
        results = self._probe([(src_ns or self.client, a, None) for a in addresses], port, timeout)
        return dict(zip(addresses, results))

    def paths(self, pairs, src_ns=None, port=ECHO_PORT, timeout=1.0):
        """{(source, destination): Reach(icmp, tcp)} for sockets bound to
        source in SRC_NS (default: the instance), all probes at once."""
        results = self._probe([(src_ns or self.instance, d, s) for s, d in pairs], port, timeout)
        return dict(zip(pairs, results))

    def _probe(self, targets, port, timeout):
        """[Reach] for each (namespace, destination, bind) in TARGETS."""
        calls = []
        for ns, dst, bind in targets:
            calls += [lambda ns=ns, dst=dst, bind=bind: ping(ns, dst, bind, timeout),
                      lambda ns=ns, dst=dst, bind=bind:
                          tcp_answer(ns, dst, port, bind, timeout) is not None]
        results = in_parallel(calls)
        return [Reach(*results[i:i + 2]) for i in range(0, len(results), 2)]

    def addresses(self, *enis, v4=True, v6=True):
        """The addresses of ENIS (default all), IPv4 then IPv6 per ENI."""
        found = []
        for eni in enis or self.enis:
            found += (eni.addresses4 if v4 else []) + (eni.addresses6 if v6 else [])
        return found

    def imds_request(self, method, path, headers=None, v6=False, timeout=2):
        """(status, body) of one HTTP request from the instance to IMDS;
        (None, error) if no answer came."""
        address = IMDS6 if v6 else IMDS4
        connection = http.client.HTTPConnection(address, 80, timeout=timeout)
        connection.sock = netns_socket(self.instance, family_of(address), socket.SOCK_STREAM)
        connection.sock.settimeout(timeout)
        try:
            connection.sock.connect((address, 80))
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        except OSError as e:
            return None, str(e)
        finally:
            connection.close()

    def imds_reachable(self, timeout=2):
        """True if the instance gets an IMDSv2 token."""
        status, _ = self.imds_request("PUT", "/latest/api/token", timeout=timeout,
                                      headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        return status == 200

    # -- the tool --

    def run_tool(self, *args, env=None, timeout=60):
        """Run the tool in the instance namespace with this lab's state dir."""
        return self.popen_tool(*args, env=env).communicate_result(timeout)

    def popen_tool(self, *args, env=None):
        """Start the tool without waiting (for concurrent runs)."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MULTI_ENI_ROUTING")}
        full_env.update(TEST_NICS, **(env or {}))
        argv = ["ip", "netns", "exec", self.instance, TOOL_PYTHON, str(TOOL),
                *args, "--state-dir", self.state_dir]
        return ToolRun(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=full_env))

    # -- observing the instance --

    def snapshot(self):
        """The instance's routing state, as texts to compare byte for byte:
        rules, routes of all tables, iptables (no counters), addresses, sysctls."""
        ns = self.instance
        iptables = lambda save: normalized_iptables(self.run(ns, save).stdout)
        return {
            "ip rule": _run(["ip", "-n", ns, "rule", "show"]).stdout,
            "ip -6 rule": _run(["ip", "-n", ns, "-6", "rule", "show"]).stdout,
            "ip route": _run(["ip", "-n", ns, "-4", "route", "show", "table", "all"]).stdout,
            "ip -6 route": _run(["ip", "-n", ns, "-6", "route", "show", "table", "all"]).stdout,
            "iptables": iptables("iptables-save"),
            "ip6tables": iptables("ip6tables-save"),
            "addresses": _run(["ip", "-n", ns, "-o", "addr", "show"]).stdout,
            "links": _run(["ip", "-n", ns, "-o", "link", "show"]).stdout,
            "sysctls": self.run(ns, "sysctl", "net.ipv4.conf", "net.ipv6.conf",
                                "net.ipv4.ip_forward", check=False).stdout,
        }

    def main_tables(self):
        return {family: _run(["ip", "-n", self.instance, *family.split(), "show", "table", "main"]).stdout
                for family in ["route", "-6 route"]}


class Watching:
    """The tool's --watch in LAB's instance namespace, with a notify socket
    standing in for systemd's and its output in a file; killed by close().
    verbose: with -v (the tests read its log; the benchmark does not)."""

    def __init__(self, lab, *args, env=None, verbose=True):
        self.lab = lab
        self.directory = tempfile.mkdtemp(prefix="mer-watch-")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(os.path.join(self.directory, "notify"))
        self.output_path = os.path.join(self.directory, "output")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MULTI_ENI_ROUTING")}
        full_env.update(TEST_NICS, **(env or {}))
        full_env["NOTIFY_SOCKET"] = os.path.join(self.directory, "notify")
        with open(self.output_path, "w") as output:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", lab.instance, TOOL_PYTHON, str(TOOL), "--watch",
                 *(["-v"] if verbose else []), *args, "--state-dir", lab.state_dir],
                stdout=output, stderr=subprocess.STDOUT, env=full_env)
        self.messages = []

    def receive(self, timeout):
        """The next sd_notify message, or None after TIMEOUT seconds."""
        self.notify.settimeout(max(timeout, 0.001))
        try:
            text = self.notify.recv(4096).decode()
        except socket.timeout:
            return None
        self.messages.append(text)
        return text

    def wait_message(self, prefix, timeout=20):
        """The first message starting with PREFIX; AssertionError after TIMEOUT seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.receive(deadline - time.monotonic())
            if text and text.startswith(prefix):
                return text
        raise AssertionError("no %r from the watcher within %s s; output:\n%s" % (prefix, timeout, self.output()))

    def statuses_during(self, seconds):
        """The STATUS lines (one per converge) that come within SECONDS."""
        deadline, found = time.monotonic() + seconds, []
        while time.monotonic() < deadline:
            text = self.receive(deadline - time.monotonic())
            if text and text.startswith("STATUS="):
                found.append(text)
        return found

    def ready(self, timeout=20):
        self.wait_message("READY=1", timeout)
        return self

    def settle(self, quiet=1.0, timeout=15):
        """Wait until no converge came for QUIET seconds (after a change, one
        follow-up converge checks that nothing else changed meanwhile)."""
        deadline = time.monotonic() + timeout
        while self.statuses_during(quiet):
            if time.monotonic() > deadline:
                raise AssertionError("the watcher does not settle:\n" + self.output())

    def output(self):
        with open(self.output_path) as handle:
            return handle.read()

    def close(self):
        if self.process.poll() is None:  # SIGTERM first: the watcher's coverage data is saved as it exits
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()
        self.notify.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class ToolRun:
    def __init__(self, process):
        self.process = process

    def communicate_result(self, timeout=60):
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            err += "\n[lab: killed after %ss]" % timeout
        return ToolResult(self.process.returncode, out, err)


def normalized_iptables(save_output):
    """iptables-save output without comments, packet counters and empty tables.

    With the nft backend a table exists once anything touched it, so a table
    with nothing but ACCEPT policies is the same as no table at all.
    """
    lines = [re.sub(r" \[\d+:\d+\]$", "", line)
             for line in save_output.splitlines() if not line.startswith("#")]
    tables, current = [], []
    for line in lines:
        current.append(line)
        if line == "COMMIT":
            tables.append(current)
            current = []
    def empty(table):
        return all(line.startswith("*") or line == "COMMIT" or re.fullmatch(r":\S+ ACCEPT", line)
                   for line in table)
    return "".join("\n".join(t) + "\n" for t in tables if not empty(t))


def snapshot_diff(before, after):
    """A unified diff of two snapshots, "" when they are identical."""
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, ""), after.get(key, "")
        if a.splitlines() != b.splitlines():
            out += ["== " + key] + list(difflib.unified_diff(
                a.splitlines(), b.splitlines(), "before", "after", lineterm="", n=1))
    return "\n".join(out)


def docker_rules(published_on):
    """The nat and filter rules Docker writes for `-p PUBLISHED_ON:8080:80`."""
    return "\n".join([
        "*nat",
        ":PREROUTING ACCEPT", ":INPUT ACCEPT", ":OUTPUT ACCEPT", ":POSTROUTING ACCEPT",
        ":DOCKER -",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
        "-A POSTROUTING -s 198.19.0.0/24 ! -o docker0 -j MASQUERADE",
        "-A DOCKER -i docker0 -j RETURN",
        "-A DOCKER -d %s/32 ! -i docker0 -p tcp -m tcp --dport %d -j DNAT --to-destination %s:%d"
        % (published_on, DNAT_PORT, CONTAINER4, CONTAINER_PORT),
        "COMMIT",
        "*filter",
        ":INPUT ACCEPT", ":FORWARD DROP", ":OUTPUT ACCEPT",
        ":DOCKER -",
        "-A FORWARD -o docker0 -j DOCKER",
        "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT",
        "-A FORWARD -i docker0 -o docker0 -j ACCEPT",
        "-A DOCKER -d %s/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport %d -j ACCEPT"
        % (CONTAINER4, CONTAINER_PORT),
        "COMMIT", "",
    ])


# --- what tests share: outcomes, the tool's markers, polling, /proc ----------------

BOTH = Reach(icmp=True, tcp=True)
NEITHER = Reach(icmp=False, tcp=False)
# What the tool owns (docs/DESIGN.md): rules and routes of protocol 231, its
# mangle chains and the jumps to them that carry its comment.
TOOL_MARKERS = ("proto 231", "MULTI-ENI-", "multi-eni-routing")


def applied(lab, *args):
    """Run the tool, insist it succeeded, return its result."""
    result = lab.run_tool(*args)
    assert result.rc == 0, "tool %s failed: %r" % (" ".join(args) or "(apply)", result)
    return result


def tool_lines(snapshot):
    """The snapshot lines that carry one of the tool's markers."""
    return [line for text in snapshot.values() for line in text.splitlines()
            if any(marker in line for marker in TOOL_MARKERS)]


def wait_for(condition, timeout, what="the condition", interval=0.1):
    """Poll CONDITION every INTERVAL seconds until it is true; the seconds that
    took. AssertionError naming WHAT when TIMEOUT seconds pass first. The one
    polling helper of the tests and the benchmarks (no racing sleeps)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError("%s did not hold within %.1f s" % (what, timeout))
        time.sleep(interval)
    return time.monotonic() - started


def eventually(condition, timeout=10.0, interval=0.1):
    """CONDITION's last value: true once it held within TIMEOUT seconds, else
    false. wait_for for `assert eventually(...), "why"`."""
    last = [None]

    def remembered():
        last[0] = condition()
        return last[0]
    with contextlib.suppress(AssertionError):
        wait_for(remembered, timeout, interval=interval)
    return last[0]


def cpu_ticks(pid):
    """utime + stime + cutime + cstime of a process (its programs included), in clock ticks."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15])


def memory_kb(pid, key):
    """A memory figure of /proc/PID/status (VmRSS, VmHWM), in kB."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise LabError("%s not in /proc/%d/status" % (key, pid))
