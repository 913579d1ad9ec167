#!/usr/bin/env python3
"""multi-eni-routing: make every address of every ENI of an EC2 instance reachable.

The VPC drops a packet that leaves an ENI with a source address that ENI does not
own, and Linux routes by destination only, so replies from a secondary ENI's
addresses leave through the primary and are lost. This tool gives each ENI a
routing table, the rules that select it, connection marks for traffic whose
source is rewritten after routing (DNAT), and the sysctls that go with them.

The file reads top to bottom as the data flows:

    discover (read-only: ip -j, sysfs, IMDS) -> plan (pure) -> diff (pure)
      -> apply (one batch per tool) -> verify (re-read; roll back on failure)

Everything the tool creates carries its own marker (rule and route protocol 231,
its priority and table ranges, its iptables chains, its state file), so a flush
removes exactly that and nothing else.
"""

import argparse
import collections
import errno
import fcntl
import gc
import ipaddress
import json
import os
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time

VERSION = "1.0.0"
PROG = "multi-eni-routing"

# -- Constants: the tool's markers and ranges, defined once. ----------------------

# Route and rule protocol. Unassigned in /etc/iproute2/rt_protos, so nothing else
# uses it; every rule and route the tool adds carries it.
RT_PROTO = 231

# One table per ENI: TABLE_BASE + 100 x network-card + device-number, stable across
# reboots and re-attachment. Clear of amazon-ec2-net-utils (10000+) and cloud-init (100+).
TABLE_BASE = 22000
TABLE_LAST = 22999

# Rule priorities, in the order the kernel walks them (slot = 16 x card + device):
PRIO_FWMARK = 20000  # +slot: replies of connections that came in on the ENI
PRIO_SUBNETS = 20100  # +slot: from ADDR to ENI subnets, before main's connected routes
PRIO_MAIN = 20200  # main without its default: docker, VPN and admin routes win
PRIO_SOURCE = 20300  # +slot: from ADDR, everything else (the ENI's default route)

# Connmark bits: clear of Kubernetes (0x4000, 0x8000), the VPC CNI (0x80) and
# Calico (0xffff0000). Mark of an ENI = (slot + 1) shifted into the mask.
DEFAULT_MARK_MASK = 0x3F00

CHAIN_PREROUTING = "MULTI-ENI-PREROUTING"
CHAIN_OUTPUT = "MULTI-ENI-OUTPUT"
JUMP_COMMENT = "multi-eni-routing"

# Loose reverse-path filtering: a DNATed packet's reverse route goes through
# the primary, so strict mode (1) would drop it on a secondary ENI.
RP_FILTER_LOOSE = "2"

IMDS_ENDPOINTS = ("169.254.169.254", "fd00:ec2::254")
IMDS_PORT = 80
IMDS_CONNECT_TIMEOUT = 0.8  # per endpoint: two silent ones are given up on within 2 s
IMDS_MAX_BODY = 64 * 1024  # a meta-data answer is a few hundred bytes
IMDS_TOKEN_TTL = "60"

STATE_DIR = "/run/multi-eni-routing"  # tmpfs: gone at reboot, like what it records
LOCK_TIMEOUT = 60.0

# Without IMDS, an ENI is a NIC driven by one of these (Nitro, Intel VF, Xen):
# never lo, a bridge, veth, tunnel, WireGuard or VLAN, and nothing at all on a
# machine that is not an EC2 instance.
ENI_DRIVERS = ("ena", "ixgbevf", "vif")

TABLE_NAMES = {"main": 254, "local": 255, "default": 253}
TABLE_MAIN = 254

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_APPLIED = 3
EXIT_NOT_ROOT = 4
EXIT_MISSING_PROGRAM = 5

PACKAGES = {
    "ip": "iproute2 (Debian, Ubuntu) or iproute (Amazon Linux, RHEL)",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "ip6tables-save": "iptables",
    "ip6tables-restore": "iptables",
}


class Log:
    """Messages on stderr, filtered by level. (The logging module costs 5 ms of
    start-up, a tenth of an in-sync run.)"""

    DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

    def __init__(self):
        self.level = self.WARNING

    def emit(self, level, label, message, args):
        if level >= self.level:
            sys.stderr.write("%s: %s: %s\n" % (PROG, label, message % args if args else message))

    def debug(self, message, *args):
        self.emit(self.DEBUG, "debug", message, args)

    def info(self, message, *args):
        self.emit(self.INFO, "info", message, args)

    def warning(self, message, *args):
        self.emit(self.WARNING, "warning", message, args)

    def error(self, message, *args):
        self.emit(self.ERROR, "error", message, args)


log = Log()


class ToolError(Exception):
    """A failure the user sees as one line, with the exit code it maps to."""

    def __init__(self, message, exit_code=EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


class CommandError(ToolError):
    """A program the tool ran failed: carries its command, exit code and stderr."""

    def __init__(self, argv, returncode, stderr):
        detail = " ".join((stderr or "").split())[:300] or "no error output"
        super().__init__("%s exited %s: %s" % (" ".join(argv), returncode, detail))
        self.argv, self.returncode, self.stderr = argv, returncode, stderr


# -- Running programs: the one place that does. ----------------------------------

PROGRAM_ENV = dict(os.environ, LC_ALL="C")


def run(argv, stdin=None):
    """Run argv (never through a shell), return its stdout; raise CommandError,
    also when the program cannot be started at all."""
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=PROGRAM_ENV, universal_newlines=True)
    except OSError as exc:
        raise CommandError(argv, "127 (not started)", exc.strerror or str(exc))
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc.stdout


def run_together(commands):
    """run() each (argv, stdin) at the same time; their outputs in order. The
    first failure is raised once all have ended."""
    outputs, errors = [None] * len(commands), []

    def one(index, argv, stdin):
        try:
            outputs[index] = run(argv, stdin)
        except CommandError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(index,) + tuple(command))
               for index, command in enumerate(commands) if index]
    for thread in threads:
        thread.start()
    if commands:
        one(0, *commands[0])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return outputs


def which(name):
    """The program's path in PATH or the sbin directories (boot may run without them)."""
    for directory in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]:
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_programs(names):
    """Resolve program paths once; a missing one is exit 5 naming its package."""
    paths = {}
    for name in names:
        path = which(name)
        if not path:
            raise ToolError("%s not found: install %s" % (name, PACKAGES.get(name, name)),
                            EXIT_MISSING_PROGRAM)
        paths[name] = path
    return paths


# -- Data model: plain tuples between the stages. ---------------------------------

# A network interface as `ip -j addr` shows it, with its global addresses.
Link = collections.namedtuple("Link", "name index mac master up ipv4 ipv6")
LinkAddress = collections.namedtuple("LinkAddress", "ip prefixlen")  # strings as `ip` prints
# A main-table route: what DHCP, RAs and the kernel left (gateways, connected subnets).
MainRoute = collections.namedtuple("MainRoute", "family dst gateway dev")
# An ENI as the plan sees it; `added_ipv4/6` are the addresses the tool adds or
# keeps (from IMDS), `origin` says who named it an ENI: "imds" or "local".
Eni = collections.namedtuple("Eni", [
    "name", "mac", "device_number", "network_card", "ipv4", "ipv6", "added_ipv4", "added_ipv6",
    "subnets4", "subnets6", "gateway4", "gateway6", "prefixes4", "prefixes6", "origin"])
# What the tool owns, in a form both the plan and the running system produce:
# rules, routes, mangle fragments (per family), sysctls and added addresses.
Rule = collections.namedtuple("Rule", "family priority src fwmark table suppress")
Route = collections.namedtuple("Route", "family table dst gateway dev")
Mangle = collections.namedtuple("Mangle", "jumps chains")  # chains: ((name, (spec, ...)), ...)
Address = collections.namedtuple("Address", "dev cidr")
OwnedState = collections.namedtuple("OwnedState", "rules routes mangle4 mangle6 sysctls addresses")
# Everything discovery read from the system.
System = collections.namedtuple("System", "links main_routes rules routes mangle4 mangle6 sysfs ipv6")
# The changes to make, one list per tool, plus sysctl writes (key, new, old).
Changes = collections.namedtuple("Changes", "ip4 ip6 iptables4 iptables6 sysctls")

NO_MANGLE = Mangle((), ())
NOTHING = OwnedState(frozenset(), frozenset(), NO_MANGLE, NO_MANGLE, {}, frozenset())  # flushed


def slot_of(eni):
    """The ENI's slot: orders its rules and numbers its connection mark."""
    return 16 * eni.network_card + eni.device_number


def table_of(eni):
    """The ENI's routing table number."""
    return TABLE_BASE + 100 * eni.network_card + eni.device_number


# -- Discover: read-only. First the commands, then pure parsers of their output. --

# What discovery reads, by name; parse_system takes the outputs under these names.
READ_COMMANDS = (
    ("addr", ("ip", "-j", "address", "show")),
    ("rule4", ("ip", "-j", "-4", "rule", "show")),
    ("rule6", ("ip", "-j", "-6", "rule", "show")),
    ("route4", ("ip", "-j", "-4", "route", "show", "table", "all")),
    ("route6", ("ip", "-j", "-6", "route", "show", "table", "all")),
    ("mangle4", ("iptables-save", "-t", "mangle")),
    ("mangle6", ("ip6tables-save", "-t", "mangle")),
)
ALL_SOURCES = frozenset(name for name, _ in READ_COMMANDS)
IPV6_SOURCES = frozenset(("rule6", "route6", "mangle6"))


def ipv6_enabled():
    """False on a kernel booted with ipv6.disable=1, where IPv6 reads fail."""
    return os.path.exists("/proc/net/if_inet6")


def read_outputs(programs, names=ALL_SOURCES):
    """Run the READ_COMMANDS named, all at once; their outputs by name.
    Without IPv6 in the kernel, its sources read as empty."""
    outputs = {}
    if not ipv6_enabled():
        outputs = {name: "" for name in names & IPV6_SOURCES}
        names = names - IPV6_SOURCES
    chosen = [(name, argv) for name, argv in READ_COMMANDS if name in names]
    commands = [[programs[argv[0]]] + list(argv[1:]) for _, argv in chosen]
    outputs.update(zip((name for name, _ in chosen), run_together([(argv, None) for argv in commands])))
    return outputs


def sources_touched(changes):
    """The READ_COMMANDS whose output the changes can alter: verify re-reads only those."""
    names = set()
    if changes.ip4:
        names |= {"rule4", "route4"}
    if changes.ip6:
        names |= {"rule6", "route6"}
    if any(line.startswith("address") for line in changes.ip4 + changes.ip6):
        names.add("addr")
    if changes.iptables4:
        names.add("mangle4")
    if changes.iptables6:
        names.add("mangle6")
    return names


def parse_system(outputs, sysfs, ipv6=True):
    """A System from the outputs of READ_COMMANDS (pure: testable from recordings)."""
    rules = (parse_rules(load_json(outputs["rule4"], "ip -4 rule"), 4)
             + parse_rules(load_json(outputs["rule6"], "ip -6 rule"), 6))
    routes = (parse_routes(load_json(outputs["route4"], "ip -4 route"), 4)
              + parse_routes(load_json(outputs["route6"], "ip -6 route"), 6))
    return System(
        links=parse_links(load_json(outputs["addr"], "ip address")),
        main_routes=[route for route in routes if isinstance(route, MainRoute)],
        rules=rules,
        routes=[route for route in routes if isinstance(route, Route)],
        mangle4=parse_mangle(outputs["mangle4"]), mangle6=parse_mangle(outputs["mangle6"]),
        sysfs=sysfs, ipv6=ipv6)


def load_json(text, what):
    """Parse a program's JSON output, as a ToolError when it is not JSON."""
    try:
        return json.loads(text or "[]")
    except ValueError:
        raise ToolError("could not parse the JSON output of %s" % what)


def parse_links(data):
    """Links with their global addresses, from `ip -j address show`."""
    links = []
    for entry in data:
        addrs = {"inet": [], "inet6": []}
        for info in entry.get("addr_info", []):
            if info.get("scope") == "global" and info.get("family") in addrs:
                addrs[info["family"]].append(LinkAddress(info["local"], info["prefixlen"]))
        links.append(Link(
            name=entry["ifname"], index=entry.get("ifindex", 0),
            mac=(entry.get("address") or "").lower(),
            master=entry.get("master"), up="UP" in entry.get("flags", []),
            ipv4=tuple(addrs["inet"]), ipv6=tuple(addrs["inet6"])))
    return links


def table_number(value):
    """A table as a number; `ip` prints main, local and default by name."""
    if value is None:
        return TABLE_MAIN
    try:
        return int(value)
    except ValueError:
        return TABLE_NAMES.get(value, value)


def host_cidr(address, length=None):
    """"203.0.113.5" -> "203.0.113.5/32". Plain strings: `ip` prints addresses in
    canonical form, IMDS answers are made canonical when parsed, and ipaddress
    objects for a thousand rules cost more than the rest of a run."""
    if length is None:
        length = 128 if ":" in address else 32
    return "%s/%s" % (address, length)


def parse_rules(data, family):
    """The tool's own rules (protocol RT_PROTO) from `ip -j rule show`."""
    rules = []
    for entry in data:
        if str(entry.get("protocol")) != str(RT_PROTO):
            continue
        src = entry.get("src", "all")
        fwmark = entry.get("fwmark")
        rules.append(Rule(
            family=family, priority=entry["priority"],
            src=None if src == "all" else host_cidr(src, entry.get("srclen")),
            fwmark=None if fwmark is None else "%s/%s" % (fwmark, entry.get("fwmask", "0xffffffff")),
            table=table_number(entry.get("table")),
            suppress=entry.get("suppress_prefixlen")))
    return rules


def parse_routes(data, family):
    """The tool's own routes (Route), and main's unicast routes (MainRoute)."""
    routes = []
    for entry in data:
        table = table_number(entry.get("table"))
        if entry.get("type", "unicast") != "unicast" or "dev" not in entry:
            continue
        dst = entry["dst"] if entry["dst"] == "default" else host_cidr(*entry["dst"].split("/"))
        if table == TABLE_MAIN:
            routes.append(MainRoute(family, dst, entry.get("gateway"), entry["dev"]))
        elif (str(entry.get("protocol")) == str(RT_PROTO)
              and isinstance(table, int) and TABLE_BASE <= table <= TABLE_LAST):
            routes.append(Route(family, table, dst, entry.get("gateway"), entry["dev"]))
    return routes


def parse_mangle(text):
    """The tool's jumps and chains from `iptables-save -t mangle`."""
    ours = (CHAIN_PREROUTING, CHAIN_OUTPUT)
    jumps, chains = [], collections.OrderedDict()
    for line in text.splitlines():
        if line.startswith(":") and line[1:].split(" ")[0] in ours:
            chains.setdefault(line[1:].split(" ")[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if chain in ours:
                chains.setdefault(chain, []).append(spec)
            elif spec.endswith(tuple("-j " + name for name in ours)):
                jumps.append("%s %s" % (chain, spec))
    return Mangle(tuple(sorted(jumps)), tuple(sorted((name, tuple(specs)) for name, specs in chains.items())))


def read_sysfs(root="/sys/class/net"):
    """Per interface: (is it backed by a device, its driver). Read-only."""
    info = {}
    for name in os.listdir(root) if os.path.isdir(root) else []:
        device = os.path.join(root, name, "device")
        driver = None
        if os.path.exists(device):
            try:
                driver = os.path.basename(os.readlink(device + "/driver"))
            except OSError:
                driver = ""
        info[name] = (os.path.exists(device), driver)
    return info


def read_sysctls(keys):
    """Current values of /proc/sys keys (None where absent, e.g. a gone interface)."""
    values = {}
    for key in keys:
        try:
            with open("/proc/sys/" + key) as handle:
                values[key] = handle.read().strip()
        except OSError:
            values[key] = None
    return values


def kernel_version():
    """(major, minor) of the running kernel, (0, 0) if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def netns_id():
    """The network namespace's inode: keeps state of lab namespaces apart."""
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        init = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return None
    return None if own == init else own


# -- Discover: instance metadata (IMDSv2, bounded, never trusted blindly). --------

class ImdsError(Exception):
    """IMDS did not give a usable answer."""


ImdsEni = collections.namedtuple("ImdsEni", [
    "mac", "device_number", "network_card", "interface_id", "ipv4s", "ipv6s",
    "subnets4", "subnets6", "prefixes4", "prefixes6"])
Imds = collections.namedtuple("Imds", "primary_mac enis")


class ImdsClient:
    """A small IMDSv2 client: token first, v1 if the token call is unknown, retries
    with backoff on 404 (a new ENI not propagated yet), 429 and 5xx, and one
    deadline over everything."""

    RETRIED = (429, 500, 502, 503, 504)  # throttled or briefly unavailable

    def __init__(self, timeout, endpoints=None, port=None):
        import http.client  # here: 15 ms of imports that runs without IMDS do not need
        self.http = http.client
        self.deadline = time.monotonic() + timeout
        self.endpoints = endpoints or IMDS_ENDPOINTS
        self.port = port or IMDS_PORT
        self.conn = None
        self.token = None

    def remaining(self):
        return self.deadline - time.monotonic()

    def close(self):
        if self.conn:
            self.conn.close()

    def connect(self):
        """Find an endpoint that answers and get a token; raise ImdsError if none."""
        problems = []
        for host in self.endpoints:
            if self.remaining() <= 0:
                break
            self.conn = self.http.HTTPConnection(
                host, self.port, timeout=min(IMDS_CONNECT_TIMEOUT, self.remaining()))
            try:
                status, body = self.request_retried(
                    "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": IMDS_TOKEN_TTL})
            except (OSError, self.http.HTTPException) as exc:
                problems.append("%s: %s" % (host, describe_socket_error(exc)))
                self.conn.close()
                continue
            if status == 200 and body.strip():
                self.token = body.strip()
                log.info("instance metadata: IMDSv2 at %s", host)
                return host
            if status in (404, 405):  # IMDSv1 only: GETs without a token
                log.info("instance metadata: IMDSv1 at %s (no token service)", host)
                return host
            problems.append("%s: token refused (HTTP %s)" % (host, status))
            self.conn.close()
        raise ImdsError("; ".join(problems) or "no time left")

    def request(self, method, path, headers):
        """One HTTP exchange on the kept-alive connection: (status, body text)."""
        if self.token:
            headers = dict(headers, **{"X-aws-ec2-metadata-token": self.token})
        self.conn.timeout = max(0.05, min(IMDS_CONNECT_TIMEOUT, self.remaining()))
        if self.conn.sock is not None:
            self.conn.sock.settimeout(self.conn.timeout)
        try:
            self.conn.request(method, path, headers=headers)
            response = self.conn.getresponse()
            body = response.read(IMDS_MAX_BODY + 1)
        except (OSError, self.http.HTTPException):
            self.conn.close()  # the next request reconnects
            raise
        if len(body) > IMDS_MAX_BODY:
            self.conn.close()
            raise ImdsError("%s: answer larger than %d bytes" % (path, IMDS_MAX_BODY))
        try:
            return response.status, body.decode("ascii")
        except UnicodeDecodeError:
            raise ImdsError("%s: answer is not text" % path)

    def request_retried(self, method, path, headers, retried=RETRIED):
        """request(), again with backoff while the status is in `retried` and
        time is left; returns the last answer."""
        delay, reconnected = 0.05, False
        while True:
            try:
                status, body = self.request(method, path, headers)
            except (ConnectionResetError, BrokenPipeError):
                if reconnected:  # once: IMDS may close a kept-alive connection
                    raise
                reconnected = True
                continue
            if status not in retried or self.remaining() < delay:
                return status, body
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def get(self, path, missing_ok=True, retry_missing=False):
        """GET a meta-data path; None for a 404 when missing_ok. `retry_missing`:
        a 404 may be an ENI not propagated yet, so ask again while time is left."""
        retried = self.RETRIED + ((404,) if retry_missing else ())
        try:
            status, body = self.request_retried("GET", "/latest/meta-data/" + path, {}, retried)
        except (OSError, self.http.HTTPException) as exc:
            raise ImdsError("%s: %s" % (path, describe_socket_error(exc)))
        if status == 200:
            return body
        if status == 404 and missing_ok:
            return None
        if status in (401, 403):
            raise ImdsError("%s: HTTP %s (token not accepted)" % (path, status))
        raise ImdsError("%s: HTTP %s%s" % (path, status, ", still after retries" if status in retried else ""))


def describe_socket_error(exc):
    """A short reason for a network failure."""
    if isinstance(exc, TimeoutError) or str(exc) == "timed out":  # socket.timeout before 3.10
        return "no answer (timed out)"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or exc.__class__.__name__


def fetch_imds(client, expected_macs=()):
    """The instance's ENIs from IMDS; raises ImdsError on any doubtful answer.
    `expected_macs`: NICs seen here, which IMDS should list."""
    client.connect()
    try:
        primary = parse_mac(client.get("mac", missing_ok=False))
        macs = listed_macs(client, expected_macs)
        if primary not in macs:
            raise ImdsError("the primary MAC %s is not among the ENIs" % primary)
        enis = {}
        for mac in macs:
            enis[mac] = fetch_imds_eni(client, mac, is_primary=(mac == primary))
    finally:
        client.close()
    return Imds(primary, enis)


def listed_macs(client, expected_macs):
    """The MACs IMDS lists, asked again while a NIC of this instance is missing
    from them (an ENI attached a moment ago), as long as time is left."""
    delay = 0.1
    while True:
        listing = client.get("network/interfaces/macs/", missing_ok=False)
        macs = [parse_mac(line.strip().rstrip("/")) for line in listing.split() if line.strip()]
        missing = set(expected_macs) - set(macs)
        if not missing or client.remaining() < delay:
            if missing:
                log.info("not listed by IMDS (yet): %s", ", ".join(sorted(missing)))
            return macs
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def fetch_imds_eni(client, mac, is_primary):
    """One ENI's meta-data. A listed ENI may 404 or say device 0 for a moment."""
    base = "network/interfaces/macs/%s/" % mac

    def field(name, retry_missing=False):
        return client.get(base + name, retry_missing=retry_missing)

    device_number = parse_int(field("device-number", retry_missing=True), "device-number")
    while device_number == 0 and not is_primary and client.remaining() > 0.1:
        time.sleep(0.1)  # a just-attached ENI reports 0 before its real number
        device_number = parse_int(field("device-number", retry_missing=True), "device-number")
    if device_number == 0 and not is_primary:
        raise ImdsError("%s: device-number stays 0 for a secondary ENI" % mac)
    card = field("network-card")
    return ImdsEni(
        mac=mac, device_number=device_number,
        network_card=0 if card is None else parse_int(card, "network-card"),
        interface_id=(field("interface-id") or "").strip(),
        ipv4s=parse_addresses(field("local-ipv4s", retry_missing=True), 4, "local-ipv4s"),
        ipv6s=parse_addresses(field("ipv6s"), 6, "ipv6s"),
        subnets4=parse_networks(field("subnet-ipv4-cidr-block"), 4, "subnet-ipv4-cidr-block"),
        subnets6=parse_networks(field("subnet-ipv6-cidr-blocks"), 6, "subnet-ipv6-cidr-blocks"),
        prefixes4=parse_networks(field("ipv4-prefix"), 4, "ipv4-prefix"),
        prefixes6=parse_networks(field("ipv6-prefix"), 6, "ipv6-prefix"))


def parse_mac(text):
    """A MAC address, lower case; ImdsError for anything else."""
    mac = (text or "").strip().lower()
    if not re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", mac):
        raise ImdsError("not a MAC address: %r" % mac[:40])
    return mac


def parse_int(text, what):
    """A small non-negative integer from IMDS."""
    value = (text or "").strip()
    if not value.isdigit() or int(value) > 255:
        raise ImdsError("%s is not a small number: %r" % (what, value[:40]))
    return int(value)


def parse_addresses(text, family, what):
    """Newline-separated addresses of one family; () for a missing field."""
    return tuple(str(a) for a in parse_values(text, family, what, ipaddress.ip_address))


def parse_networks(text, family, what):
    """Newline-separated networks of one family; () for a missing field."""
    return tuple(parse_values(text, family, what, lambda v: ipaddress.ip_network(v, strict=False)))


def parse_values(text, family, what, parse):
    values = []
    for word in (text or "").split():
        try:
            value = parse(word)
        except ValueError:
            raise ImdsError("%s: not an address: %r" % (what, word[:60]))
        if value.version != family:
            raise ImdsError("%s: %s is not IPv%d" % (what, word, family))
        values.append(value)
    return values


# -- Choosing the ENIs (pure). ----------------------------------------------------

def looks_like_eni(link, sysfs):
    """A NIC with an ENI's driver, not enslaved to a bond or bridge."""
    has_device, driver = sysfs.get(link.name, (False, None))
    return has_device and driver in ENI_DRIVERS and link.master is None and bool(link.mac)


def managed_tables(system):
    """Interface name -> table the tool routes it with now (survives IMDS gaps)."""
    tables = {}
    for route in system.routes:
        tables.setdefault(route.dev, route.table)
    return tables


def select_enis(system, imds, include=(), exclude=(), add_from_imds=True, owned_addresses=frozenset()):
    """The ENIs to route, primary first, each with its addresses, subnets and gateways.
    `owned_addresses` are those the tool added earlier (from its state record)."""
    links = {link.name: link for link in system.links}
    known = managed_tables(system)
    if include:
        candidates = [(links[name], imds and imds.enis.get(links[name].mac)) for name in unique(include)]
    elif imds:
        candidates = imds_candidates(system.links, imds)
    else:
        candidates = [(link, None) for link in fallback_nics(system)]
    if not include:  # an ENI routed before but missing from this answer stays
        names = {link.name for link, _ in candidates}
        for name in sorted(known):
            if name in links and name not in names:
                log.warning("%s is routed but missing from the current answer: kept as it is", name)
                candidates.append((links[name], None))
    candidates = [(link, meta) for link, meta in candidates if link.name not in exclude]
    for link in [link for link, _ in candidates if not link.up]:
        log.info("%s is down: routed once it is up (the hotplug and network hooks re-run)", link.name)
    candidates = [(link, meta) for link, meta in candidates if link.up]
    owned = {(a.dev, a.cidr.split("/")[0]) for a in owned_addresses}
    return [build_eni(link, device, card, meta, system.main_routes, add_from_imds, owned, system.ipv6)
            for (link, meta), (card, device) in zip(candidates, numbers_of(candidates, known))]


def imds_candidates(links, imds):
    """(link, IMDS data) of the ENIs IMDS lists that have an interface here."""
    by_mac = {link.mac: link for link in links if link.mac}
    candidates = []
    for mac, meta in sorted(imds.enis.items(), key=lambda item: (
            item[0] != imds.primary_mac, item[1].network_card, item[1].device_number)):
        if mac in by_mac:
            candidates.append((by_mac[mac], meta))
        else:
            log.info("ENI %s (%s) has no interface here yet", meta.interface_id or mac, mac)
    return candidates


def fallback_nics(system):
    """Without IMDS: the NICs with an ENI driver, the one with main's default route first."""
    nics = [link for link in system.links if looks_like_eni(link, system.sysfs)]
    default_devs = [r.dev for r in system.main_routes if r.family == 4 and r.dst == "default"]
    return sorted(nics, key=lambda link: (link.name not in default_devs[:1], link.index))


def numbers_of(candidates, known):
    """(network card, device number) of each candidate, all different. IMDS's
    numbers are the ENI's own; without them an interface keeps the table it is
    routed with, and a new one takes the lowest free number (0 for the primary)."""
    taken = {(meta.network_card, meta.device_number) for _, meta in candidates if meta}
    numbers = []
    for position, (link, meta) in enumerate(candidates):
        if meta:
            number = (meta.network_card, meta.device_number)
        else:
            number = divmod(known[link.name] - TABLE_BASE, 100) if link.name in known else None
            if number is None or number in taken:
                number = lowest_free_number(taken, primary=(position == 0))
            taken.add(number)
        numbers.append(number)
    if len(set(numbers)) < len(numbers):
        raise ToolError("two ENIs have the same network card and device number in IMDS: %s"
                        % ", ".join(link.name for link, _ in candidates))
    return numbers


def lowest_free_number(taken, primary):
    """Device 0 is the primary's; others take the lowest free one on card 0."""
    if primary and (0, 0) not in taken:
        return (0, 0)
    return next((0, device) for device in range(1, 100) if (0, device) not in taken)


def build_eni(link, device_number, network_card, meta, main_routes, add_from_imds, owned=frozenset(),
              kernel_ipv6=True):
    """Combine what the interface has, what main says and what IMDS says.
    With a full IMDS answer, an address the tool added that IMDS no longer lists
    is neither kept nor routed; one the admin configured always stays."""
    # IMDS lists the ENI's primary IPv4 first; DHCP configures that one, so an
    # interface whose DHCP has not finished yet is left to it, not given a /32.
    ipv4, added4 = addresses_of(link.name, link.ipv4, meta and meta.ipv4s[1:], add_from_imds, owned)
    ipv6, added6 = addresses_of(link.name, link.ipv6, meta and meta.ipv6s, add_from_imds and kernel_ipv6, owned)
    connected = [r for r in main_routes if r.dev == link.name and r.gateway is None
                 and r.dst != "default" and not is_host_route(r.dst)]
    subnets4 = (meta.subnets4 if meta and meta.subnets4 else
                unique(ipaddress.ip_network(r.dst) for r in connected if r.family == 4)
                or networks_of(link.ipv4, 32))
    subnets6 = (meta.subnets6 if meta and meta.subnets6 else
                unique(ipaddress.ip_network(r.dst) for r in connected
                       if r.family == 6 and not ipaddress.ip_network(r.dst).is_link_local
                       and not ipaddress.ip_network(r.dst).is_multicast)
                or networks_of(link.ipv6, 128))
    gateway6 = next((r.gateway for r in main_routes if r.family == 6 and r.dst == "default"
                     and r.dev == link.name and r.gateway), None)
    if ipv6 and not gateway6:
        log.warning("%s has IPv6 addresses but no router learned from RAs (accept_ra?): "
                    "its IPv6 replies beyond its subnet are not routed through it", link.name)
    return Eni(
        name=link.name, mac=link.mac, device_number=device_number, network_card=network_card,
        ipv4=ipv4, ipv6=ipv6,
        added_ipv4=added4, added_ipv6=added6,
        subnets4=tuple(subnets4), subnets6=tuple(subnets6),
        gateway4=gateway4_of(link.name, subnets4, main_routes),
        gateway6=gateway6,
        prefixes4=tuple(meta.prefixes4) if meta else (), prefixes6=tuple(meta.prefixes6) if meta else (),
        origin="imds" if meta else "local")


def addresses_of(dev, configured, listed, add_from_imds, owned):
    """(addresses to route, addresses the tool adds or keeps) of one family."""
    mine = [a.ip for a in configured if (dev, a.ip) in owned]
    theirs = [a.ip for a in configured if (dev, a.ip) not in owned]
    if listed is None:  # no IMDS answer: what the tool added stays
        return tuple(theirs + mine), tuple(mine)
    added = tuple(a for a in listed if a not in theirs) if add_from_imds else ()
    return tuple(theirs) + added, added


def networks_of(addresses, host_length):
    """The subnets the addresses name (not /32 or /128 ones)."""
    return unique(ipaddress.ip_network("%s/%s" % a, strict=False) for a in addresses if a.prefixlen < host_length)


def is_host_route(dst):
    """A /32 or /128: an address's own route, never a subnet."""
    network = ipaddress.ip_network(dst)
    return network.prefixlen == network.max_prefixlen


def gateway4_of(dev, subnets4, main_routes):
    """The VPC router: the subnet's base + 1, else the default route DHCP set."""
    if subnets4:
        return str(subnets4[0].network_address + 1)
    return next((r.gateway for r in main_routes
                 if r.family == 4 and r.dst == "default" and r.dev == dev and r.gateway), None)


def unique(items):
    """Items in first-seen order, without repeats."""
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


# -- Plan (pure): the state the system should be in. ------------------------------

def plan(enis, mark_mask=DEFAULT_MARK_MASK):
    """The owned state that routes every ENI address through its own ENI."""
    addresses = frozenset(Address(eni.name, host_cidr(a)) for eni in enis
                          for a in eni.added_ipv4 + eni.added_ipv6)
    if len(enis) < 2:  # one ENI: main already routes it; only add its addresses
        return NOTHING._replace(addresses=addresses)
    rules, routes, marked = set(), set(), {4: [], 6: []}
    for eni in enis:
        for family in (4, 6):
            eni_rules, eni_routes = plan_family(eni, enis, family, mark_mask)
            rules |= eni_rules
            routes |= eni_routes
            if eni_rules:
                marked[family].append(eni)
    for family in (4, 6):
        if marked[family]:
            rules.add(Rule(family, PRIO_MAIN, None, None, TABLE_MAIN, 0))
    sysctls = {"net/ipv4/conf/%s/rp_filter" % eni.name: RP_FILTER_LOOSE for eni in marked[4]}
    return OwnedState(frozenset(rules), frozenset(routes),
                      plan_mangle(marked[4], mark_mask), plan_mangle(marked[6], mark_mask),
                      sysctls, addresses)


def plan_family(eni, enis, family, mark_mask):
    """One ENI's rules and table routes for one address family."""
    addrs = eni.ipv4 if family == 4 else eni.ipv6
    prefixes = eni.prefixes4 if family == 4 else eni.prefixes6
    own_subnets = eni.subnets4 if family == 4 else eni.subnets6
    gateway = eni.gateway4 if family == 4 else eni.gateway6
    sources = [host_cidr(a) for a in addrs] + [str(p) for p in prefixes]
    if not sources or not (gateway or own_subnets):
        return set(), set()
    table, slot = table_of(eni), slot_of(eni)
    routes = {Route(family, table, str(s), None, eni.name) for s in own_subnets}
    if gateway:
        other_subnets = {s for other in enis for s in (other.subnets4 if family == 4 else other.subnets6)}
        routes |= {Route(family, table, str(s), gateway, eni.name)
                   for s in other_subnets if s not in own_subnets}
        routes.add(Route(family, table, "default", gateway, eni.name))
    rules = {Rule(family, PRIO_FWMARK + slot, None, mark_of(eni, mark_mask), table, None)}
    for src in sources:
        rules.add(Rule(family, PRIO_SUBNETS + slot, src, None, table, 0))
        rules.add(Rule(family, PRIO_SOURCE + slot, src, None, table, None))
    return rules, routes


def mark_of(eni, mark_mask):
    """The ENI's connection mark as `value/mask`, slot + 1 shifted into the mask."""
    shift = (mark_mask & -mark_mask).bit_length() - 1
    value = (slot_of(eni) + 1) << shift
    if value & ~mark_mask:
        raise ToolError("mark mask %#x has no room for %s (slot %d): use a wider --mark-mask"
                        % (mark_mask, eni.name, slot_of(eni)))
    return "%#x/%#x" % (value, mark_mask)


def plan_mangle(enis, mark_mask):
    """Mark new connections per ingress ENI; restore the mark on everything else.
    Packets from an ENI return before the restore: only replies coming from
    containers, bridges or local sockets are steered by the mark."""
    if not enis:
        return NO_MANGLE
    restore = "-j CONNMARK --restore-mark --nfmask %#x --ctmask %#x" % (mark_mask, mark_mask)
    prerouting = []
    for eni in enis:
        prerouting.append("-i %s -m conntrack --ctstate NEW -j CONNMARK --set-xmark %s"
                          % (eni.name, mark_of(eni, mark_mask)))
        prerouting.append("-i %s -j RETURN" % eni.name)
    prerouting.append(restore)
    # Sorted, as parse_mangle returns them, so that equal states compare equal.
    return Mangle(
        jumps=tuple(sorted("%s -m comment --comment %s -j %s" % (hook, JUMP_COMMENT, chain)
                           for hook, chain in (("PREROUTING", CHAIN_PREROUTING), ("OUTPUT", CHAIN_OUTPUT)))),
        chains=tuple(sorted(((CHAIN_PREROUTING, tuple(prerouting)), (CHAIN_OUTPUT, (restore,))))))


# -- The state the tool owns now, in the plan's shape. ----------------------------

def originals_of(record):
    """Sysctl values from before the tool changed them: the one piece of state
    that cannot be read back from the system itself."""
    return {key: entry["original"] for key, entry in record.get("sysctls", {}).items()}


def owned_state(system, record):
    """What of the running system is the tool's: by marker, or by its state record."""
    present = {(link.name, a.ip) for link in system.links for a in link.ipv4 + link.ipv6}
    addresses = frozenset(Address(dev, cidr) for dev, cidr in record.get("addresses", [])
                          if (dev, cidr.split("/")[0]) in present)
    sysctls = {key: entry["set"] for key, entry in record.get("sysctls", {}).items()}
    return OwnedState(frozenset(system.rules), frozenset(system.routes),
                      system.mangle4, system.mangle6, sysctls, addresses)


# -- Diff (pure): the commands that take the system from current to desired. ------

def diff(desired, current, sysctl_values, originals):
    """Commands per tool, ordered so that nothing points at what is not there yet:
    addresses, then routes, then rules are added; removals run the other way.
    Rules are added highest priority first and removed lowest first: the kernel
    keeps them in a list by priority, so each one is then found near its head
    (at 15x50 that saves a sixth of the batch)."""
    ip = {4: [], 6: []}
    for family in (4, 6):
        ip[family] = (
            [address_command("add", a) for a in sorted(desired.addresses - current.addresses)
             if family_of(a.cidr) == family]
            + route_additions(desired.routes, current.routes, family)
            + [rule_command("add", r) for r in sorted(desired.rules - current.rules, key=rule_order,
                                                      reverse=True) if r.family == family]
            + [rule_command("del", r) for r in sorted(current.rules - desired.rules, key=rule_order)
               if r.family == family]
            + route_removals(desired.routes, current.routes, family)
            + [address_command("del", a) for a in sorted(current.addresses - desired.addresses)
               if family_of(a.cidr) == family])
    return Changes(
        ip4=ip[4], ip6=ip[6],
        iptables4=mangle_commands(desired.mangle4, current.mangle4),
        iptables6=mangle_commands(desired.mangle6, current.mangle6),
        sysctls=sysctl_writes(desired.sysctls, current.sysctls, sysctl_values, originals))


def family_of(cidr):
    return 6 if ":" in cidr else 4


def rule_order(rule):
    return (rule.priority, rule.src or "", rule.fwmark or "", rule.table)


def route_order(route):
    """Connected routes first: a gateway must be reachable when its route is added."""
    return (route.table, route.gateway is not None, route.dst == "default", route.dst)


def route_additions(desired, current, family):
    """`replace` for a route the tool owns already (a new gateway, say); `add` for
    a new one, so that a foreign route in the same table fails loudly instead of
    being overwritten."""
    owned_keys = {(r.table, r.dst) for r in current}
    wanted = sorted((r for r in desired - current if r.family == family), key=route_order)
    return [route_command("replace" if (r.table, r.dst) in owned_keys else "add", r) for r in wanted]


def route_removals(desired, current, family):
    """Removals, except routes a `replace` above already overwrote (same table, dst)."""
    replaced = {(r.table, r.dst) for r in desired}
    stale = sorted((r for r in current - desired if r.family == family
                    and (r.table, r.dst) not in replaced), key=route_order, reverse=True)
    return [route_command("del", r) for r in stale]


def rule_command(verb, rule):
    words = ["rule", verb, "priority", str(rule.priority)]
    if rule.src:
        words += ["from", rule.src]
    if rule.fwmark:
        words += ["fwmark", rule.fwmark]
    words += ["table", "main" if rule.table == TABLE_MAIN else str(rule.table)]
    if rule.suppress is not None:
        words += ["suppress_prefixlength", str(rule.suppress)]
    return " ".join(words + ["protocol", str(RT_PROTO)])


def route_command(verb, route):
    words = ["route", verb, route.dst]
    if route.gateway:
        words += ["via", route.gateway]
    return " ".join(words + ["dev", route.dev, "table", str(route.table), "proto", str(RT_PROTO)])


def address_command(verb, address):
    # nodad: the VPC already guarantees the address is this ENI's alone;
    # noprefixroute: a /128 needs no route in main (local delivery is in `local`).
    extra = " nodad noprefixroute" if verb == "add" and family_of(address.cidr) == 6 else ""
    return "address %s %s dev %s%s" % (verb, address.cidr, address.dev, extra)


def mangle_commands(desired, current):
    """iptables-restore lines (table mangle) turning current into desired; [] if equal.
    Chains are rebuilt whole: one restore commits them atomically."""
    if desired == current:
        return []
    lines = []
    current_chains = dict(current.chains)
    for name, specs in desired.chains:
        lines.append(("-F %s" if name in current_chains else "-N %s") % name)
        lines += ["-A %s %s" % (name, spec) for spec in specs]
    for jump in current.jumps:
        if jump not in desired.jumps or current.jumps.count(jump) > 1:
            lines.append("-D " + jump)
    for jump in desired.jumps:
        if jump not in current.jumps or current.jumps.count(jump) > 1:
            hook, _, spec = jump.partition(" ")
            lines.append("-I %s 1 %s" % (hook, spec))
    for name, _ in current.chains:
        if name not in dict(desired.chains):
            lines += ["-F %s" % name, "-X %s" % name]
    return lines


def sysctl_writes(desired, owned, values, originals):
    """(key, new, old) writes: set what the plan wants, and give back the original
    of what it no longer wants, unless someone else changed it since."""
    writes = []
    for key, value in sorted(desired.items()):
        if values.get(key) is not None and values[key] != value:
            writes.append((key, value, values[key]))
    for key, ours in sorted(owned.items()):
        original = originals.get(key)
        if key not in desired and values.get(key) == ours and original not in (None, ours):
            writes.append((key, original, ours))
    return writes


def annotate(command):
    if command.startswith("address add"):
        return command + "  # assigned in IMDS, not configured"
    if command.startswith("address del"):
        return command + "  # added by this tool, no longer assigned"
    return command


def is_empty(changes):
    return not any(changes)


def render(changes):
    """The changes as the exact commands, one per line, for --dry-run and logs.
    Address lines say why, as a shell comment: the tool only adds and removes
    addresses that IMDS assigns (or assigned) to the ENI."""
    lines = ["ip -4 " + annotate(c) for c in changes.ip4] + ["ip -6 " + annotate(c) for c in changes.ip6]
    lines += ["iptables -t mangle " + c for c in changes.iptables4]
    lines += ["ip6tables -t mangle " + c for c in changes.iptables6]
    lines += ["sysctl -w %s=%s" % (key.replace("/", "."), new) for key, new, _ in changes.sysctls]
    return lines


# -- Apply: one batch per tool; the state record; verify; roll back. --------------

def apply_changes(programs, changes, fail_after=0):
    """Run the batches, ip and iptables-restore per family, all at once (they
    touch independent parts of the kernel, and each is ordered in itself);
    then the sysctls. `fail_after` N > 0 (a test hook) fails the run after its
    Nth step; the batches finish together, so for N up to their number all ran."""
    batches = [(argv, "\n".join(lines) + "\n") for argv, lines in [
        ([programs["ip"], "-4", "-batch", "-"], changes.ip4),
        ([programs["ip"], "-6", "-batch", "-"], changes.ip6),
        ([programs["iptables-restore"], "-w", "10", "--noflush"], mangle_script(changes.iptables4)),
        ([programs["ip6tables-restore"], "-w", "10", "--noflush"], mangle_script(changes.iptables6)),
    ] if lines]
    run_together(batches)
    done = len(batches)
    if changes.sysctls and not 0 < fail_after <= done:
        write_sysctls(changes.sysctls)
        done += 1
    if 0 < fail_after <= done:
        raise ToolError("failure injected after step %d (MULTI_ENI_ROUTING_FAIL_AFTER)" % fail_after)


def mangle_script(lines):
    """iptables-restore input for the mangle table, applied atomically; with
    --noflush the other chains stay as they are. [] for no change."""
    return ["*mangle"] + lines + ["COMMIT"] if lines else []


def write_sysctls(writes):
    for key, value, _ in writes:
        log.debug("sysctl: %s = %s", key, value)
        with open("/proc/sys/" + key, "w") as handle:
            handle.write(value)


def state_path(state_dir, netns):
    """The state record of this network namespace."""
    return os.path.join(state_dir, "state.json" if netns is None else "state-netns-%d.json" % netns)


def load_record(path):
    """The state record: sysctl originals and addresses the tool added."""
    try:
        with open(path) as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ToolError("cannot read the state record %s: %s" % (path, exc))
    return record if isinstance(record, dict) else {}


def save_record(path, record, unchanged_from=None):
    """Write the record atomically; remove it when there is nothing to remember."""
    if record == unchanged_from:
        return
    if not record.get("sysctls") and not record.get("addresses"):
        if os.path.exists(path):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


def merge_record(record, desired, changes):
    """The record after this run: originals kept from the first change on, and
    the addresses the tool added. Written before applying, so that a crash
    midway still knows what to give back."""
    sysctls = dict(record.get("sysctls", {}))
    for key, new, old in changes.sysctls:
        if key in desired.sysctls:
            sysctls.setdefault(key, {"original": old, "set": new})
    addresses = {tuple(a) for a in record.get("addresses", [])}
    addresses |= {(a.dev, a.cidr) for a in desired.addresses}
    return {"sysctls": sysctls, "addresses": [list(a) for a in sorted(addresses)]}


def final_record(record, desired):
    """The record once the system matches `desired`."""
    return {"sysctls": {k: v for k, v in record.get("sysctls", {}).items() if k in desired.sysctls},
            "addresses": sorted([a.dev, a.cidr] for a in desired.addresses)}


class Run:
    """One converge run: reads the system, applies, verifies, rolls back."""

    def __init__(self, programs, state_file, fail_after=0):
        self.programs = programs
        self.state_file = state_file
        self.fail_after = fail_after
        self.record = {}
        self.outputs = {}

    def read(self, sources=ALL_SOURCES):
        """Read the system (again, only `sources`) and the state record;
        return (system, owned state)."""
        self.outputs.update(read_outputs(self.programs, sources))
        system = parse_system(self.outputs, read_sysfs(), ipv6_enabled())
        self.record = load_record(self.state_file)
        return system, owned_state(system, self.record)

    def changes(self, desired, owned):
        keys = set(desired.sysctls) | set(owned.sysctls)
        return diff(desired, owned, read_sysctls(keys), originals_of(self.record))

    def converge(self, desired, owned):
        """Apply, verify, and roll back to where it started if anything fails."""
        record = self.record
        changes = self.changes(desired, owned)
        if is_empty(changes):
            save_record(self.state_file, final_record(record, desired), unchanged_from=record)
            return changes
        merged = merge_record(record, desired, changes)
        save_record(self.state_file, merged)
        try:
            apply_changes(self.programs, changes, self.fail_after)
            _, now = self.read(sources_touched(changes))
            left = self.changes(desired, now)
            if not is_empty(left):
                raise ToolError("verification failed: still pending: %s" % render(left)[0])
        except (ToolError, OSError) as exc:
            self.roll_back(owned, record, changes)
            raise ToolError("%s; rolled back to the state before the run" % exc)
        save_record(self.state_file, final_record(merged, desired))
        return changes

    def roll_back(self, before, record, changes):
        """Converge back to the owned state read before the run."""
        try:
            _, now = self.read()
            undo = self.changes(before, now)
            undo = undo._replace(sysctls=[(key, old, new) for key, new, old in reversed(changes.sysctls)])
            apply_changes(self.programs, undo)
            save_record(self.state_file, record)
        except (ToolError, OSError) as exc:
            log.error("roll back failed too: %s", exc)


# -- Lock: boot and hotplug runs one after the other. -----------------------------

def take_lock(state_dir, timeout=LOCK_TIMEOUT):
    """An exclusive flock on <state_dir>/lock, waiting up to `timeout` seconds."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    handle = open(os.path.join(state_dir, "lock"), "a")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() > deadline:
                raise ToolError("another run holds %s for over %ds" % (handle.name, timeout))
            time.sleep(0.05)


# -- Status. ----------------------------------------------------------------------

def status_report(enis, owned, changes):
    """Per ENI: its table, addresses (with origin), gateways and owned rules."""
    anything = (owned.rules, owned.routes, owned.addresses, owned.sysctls,
                owned.mangle4 != NO_MANGLE, owned.mangle6 != NO_MANGLE)
    report = {"applied": any(anything),
              "in_sync": is_empty(changes), "pending": render(changes), "enis": []}
    for eni in enis:
        table = table_of(eni)
        added = set(eni.added_ipv4 + eni.added_ipv6) | {a.cidr.split("/")[0] for a in owned.addresses
                                                         if a.dev == eni.name}
        report["enis"].append({
            "name": eni.name, "mac": eni.mac, "device_number": eni.device_number,
            "network_card": eni.network_card, "table": table, "found_by": eni.origin,
            "addresses": [{"address": a, "origin": "imds" if a in added else "configured"}
                          for a in eni.ipv4 + eni.ipv6],
            "delegated_prefixes": [str(p) for p in eni.prefixes4 + eni.prefixes6],
            "gateway4": eni.gateway4, "gateway6": eni.gateway6,
            "rules": sum(1 for r in owned.rules if r.table == table),
            "routes": sum(1 for r in owned.routes if r.table == table)})
    return report


ORIGINS = {"configured": "configured", "imds": "added from IMDS"}


def print_status(report):
    state = ("in sync" if report["in_sync"] else "stale") if report["applied"] else "not applied"
    print("multi-eni-routing: %s" % state)
    for eni in report["enis"]:
        gateways = " and ".join(g for g in (eni["gateway4"], eni["gateway6"]) if g) or "none"
        print("%s: table %d (device %d, card %d, %s), gateway %s, %d rules, %d routes" % (
            eni["name"], eni["table"], eni["device_number"], eni["network_card"],
            "from IMDS" if eni["found_by"] == "imds" else "found locally", gateways,
            eni["rules"], eni["routes"]))
        for address in eni["addresses"]:
            print("    %s (%s)" % (address["address"], ORIGINS[address["origin"]]))
        for prefix in eni["delegated_prefixes"]:
            print("    %s (delegated prefix)" % prefix)
    for line in report["pending"]:
        print("  pending: " + line)


# -- Watch: converge again whenever the kernel reports a change that can matter. --
#
# One rtnetlink socket subscribed to links, IPv4/IPv6 addresses, rules and
# routes. A message matters when it changes what discovery reads: a link
# appearing, going, renamed or going down/up; a global address added or
# removed; a main-table default route (a gateway) added or removed; one of the
# tool's rules or routes (protocol RT_PROTO) removed by someone. A burst of
# those gives one converge, WATCH_QUIET after the last (at most WATCH_MAX_DELAY
# after the first); every --refresh seconds a converge asks IMDS anyway.
#
# Its own changes: a converge that adds or removes addresses or deletes its own
# rules causes messages that matter, so it is followed by one more converge,
# which finds everything in sync and changes nothing, hence causes nothing:
# the watcher settles. (Ignoring the messages that arrive during a
# converge instead would lose a change someone else made meanwhile, e.g. DHCP
# re-adding the address whose removal started the converge.)

NETLINK_ROUTE = 0
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWRULE, RTM_DELRULE = 32, 33
# Multicast groups, as bind() takes them: bit (RTNLGRP_x - 1).
WATCH_GROUPS = (1 << 0       # RTNLGRP_LINK
                | 1 << 4     # RTNLGRP_IPV4_IFADDR
                | 1 << 6     # RTNLGRP_IPV4_ROUTE
                | 1 << 7     # RTNLGRP_IPV4_RULE
                | 1 << 8     # RTNLGRP_IPV6_IFADDR
                | 1 << 10    # RTNLGRP_IPV6_ROUTE
                | 1 << 18)   # RTNLGRP_IPV6_RULE
IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDR = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst len, src len, tos, table, protocol, scope, type, flags
RTATTR = struct.Struct("=HH")  # length, type
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER = 1, 3, 10
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_TABLE = 15
RT_TABLE_COMPAT = 252  # in rtm_table when the number is over 255: the real one is in RTA_TABLE
FRA_PROTOCOL = 21
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000
RT_SCOPE_LINK = 253  # and host (254): not an address anyone reaches the ENI on
RECEIVE_BUFFER = 1 << 20  # room for a burst (a link going takes its routes along)
SO_RCVBUFFORCE = 33  # root may go beyond net.core.rmem_max (not in the socket module)

WATCH_QUIET = 0.25  # a burst of events has ended when none came for this long
WATCH_MAX_DELAY = 1.0  # ... or at the latest this long after its first event
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # retry of a failed converge: 1, 2, 4 .. 60 s
REFRESH_DEFAULT = 60.0
STOP_SIGNALS = ("SIGTERM", "SIGINT")
# The first apply's failures that no retry can mend: the watcher exits with them
# (a daemon's parent too, and no child stays).
FATAL_EXIT_CODES = (EXIT_USAGE, EXIT_NOT_ROOT, EXIT_MISSING_PROGRAM)

# What a netlink message says, if it can matter: `key` names the object,
# `state` is what discovery would see of it now (None: gone).
Event = collections.namedtuple("Event", "kind key state")


def netlink_messages(data):
    """(type, payload) of each message in one datagram."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size or offset + length > len(data):
            break  # truncated: the rest cannot be parsed
        yield kind, data[offset + NLMSG_HEADER.size:offset + length]
        offset += (length + 3) & ~3


def netlink_attributes(payload, offset):
    """{type: value bytes} of the attributes from `offset` on."""
    found = {}
    while offset + RTATTR.size <= len(payload):
        length, kind = RTATTR.unpack_from(payload, offset)
        if length < RTATTR.size or offset + length > len(payload):
            break
        found[kind & 0x3FFF] = payload[offset + RTATTR.size:offset + length]  # without NLA_F_ flags
        offset += (length + 3) & ~3
    return found


def parse_event(kind, payload):
    """The Event a message reports, or None when it cannot matter."""
    try:
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            return link_event(kind, payload)
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            return address_event(kind, payload)
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            return route_event(kind, payload)
        if kind == RTM_DELRULE:
            attributes = netlink_attributes(payload, RTMSG.size)  # fib_rule_hdr: 12 bytes too
            if attributes.get(FRA_PROTOCOL, b"")[:1] == bytes([RT_PROTO]):
                return Event("rule", None, None)
    except struct.error:  # shorter than its header: nothing to learn from it
        pass
    return None


def link_event(kind, payload):
    _, _, index, flags, _ = IFINFO.unpack_from(payload)
    if kind == RTM_DELLINK:
        return Event("link", index, None)
    attributes = netlink_attributes(payload, IFINFO.size)
    name = attributes.get(IFLA_IFNAME, b"").rstrip(b"\0").decode("utf-8", "replace")
    master = attributes.get(IFLA_MASTER)
    return Event("link", index, (name, attributes.get(IFLA_ADDRESS), master,
                                 flags & (IFF_UP | IFF_RUNNING | IFF_LOWER_UP)))


def address_event(kind, payload):
    family, prefixlen, _, scope, index = IFADDR.unpack_from(payload)
    if scope >= RT_SCOPE_LINK:
        return None
    attributes = netlink_attributes(payload, IFADDR.size)
    address = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
    return Event("address", (index, family, address, prefixlen), True if kind == RTM_NEWADDR else None)


def route_event(kind, payload):
    """Removal of one of the tool's routes; a main-table default route (the
    gateway the plan uses) added or removed."""
    family, dst_len, _, _, table, protocol, _, _, _ = RTMSG.unpack_from(payload)
    if protocol == RT_PROTO:
        return Event("route", None, None) if kind == RTM_DELROUTE else None
    table = struct.unpack("=I", netlink_attributes(payload, RTMSG.size).get(RTA_TABLE, b""))[0] \
        if table == RT_TABLE_COMPAT else table
    if table == TABLE_MAIN and dst_len == 0:
        return Event("gateway", family, None)
    return None


class KernelView:
    """The links and addresses as the messages so far described them; tells
    which message changes them (a lease renewed, a flag we do not read: no)."""

    def __init__(self):
        self.links, self.addresses = {}, set()

    def changes(self, event):
        """Whether `event` changes what discovery would read; records it."""
        if event.kind == "link":
            if self.links.get(event.key) == event.state:
                return False
            if event.state is None:
                del self.links[event.key]
                self.addresses = {a for a in self.addresses if a[0] != event.key}
            else:
                self.links[event.key] = event.state
            return True
        if event.kind == "address":
            known = event.key in self.addresses
            if event.state:
                self.addresses.add(event.key)
            else:
                self.addresses.discard(event.key)
            return known != bool(event.state)
        return True  # a rule or route of ours removed, a gateway changed

    def describe(self, event):
        if event.kind == "link":
            name = (event.state or self.links.get(event.key) or ("#%d" % event.key,))[0]
            return "link %s %s" % (name, "changed" if event.state else "gone")
        if event.kind == "address":
            address, prefixlen = event.key[2:]
            try:
                text = str(ipaddress.ip_address(address))
            except ValueError:
                text = "?"
            return "address %s/%d %s" % (text, prefixlen, "added" if event.state else "removed")
        return {"rule": "a rule of ours removed", "route": "a route of ours removed",
                "gateway": "a default route in main changed"}[event.kind]


class NetlinkWatch:
    """The rtnetlink socket, and the view of links and addresses it keeps."""

    def __init__(self):
        self.sock = None
        self.view = KernelView()
        self.open()

    def open(self):
        """Subscribe (again, on a new socket) and read the links and addresses."""
        import socket  # here: one-off runs do without its import time
        self.close()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        for option in (SO_RCVBUFFORCE, socket.SO_RCVBUF):  # the latter capped at rmem_max
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
                break
            except OSError:
                continue
        self.sock.bind((0, WATCH_GROUPS))
        self.sock.setblocking(False)
        self.resync()

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        if self.sock:
            self.sock.close()

    def resync(self):
        """Read all links and addresses anew (at start and after an overrun)."""
        self.view = KernelView()
        for request in (RTM_GETLINK, RTM_GETADDR):
            for event in dump(request):
                self.view.changes(event)

    def read(self):
        """The descriptions of the pending messages that matter; ["overrun"]
        when the kernel dropped some (ENOBUFS): then anything may have changed."""
        reasons = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return reasons
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.resync()
                reasons.append("netlink overrun: events were lost")
                continue
            for kind, payload in netlink_messages(data):
                event = parse_event(kind, payload)
                if event:
                    description = self.view.describe(event)  # before the view forgets a link's name
                    if self.view.changes(event):
                        reasons.append(description)


def dump(request):
    """The Events of a netlink dump (RTM_GETLINK, RTM_GETADDR), on a socket of its own."""
    import socket
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.settimeout(5)  # the kernel answers at once; never hang on it
        sock.bind((0, 0))
        body = struct.pack("=B3x", socket.AF_UNSPEC) + (b"\0" * 12 if request == RTM_GETLINK else b"\0" * 4)
        sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), request, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                  + body)
        events = []
        while True:
            for kind, payload in netlink_messages(sock.recv(65536)):
                if kind == NLMSG_DONE:
                    return events
                if kind == NLMSG_ERROR:
                    raise OSError("netlink dump refused")
                event = parse_event(kind, payload)
                if event:
                    events.append(event)
    finally:
        sock.close()


class Schedule:
    """When the next converge is due: WATCH_QUIET after the last event of a
    burst, at most WATCH_MAX_DELAY after its first; after a failure, not before
    the backoff (events do not shorten it: no crash loop); else every `refresh`."""

    def __init__(self, refresh, now, quiet=WATCH_QUIET, max_delay=WATCH_MAX_DELAY,
                 backoff_first=BACKOFF_FIRST, backoff_max=BACKOFF_MAX):
        self.refresh, self.quiet, self.max_delay = refresh, quiet, max_delay
        self.backoff_first, self.backoff_max = backoff_first, backoff_max
        self.first_event = self.last_event = None
        self.retry_at, self.backoff = None, 0.0
        self.refresh_at = now  # the first apply: at once

    def event(self, now):
        if self.first_event is None:
            self.first_event = now
        self.last_event = now

    def due(self):
        """The monotonic time of the next converge."""
        if self.first_event is not None:
            at = min(self.last_event + self.quiet, self.first_event + self.max_delay)
        else:
            at = self.refresh_at
        return at if self.retry_at is None else max(at, self.retry_at)

    def converging(self):
        """A converge starts: it sees every event so far."""
        self.first_event = self.last_event = None

    def succeeded(self, now):
        self.retry_at, self.backoff = None, 0.0
        self.refresh_at = now + self.refresh

    def failed(self, now):
        """Schedule the retry; return its delay."""
        self.backoff = min(self.backoff * 2, self.backoff_max) if self.backoff else self.backoff_first
        self.retry_at = self.refresh_at = now + self.backoff
        return self.backoff


class Stopped(BaseException):
    """SIGTERM or SIGINT: leave the loop (not an Exception: nothing swallows it)."""


def changing_system(frame):
    """Whether the interrupted code is applying (Run.converge, which verifies
    and rolls back): a stop then waits for it, so nothing is left half done."""
    while frame is not None:
        if frame.f_code is Run.converge.__code__:
            return True
        frame = frame.f_back
    return False


class Watcher:
    """The loop: converge, wait for events or the next refresh, converge again."""

    def __init__(self, args):
        self.args = args
        self.stop_requested = False
        self.say = self.print_line

    # -- output: stdout/stderr in the foreground (the journal), syslog as a daemon --

    def print_line(self, line, error=False):
        stream = sys.stderr if error else sys.stdout
        stream.write("%s%s\n" % ("%s: error: " % PROG if error else "", line))
        stream.flush()

    def on_stop_signal(self, signum, frame):
        if self.stop_requested:  # a second signal: the first is being handled
            return
        self.stop_requested = True
        if not changing_system(frame):
            raise Stopped()

    def converge(self, schedule, first=False):
        """One converge; its exit code. Failures are logged and scheduled for a
        retry, except the first apply's that no retry can mend: raised."""
        schedule.converging()
        started = time.monotonic()
        try:
            code = execute(self.args, started, report=self.report)
        except ToolError as exc:
            if first and exc.exit_code in FATAL_EXIT_CODES:
                raise
            return self.failed(schedule, str(exc), exc.exit_code)
        except Exception as exc:  # a bug or an unforeseen system error: retried all the same
            return self.failed(schedule, "unexpected %s: %s" % (exc.__class__.__name__, exc), EXIT_FAILURE)
        schedule.succeeded(time.monotonic())
        return code

    def report(self, line, changes):
        if is_empty(changes):
            log.info("%s", line)
        elif not self.args.quiet:
            self.say(line)
        sd_notify("STATUS=" + line)

    def failed(self, schedule, message, code):
        delay = schedule.failed(time.monotonic())
        self.say("apply failed: %s; retrying in %.0f s" % (message, delay), error=True)
        sd_notify("STATUS=apply failed: %s; retrying in %.0f s" % (message, delay))
        return code

    def run(self):
        """Apply, then watch until stopped; the exit code."""
        previous = {name: signal.signal(getattr(signal, name), self.on_stop_signal) for name in STOP_SIGNALS}
        events = pidfile = None
        try:
            try:
                events = NetlinkWatch()  # before the first apply: no change slips through
            except OSError as exc:
                raise ToolError("cannot watch the kernel's routing messages (netlink): %s"
                                % (exc.strerror or exc))
            schedule = Schedule(self.args.refresh, time.monotonic())
            code = self.converge(schedule, first=True)
            if self.args.daemon:
                detached = self.daemonize()
                if not detached:  # the parent: the first apply's exit code, if the child started
                    return code if detached is False else EXIT_FAILURE
                pidfile = self.args.pidfile  # written by the child before the parent left
            elif self.args.pidfile:
                pidfile = write_pidfile(self.args.pidfile)
            sd_notify("READY=1")
            self.loop(events, schedule)
        except Stopped:
            pass
        finally:
            if events:
                events.close()
            if pidfile:
                remove_pidfile(pidfile)
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)
        sd_notify("STOPPING=1")
        log.info("stopped; the routing stays applied")
        return EXIT_OK

    def loop(self, events, schedule):
        poller = select.poll()
        poller.register(events, select.POLLIN)
        while not self.stop_requested:
            wait = schedule.due() - time.monotonic()
            if wait <= 0:
                self.converge(schedule)
            elif poller.poll(max(1, int(wait * 1000 + 1))):
                try:
                    reasons = events.read()
                except OSError as exc:  # unforeseen: a new socket, and converge as after an overrun
                    log.error("reading netlink messages failed (%s): watching anew", exc.strerror or exc)
                    poller.unregister(events)
                    events.open()
                    poller.register(events, select.POLLIN)
                    reasons = ["netlink error"]
                if reasons:
                    log.info("converge soon: %s", "; ".join(reasons[:5]) + (
                        " (and %d more)" % (len(reasons) - 5) if len(reasons) > 5 else ""))
                    schedule.event(time.monotonic())

    def daemonize(self):
        """Fork. The parent waits until the child has written the pid file and
        returns False (None if the child could not); the child detaches (own
        session, /, no terminal), logs to syslog, and returns True."""
        ready_read, ready_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork():
            os.close(ready_write)
            started = os.read(ready_read, 1) == b"1"  # b"" if the child died first
            os.close(ready_read)
            return False if started else None
        os.close(ready_read)
        os.setsid()
        try:
            write_pidfile(self.args.pidfile)
        except ToolError as exc:  # still on the caller's stderr: say why, once
            sys.stderr.write("%s: error: %s\n" % (PROG, exc))
            sys.stderr.flush()
            os._exit(EXIT_FAILURE)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        self.log_to_syslog()
        os.write(ready_write, b"1")
        os.close(ready_write)
        return True

    def log_to_syslog(self):
        import syslog
        syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_DAEMON)
        priorities = {Log.DEBUG: syslog.LOG_DEBUG, Log.INFO: syslog.LOG_INFO,
                      Log.WARNING: syslog.LOG_WARNING, Log.ERROR: syslog.LOG_ERR}

        def emit(level, label, message, args):
            if level >= log.level:
                syslog.syslog(priorities.get(level, syslog.LOG_INFO), message % args if args else message)

        log.emit = emit
        self.say = lambda line, error=False: syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_INFO, line)


def write_pidfile(path):
    """Write our pid to `path` atomically; return the path."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(temporary, "w") as handle:
            handle.write("%d\n" % os.getpid())
        os.replace(temporary, path)
    except OSError as exc:
        raise ToolError("cannot write the pid file %s: %s" % (path, exc.strerror or exc))
    return path


def remove_pidfile(path):
    """Remove the pid file if it is still ours."""
    try:
        with open(path) as handle:
            if handle.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


def sd_notify(message):
    """Tell systemd (Type=notify) how we are; nothing without NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket name
    import socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8", "replace"), address)
    except OSError as exc:
        log.debug("sd_notify: %s", exc)


def watch(args):
    """--watch: a long-running process, so the cyclic garbage collector is back
    on (main() turned it off for one-off runs)."""
    gc.enable()
    return Watcher(args).run()


# -- Command line. ----------------------------------------------------------------

EPILOG = (
    "Everything the tool adds carries its marker: rules and routes protocol %d (tables %d-%d), "
    "mangle chains %s and %s, and a state record for the sysctls it changed and the addresses "
    "it added. Flush removes exactly that. Exit codes: 0 success; 1 failure (nothing changed, or "
    "the run was rolled back), or with --status applied but stale; 2 bad usage; 3 with --status: "
    "nothing applied; "
    "4 not root; 5 a required program is missing.")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), like every other error of the tool."""

    def error(self, message):
        if self.raise_errors:
            raise ValueError(message)
        sys.stderr.write("%s: error: %s (see --help)\n" % (self.prog, message))
        sys.exit(EXIT_USAGE)

    raise_errors = False


def parse_args(argv):
    """The options: the command line's, after those of --options-file FILE.
    A flush never fails on a bad options file: it warns and goes on without it,
    so that stopping always removes the routing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.options_file and args.flush:
        args = flush_args(parser, args, argv)
    elif args.options_file:
        args = parser.parse_args(read_options_file(args.options_file) + argv)
    if args.json and not args.status:
        parser.error("--json goes with --status")
    check_watch_args(parser, args)
    return args


def flush_args(parser, args, argv):
    """A flush with a bad options file still uses what it can of it (--state-dir
    says where the sysctls to give back are recorded), else only the command line."""
    parser.raise_errors, problem = True, None
    try:
        words = read_options_file(args.options_file, for_flush=True)
        try:
            return parser.parse_args(words + argv)
        except ValueError as exc:
            problem = exc
        return parser.parse_known_args(words + argv)[0]
    except ValueError as exc:
        problem = exc
        return args
    finally:
        parser.raise_errors = False
        if problem and not args.quiet:  # -q: the unit's stop; the start said it already
            log.warning("flushing despite the options file %s: %s", args.options_file, problem)


def read_options_file(path, for_flush=False):
    """The words of an options file: the tool's arguments, split like a shell
    would (quotes, # comments) but with no expansion of any kind. The old
    format, MULTI_ENI_ROUTING_OPTS="...", is read too; other assignments of
    the old format (hotplug settings) are ignored."""
    try:
        with open(path) as options:
            words = shlex.split(options.read(), comments=True)
    except (OSError, ValueError) as exc:
        if for_flush:
            raise ValueError(exc)
        sys.stderr.write("%s: error: options file %s: %s\n" % (PROG, path, exc))
        sys.exit(EXIT_USAGE)
    found = []
    for word in words:
        name, assigned, value = word.partition("=")
        if assigned and name == "MULTI_ENI_ROUTING_OPTS":
            found += shlex.split(value)
        elif not (assigned and name.startswith("MULTI_ENI_ROUTING_")):
            found.append(word)
    return found


def build_parser():
    # "multi-eni-routing" as the pip console script, the file's name otherwise
    prog = PROG if os.path.basename(sys.argv[0]) == PROG else "multi-eni-routing.py"
    parser = OneLineParser(
        prog=prog,
        description="Give every ENI of this EC2 instance its own policy routing, so that "
                    "every address of every ENI answers through its own ENI. Without an "
                    "action: apply (converge to the plan; safe to repeat).",
        epilog=EPILOG % (RT_PROTO, TABLE_BASE, TABLE_LAST, CHAIN_PREROUTING, CHAIN_OUTPUT))
    action = parser.add_mutually_exclusive_group()
    action.add_argument("-f", "--flush", action="store_true",
                        help="remove every rule, route, chain and address the tool added and give "
                             "back the sysctls it changed; touches nothing else")
    action.add_argument("--status", action="store_true",
                        help="show what is applied per ENI; exit 0 in sync, 1 stale, 3 not applied")
    action.add_argument("--watch", action="store_true",
                        help="apply, then stay in the foreground and apply again within seconds "
                             "whenever a link, an address, a gateway or one of the tool's rules or "
                             "routes changes (kernel netlink messages), and every --refresh seconds "
                             "(which also asks IMDS for addresses assigned or unassigned in EC2); "
                             "a failed apply is retried with backoff. SIGTERM or SIGINT ends it "
                             "(exit 0) leaving the routing applied. Tells systemd (Type=notify) "
                             "when the first apply is done")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="print the commands apply (or flush, with -f) would run, change nothing")
    parser.add_argument("--json", action="store_true", help="with --status: machine-readable output")
    parser.add_argument("-i", "--interface", action="append", default=[], metavar="NAME",
                        help="route exactly these interfaces as the ENIs, the first being the "
                             "primary (repeatable); default: the ENIs IMDS lists")
    parser.add_argument("-x", "--exclude", action="append", default=[], metavar="NAME",
                        help="never route this interface (repeatable)")
    parser.add_argument("--no-imds", action="store_true",
                        help="never contact the instance metadata service; route the NICs with an "
                             "ENI driver (ena, ixgbevf, vif), or those named with -i")
    parser.add_argument("--no-imds-addresses", action="store_true",
                        help="route only the addresses configured on the interfaces; do not add "
                             "the secondary addresses IMDS lists")
    parser.add_argument("--imds-timeout", type=seconds_arg, default=5.0, metavar="SECONDS",
                        help="bound on all IMDS requests with retries (default 5); an IMDS that "
                             "does not answer at all is given up on within 2 s")
    parser.add_argument("--mark-mask", type=mark_mask_arg, default=DEFAULT_MARK_MASK, metavar="MASK",
                        help="connmark bits the tool may use (default %#x)" % DEFAULT_MARK_MASK)
    parser.add_argument("--refresh", type=refresh_arg, default=None, metavar="SECONDS",
                        help="with --watch: apply (and ask IMDS) at least this often, even without "
                             "events (default %d; 1 to 86400)" % REFRESH_DEFAULT)
    parser.add_argument("--daemon", action="store_true",
                        help="with --watch and --pidfile, for hosts without systemd: after the first "
                             "apply, detach and log to syslog; exit with the first apply's code")
    parser.add_argument("--pidfile", metavar="FILE",
                        help="with --watch: write the watcher's pid to FILE, removed when it ends")
    parser.add_argument("--state-dir", default=STATE_DIR, metavar="DIR",
                        help="where the lock and the state record live (default %s)" % STATE_DIR)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output (-vv: commands)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less output")
    parser.add_argument("--options-file", metavar="FILE",
                        help="read options from FILE first (words as in a shell, # comments, no "
                             "expansion); the command line's come after them")
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    return parser


def check_watch_args(parser, args):
    """--refresh, --daemon and --pidfile go with --watch, which changes the system."""
    for option, given in (("--refresh", args.refresh is not None), ("--daemon", args.daemon),
                          ("--pidfile", args.pidfile)):
        if given and not args.watch:
            parser.error("%s goes with --watch" % option)
    if args.watch and args.dry_run:
        parser.error("--watch changes the system: it does not go with --dry-run")
    if args.daemon and not args.pidfile:
        parser.error("--daemon needs --pidfile FILE")
    if args.pidfile:
        args.pidfile = os.path.abspath(args.pidfile)  # the daemon changes to /
    if args.refresh is None:
        args.refresh = REFRESH_DEFAULT


def refresh_arg(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % text)
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError("%r: give 1 <= SECONDS <= 86400" % text)
    return value


def seconds_arg(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r" % text)
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError("%r: give 0 < SECONDS <= 300" % text)
    return value


def mark_mask_arg(text):
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)
    run_of_bits = value >> ((value & -value).bit_length() - 1) if value > 0 else 0
    if not 0 < value <= 0xFFFFFFFF or run_of_bits & (run_of_bits + 1):
        raise argparse.ArgumentTypeError("%r is not one run of set bits" % text)
    return value


def setup_logging(verbose, quiet):
    """-v and -q are counters: -v info, -vv every command; -q errors only."""
    log.level = {-1: Log.ERROR, 0: Log.WARNING, 1: Log.INFO}.get(max(-1, min(verbose - quiet, 2)), Log.DEBUG)


def discover_imds(args, system):
    """IMDS's view, or None (and why) when it is not asked or does not answer."""
    if args.no_imds:
        return None
    named = set(args.interface)
    expected = {link.mac for link in system.links if link.name in named
                or (not named and looks_like_eni(link, system.sysfs) and link.name not in args.exclude)}
    try:
        return fetch_imds(ImdsClient(args.imds_timeout), expected)
    except ImdsError as exc:
        log.warning("instance metadata not usable (%s): using the interfaces found here", exc)
        return None


def check_interfaces(args, system):
    """-i naming a missing interface is a usage error for apply; flush and status
    must still work after that ENI was detached, so they only drop the name."""
    names = {link.name for link in system.links}
    missing = [name for name in args.interface if name not in names]
    if missing and not (args.flush or args.status):
        raise ToolError("no such interface: %s" % ", ".join(missing), EXIT_USAGE)
    if missing:
        log.warning("no such interface: %s (ignored)", ", ".join(missing))
        args.interface = [name for name in args.interface if name in names]


def main(argv=None):
    """Run the tool; return its exit code. Errors are one line on stderr."""
    # A short run that builds thousands of small objects and no cycles worth
    # collecting: the cyclic collector would only cost time (~5 ms at 15x50).
    gc.disable()
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    setup_logging(args.verbose, args.quiet)
    started = time.monotonic()
    try:
        if args.watch:
            return watch(args)
        return execute(args, started)
    except ToolError as exc:
        sys.stderr.write("%s: error: %s\n" % (PROG, exc))
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted\n" % PROG)
        return EXIT_FAILURE
    except Exception as exc:  # a bug or an unforeseen system error: still one line
        if log.level <= Log.DEBUG:
            import traceback
            traceback.print_exc()
        sys.stderr.write("%s: error: unexpected %s: %s (-vv shows where)\n"
                         % (PROG, exc.__class__.__name__, exc))
        return EXIT_FAILURE


def execute(args, started, report=None):
    """One run: apply (or flush, --status, --dry-run). An apply's one-line
    summary goes to report(line, changes) when given (the watcher), else stdout."""
    if os.geteuid() != 0:
        raise ToolError("must run as root", EXIT_NOT_ROOT)
    if kernel_version() < (4, 17):
        # Older kernels drop a rule's protocol: the tool could not recognise its
        # own rules, so it could neither keep them in sync nor remove them.
        raise ToolError("Linux %s is too old: ip rules carry their protocol from 4.17 on"
                        % os.uname().release)
    programs = find_programs(["ip", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore"])
    read_only = args.dry_run or args.status
    lock = None if read_only else take_lock(args.state_dir)
    try:
        fail_after = int(os.environ.get("MULTI_ENI_ROUTING_FAIL_AFTER") or 0)
        this_run = Run(programs, state_path(args.state_dir, netns_id()), fail_after)
        system, owned = this_run.read()
        check_interfaces(args, system)
        enis, desired = desired_state(args, system, owned)
        if args.status:
            return show_status(args, enis, owned, this_run.changes(desired, owned))
        if args.dry_run:
            changes = this_run.changes(desired, owned)
            print("\n".join(render(changes)) if not is_empty(changes) else "in sync: nothing to do")
            return EXIT_OK
        changes = this_run.converge(desired, owned)
        line = summary(args, enis, desired, changes, started)
        if report:
            report(line, changes)
        elif not args.quiet:
            print(line)
        return EXIT_OK
    finally:
        if lock:
            lock.close()


def desired_state(args, system, owned):
    """(ENIs, owned state to converge to): empty for a flush."""
    if args.flush:
        return [], NOTHING
    imds = discover_imds(args, system)
    enis = select_enis(system, imds, args.interface, args.exclude,
                       add_from_imds=not args.no_imds_addresses, owned_addresses=owned.addresses)
    for eni in enis:
        log.info("ENI %s: table %d, %s, %d IPv4 and %d IPv6 addresses", eni.name, table_of(eni),
                 "from IMDS" if eni.origin == "imds" else "found locally", len(eni.ipv4), len(eni.ipv6))
    desired = plan(enis, args.mark_mask)
    if imds is None:  # no full answer: never remove addresses added earlier
        desired = desired._replace(addresses=desired.addresses | owned.addresses)
    return enis, desired


def show_status(args, enis, owned, changes):
    """Print the status; its exit code: 0 in sync, 1 stale, 3 not applied."""
    report = status_report(enis, owned, changes)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_status(report)
    if not report["applied"]:
        return EXIT_NOT_APPLIED
    return EXIT_OK if report["in_sync"] else EXIT_FAILURE


def summary(args, enis, desired, changes, started):
    """One line saying what the run did."""
    elapsed = (time.monotonic() - started) * 1000
    count = len(render(changes))
    if args.flush:
        return "flushed: %d changes in %.0f ms" % (count, elapsed) if count else "flushed: nothing was applied"
    if not enis:
        return "nothing to do: no ENI found (not on EC2? name them with -i)"
    if len(enis) < 2 and not desired.rules:
        return "%s; one ENI needs no policy routing" % ("applied: %d change(s)" % count if count else "nothing to do")
    if is_empty(changes):
        return "in sync: nothing to do (%d ENIs, %d rules)" % (len(enis), len(desired.rules))
    return "applied: %d ENIs [%s], %d rules, %d routes: %d changes in %.0f ms" % (
        len(enis), ", ".join(e.name for e in enis), len(desired.rules), len(desired.routes), count, elapsed)


def exit_at_once(code):
    """Exit without tearing the interpreter down object by object (~4 ms of a
    50 ms run): by now every file is closed and the lock released; only the
    standard streams need flushing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


def console_main():
    """Entry point of the `multi-eni-routing` console script."""
    exit_at_once(main())


if __name__ == "__main__":
    exit_at_once(main())
