#!/usr/bin/env python3
"""multi-eni-routing: make every address of every ENI of an EC2 instance reachable.

The VPC drops a packet that leaves an ENI with a source address that ENI does not
own, and Linux routes by destination only, so replies from a secondary ENI's
addresses leave through the primary and are lost. This tool gives each ENI a
routing table, the rules that select it, connection marks for traffic whose
source is rewritten after routing (DNAT), and the sysctls that go with them.

The file reads top to bottom as the data flows:

    discover (read-only: netlink, iptables-save, sysfs, IMDS) -> plan (pure) -> diff (pure)
      -> apply (one batch per tool) -> verify (re-read; roll back on failure)

Everything the tool creates carries its own marker (rule and route protocol 231,
its priority and table ranges, its iptables chains, its state file), so a flush
removes exactly that and nothing else.
"""

import _signal  # the built-in half of `signal`: nothing to import before the next line
import gc

if __name__ == "__main__":
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # SIGINT while starting: ended, nothing changed
    gc.disable()  # from the start, imports included: see run_as_program()

import collections
import contextlib
import errno
import fcntl
import io
import ipaddress
import os
import re
import select
import signal
import struct
import sys
import time

# argparse, json, shlex, subprocess and threading are imported where they are
# used: together they cost a third of starting `--version` (which needs none
# of them), and a status or a flush needs only some.

VERSION = "1.0.0"
PROG = "multi-eni-routing"

# -- Constants: the tool's markers and ranges, defined once. ----------------------

# Route and rule protocol. Unassigned in /etc/iproute2/rt_protos, so nothing else
# uses it; every rule and route the tool adds carries it.
RT_PROTO = 231

# One table per ENI: TABLE_BASE + its slot. Clear of amazon-ec2-net-utils
# (10000+), cloud-init (100+) and the VPC CNI (device + 1).
TABLE_BASE = 22000
TABLE_LAST = 22999

# Rule priorities, in the order the kernel walks them (per ENI: + its slot). The
# kernel walks rules one by one on every lookup a socket's cached route does not
# spare, so their number grows with ENIs, never with addresses.
PRIO_FWMARK = 20000  # +slot: replies of connections that came in on the ENI
PRIO_MAIN = 20200  # main, except routes through an ENI: docker, VPN and admin routes win
PRIO_SOURCE = 20300  # +slot: from the ENI's subnets, prefixes and (where needed) addresses
PRIO_LAST = 20399  # what the tool owns: protocol RT_PROTO rules in 20000-20399 (and PRIO_NETUTILS)
SLOTS_MAX = PRIO_LAST - PRIO_SOURCE + 1  # 100 ENIs; the mark mask may allow fewer

# The ENIs' link group: `lookup main suppress_ifgroup ENI_GROUP` lets main's routes
# win unless they go out through an ENI, so another ENI's route in main (a
# resolver route via eth0, an admin's route via eth0's router) never takes the
# traffic of an eth1 address. Links in this group are the tool's; the tool only
# moves links out of the default group 0, and back to it on flush.
ENI_GROUP = 231

# amazon-ec2-net-utils (installed by default on Amazon Linux 2023; Debian packages
# it too) gives every address of a secondary ENI a `from ADDR` rule at 10000 +
# 100 x network-card + device-number into the table of the same number: ahead of
# the tool's rules, so whatever it gets wrong for local sources stays wrong (a
# host address's reply to a local container goes out of the ENI instead of the
# bridge). The tool finds it by its program or by rules of that shape, and with
# --net-utils coexist (the default) leaves all of it alone, adding only
# `lookup main suppress_ifgroup ENI_GROUP` at PRIO_NETUTILS, just ahead of it:
# main's routes that do not go out through an ENI (docker bridges, VPNs) win
# there as they do at PRIO_MAIN ahead of the tool's own rules.
NETUTILS_PROGRAM = "/usr/bin/setup-policy-routes"  # its RPM's and Debian's path
NETUTILS_PRIO_FIRST = 10000
NETUTILS_PRIO_LAST = 13199  # 32 network cards (p5.48xlarge) x 100
PRIO_NETUTILS = 9900  # protocol RT_PROTO, like every rule of the tool's
NETUTILS_POLICIES = ("coexist", "ignore")

# Interface names that are safe as words of an `ip -batch` line (no `#` comment,
# quote or space) and as iptables interface names (no `+` wildcard).
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

# Connmark bits: clear of Kubernetes (0x4000, 0x8000), the VPC CNI (0x80) and
# Calico (0xffff0000). Mark of an ENI = (slot + 1) shifted into the mask; the
# mask's highest value (all its bits) marks a connection "seen, not from an
# ENI", so that its packets never reach the per-ENI rules again; 0 = not seen.
DEFAULT_MARK_MASK = 0x3F00

# The chain only a connection's first packets enter (per-ENI marking).
CHAIN_PREROUTING = "MULTI-ENI-PREROUTING"
# Versions before issue 16 also had this chain: recognised, so that an upgrade
# and a flush remove it.
CHAIN_OUTPUT = "MULTI-ENI-OUTPUT"
# Every rule of the tool's in a built-in chain (PREROUTING, OUTPUT) carries it.
JUMP_COMMENT = "multi-eni-routing"

# Loose reverse-path filtering: a DNATed packet's reverse route goes through
# the primary, so strict mode (1) would drop it on a secondary ENI.
RP_FILTER_LOOSE = "2"

IMDS_ENDPOINTS = ("169.254.169.254", "fd00:ec2::254")
IMDS_PORT = 80
IMDS_CONNECT_TIMEOUT = 0.8  # per endpoint: two silent ones are given up on within 2 s
IMDS_MAX_BODY = 64 * 1024  # a meta-data answer is a few hundred bytes
IMDS_TOKEN_TTL = 600  # seconds; the watcher uses a token again for up to IMDS_TOKEN_REUSE
IMDS_TOKEN_REUSE = 540  # ... so that it asks for one every 9 minutes, not with every poll

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
    """Messages on stderr (or syslog, for a daemon), filtered by level. (The
    logging module costs 5 ms of start-up, a tenth of an in-sync run.)"""

    DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

    def __init__(self):
        self.level = self.WARNING
        self.syslog = None

    def emit(self, level, label, message, args):
        if level < self.level:
            return
        text = message % args if args else message
        if self.syslog:
            self.syslog.syslog(SYSLOG_PRIORITIES[level], text)
        else:
            sys.stderr.write("%s: %s: %s\n" % (PROG, label, text))

    def to_syslog(self):
        """From now on, to syslog (a daemon has no stderr)."""
        import syslog
        syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_DAEMON)
        self.syslog = syslog

    def debug(self, message, *args):
        self.emit(self.DEBUG, "debug", message, args)

    def info(self, message, *args):
        self.emit(self.INFO, "info", message, args)

    def warning(self, message, *args):
        self.emit(self.WARNING, "warning", message, args)

    def error(self, message, *args):
        self.emit(self.ERROR, "error", message, args)


SYSLOG_PRIORITIES = {Log.DEBUG: 7, Log.INFO: 6, Log.WARNING: 4, Log.ERROR: 3}  # syslog's LOG_DEBUG .. LOG_ERR


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
#
# Each program is started with posix_spawn, its stdin, stdout and stderr pipes
# served by one poll loop: several run at once without threads, and with
# neither the subprocess module nor threading to import (a tenth of an apply's
# own time at 15x50, where the reads and batches take a few ms each).

PROGRAM_ENV = dict(os.environ, LC_ALL="C")
READ_SIZE = 1 << 16


class Running:
    """A program started by start(): its pid, its pipes (our ends), what
    is still to be written to it, and what it wrote."""

    def __init__(self, argv, pid, stdin, stdout, stderr, data):
        self.argv, self.pid, self.data, self.written = argv, pid, data, 0
        self.fds = {stdin: "stdin", stdout: "stdout", stderr: "stderr"}
        self.output = {"stdout": [], "stderr": []}
        self.returncode = None


def run(argv, stdin=None):
    """Run argv (never through a shell), return its stdout; raise CommandError,
    also when the program cannot be started at all."""
    return run_together([(argv, stdin)])[0]


def run_together(commands, alongside=None):
    """Run each (argv, stdin) at the same time, and `alongside()` meanwhile
    in this process; their outputs in order. The first failure is raised once
    all have ended."""
    started, errors = [], []
    try:
        for argv, stdin in commands:
            try:
                started.append(start(argv, stdin))
            except CommandError as exc:
                errors.append(exc)
                started.append(None)
        try:
            if alongside:
                alongside()
        finally:  # its failure too is raised once the programs have ended
            serve([running for running in started if running])
    except BaseException:
        stop([running for running in started if running])
        raise
    for running in started:
        if running and running.returncode != 0:
            errors.append(CommandError(running.argv, running.returncode, text_of(running.output["stderr"])))
    if errors:
        raise errors[0]
    return [text_of(running.output["stdout"]) for running in started]


def start(argv, stdin):
    """A Running for argv, its stdin the text given (none: empty); CommandError
    when it cannot be started. SIGPIPE and SIGXFSZ as a program expects them
    (Python ignores SIGPIPE); the signals the caller holds stay held."""
    log.debug("run: %s", " ".join(argv))
    pipes = [os.pipe() for _ in range(3)]  # close-on-exec: only the child's dup2 copies pass
    child, ours = (pipes[0][0], pipes[1][1], pipes[2][1]), (pipes[0][1], pipes[1][0], pipes[2][0])
    try:
        pid = os.posix_spawnp(argv[0], argv, PROGRAM_ENV, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, number) for number, fd in enumerate(child)])
    except OSError as exc:
        for fd in ours:
            os.close(fd)
        raise CommandError(argv, "127 (not started)", exc.strerror or str(exc))
    finally:
        for fd in child:
            os.close(fd)
    return Running(argv, pid, *ours, data=(stdin or "").encode())


def serve(programs):
    """Write each program's stdin, read its stdout and stderr until it closes
    them, then wait for it: all at once."""
    poller, owner = select.poll(), {}
    for running in programs:
        for fd, stream in running.fds.items():
            owner[fd] = running
            poller.register(fd, select.POLLOUT if stream == "stdin" else select.POLLIN)
    while owner:
        for fd, _ in poller.poll():
            running = owner[fd]
            if serve_stream(running, fd):
                poller.unregister(fd)
                del owner[fd]
                os.close(fd)
                del running.fds[fd]
    for running in programs:
        running.returncode = exit_code(os.waitpid(running.pid, 0)[1])


def serve_stream(running, fd):
    """Move one chunk through a ready pipe; whether it is done with."""
    stream = running.fds[fd]
    if stream != "stdin":
        data = os.read(fd, READ_SIZE)
        running.output[stream].append(data)
        return not data
    try:  # at most PIPE_BUF: a pipe that polls writable takes that much without blocking
        running.written += os.write(fd, running.data[running.written:running.written + select.PIPE_BUF])
    except BrokenPipeError:
        return True  # it ended without reading all: its exit code says how it went
    return running.written >= len(running.data)


def stop(programs):
    """After an exception (a stop signal in the watcher): the programs killed
    and waited for, their pipes closed."""
    for running in programs:
        for fd in running.fds:
            os.close(fd)
        running.fds = {}
        if running.returncode is None:
            try:
                os.kill(running.pid, signal.SIGKILL)
                os.waitpid(running.pid, 0)
            except OSError:
                pass  # waited for already


def exit_code(status):
    """A wait status as subprocess gives it: the exit code, or -N for signal N."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


def text_of(chunks):
    """A program's output as text (UTF-8; a byte that is not, replaced)."""
    return b"".join(chunks).decode("utf-8", "replace")


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

FAMILIES = (4, 6)

# A network interface as `ip -j address` shows it; `addresses` by family: its global
# addresses as LinkAddress.
Link = collections.namedtuple("Link", "name index mac master up group addresses")
LinkAddress = collections.namedtuple("LinkAddress", "ip prefixlen")  # strings as `ip` prints
# A main-table route: what DHCP, RAs and the kernel left (gateways, connected subnets).
MainRoute = collections.namedtuple("MainRoute", "family dst gateway dev")
# A rule of someone else's: only where it points matters (does it name an address?).
ForeignRule = collections.namedtuple("ForeignRule", "family priority src dst")
# An ENI as the plan sees it. `slot` numbers its table, rule priorities and mark;
# `origin` says who named it an ENI: "imds" or "local"; `families` maps 4 and 6
# to an EniFamily.
Eni = collections.namedtuple("Eni", "name index mac slot network_card device_number origin families")
# One address family of an ENI. `addresses`: to route (configured, or added from
# IMDS); `added`: those the tool adds or keeps; `subnets`: ipaddress networks;
# `prefixes`: delegated prefixes; `refused`: (address, why) that IMDS lists but
# something else routes elsewhere, so the tool does not add them.
EniFamily = collections.namedtuple("EniFamily", "addresses added subnets gateway prefixes refused")
# What the tool owns, in a form both the plan and the running system produce:
# rules, routes, mangle fragments by family, sysctls, added addresses, and the
# links it put in ENI_GROUP.
Rule = collections.namedtuple("Rule", "family priority src iif fwmark table suppress_prefixlength suppress_ifgroup")
Route = collections.namedtuple("Route", "family table dst gateway dev")
# Mangle: `jumps` = the tool's rules in the built-in chains ("HOOK spec", each
# with the JUMP_COMMENT), `chains` = ((name, (spec, ...)), ...).
Mangle = collections.namedtuple("Mangle", "jumps chains")
Address = collections.namedtuple("Address", "dev cidr")
OwnedState = collections.namedtuple("OwnedState", "rules routes mangle sysctls addresses groups")
# Everything discovery read from the system.
System = collections.namedtuple("System", "links main_routes rules foreign_rules routes mangle sysfs ipv6")

NO_MANGLE = Mangle((), ())
NOTHING = OwnedState(frozenset(), frozenset(), {4: NO_MANGLE, 6: NO_MANGLE}, {}, frozenset(),
                     frozenset())  # flushed


def table_of(eni):
    """The ENI's routing table number."""
    return TABLE_BASE + eni.slot


def rule(family, priority, table, src=None, iif=None, fwmark=None, suppress_ifgroup=None):
    """A Rule of the tool's, with the fields it does not use left out."""
    return Rule(family, priority, src, iif, fwmark, table, None, suppress_ifgroup)


# -- Discover: read-only. First the reads, then pure parsers of what they gave. ----

# What discovery reads, by name; parse_system takes the outputs under these
# names. The kernel's objects are read through rtnetlink in this process (see
# read_kernel below) as the entries `ip -j` prints for the command beside each
# name: what the parsers read, and what the lab tests compare them with. The
# mangle tables are read by their save programs.
KERNEL_READS = (
    ("addr", ("ip", "-j", "address", "show")),
    ("rule4", ("ip", "-j", "-4", "rule", "show")),
    ("rule6", ("ip", "-j", "-6", "rule", "show")),
    ("route4", ("ip", "-j", "-4", "route", "show", "table", "main")),
    ("route6", ("ip", "-j", "-6", "route", "show", "table", "main")),
    # The tool's routes: in its tables, never in local, whose route per address
    # (two per IPv4 address) would be most of the dump at 50 addresses per ENI.
    ("own4", ("ip", "-j", "-4", "route", "show", "table", "all", "proto", str(RT_PROTO))),
    ("own6", ("ip", "-j", "-6", "route", "show", "table", "all", "proto", str(RT_PROTO))),
    # The links without their addresses: what verify re-reads after changing
    # link groups alone (the addresses are twenty times as much at 50 per ENI).
    ("link", ("ip", "-j", "link", "show")),
)
PROGRAM_READS = (
    ("mangle4", ("iptables-save", "-t", "mangle")),
    ("mangle6", ("ip6tables-save", "-t", "mangle")),
)
ALL_SOURCES = frozenset(name for name, _ in KERNEL_READS + PROGRAM_READS) - {"link"}
IPV6_SOURCES = frozenset(("rule6", "route6", "own6", "mangle6"))


def ipv6_enabled():
    """False on a kernel booted with ipv6.disable=1, where IPv6 reads fail."""
    return os.path.exists("/proc/net/if_inet6")


def read_outputs(programs, names=ALL_SOURCES):
    """Read the sources named, all at once: the save programs run while this
    thread reads the kernel. Their outputs by name (a program's text, the
    kernel's entries). Without IPv6 in the kernel, its sources read as empty."""
    outputs = {}
    if not ipv6_enabled():
        outputs = {name: "" for name in names & IPV6_SOURCES}
        names = names - IPV6_SOURCES
    reads = [(name, [programs[argv[0]]] + list(argv[1:])) for name, argv in PROGRAM_READS if name in names]
    kernel = [name for name, _ in KERNEL_READS if name in names]
    texts = run_together([(argv, None) for _, argv in reads],
                         alongside=lambda: outputs.update(read_kernel(kernel)) if kernel else None)
    outputs.update(zip([name for name, _ in reads], texts))
    return outputs


# The kernel's objects through rtnetlink, in this process: no `ip` to start,
# no JSON to print and parse (at 15 ENIs x 50 addresses `ip -j address` alone
# took longer than the rest of the read). Each dump becomes the entries `ip -j`
# prints for the same command, with the keys the parsers read and the values
# they make of them; two differences, both `ip`'s names for numbers: tables,
# protocols and link groups come as numbers (`ip` prints the names of
# /etc/iproute2/rt_tables, rt_protos and group, which the tool never writes),
# and an interface index no link has is named "ifN" alike. The message formats
# (NLMSG_HEADER, IFINFO, IFADDR, RTMSG) are the watcher's, further down.
RTM_GETROUTE, RTM_GETRULE = 26, 34
NLM_F_DUMP_INTR = 0x10  # the objects changed during the dump: it is read again
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12  # the kernel filters route dumps (4.20+)
NETLINK_TIMEOUT = 5.0  # the kernel answers at once; never hang on it
NETLINK_RECEIVE = 1 << 16  # a dump's datagrams are at most 32 KiB
DUMP_ATTEMPTS = 5  # an interrupted dump is read again up to this often; the last one is taken
AF_INET, AF_INET6 = 2, 10
INET_FAMILIES = {4: AF_INET, 6: AF_INET6}
FAMILY_NAMES = {AF_INET: "inet", AF_INET6: "inet6"}
IFLA_GROUP = 27
IFA_SCOPE_NAMES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RTN_UNICAST = 1
RTM_F_CLONED = 0x200  # a cached route: `ip route show` leaves them out
FRA_DST, FRA_SRC, FRA_IIFNAME, FRA_PRIORITY, FRA_FWMARK = 1, 2, 3, 6, 10
FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_FWMASK = 13, 14, 15, 16
UNSET = 0xFFFFFFFF  # a rule's suppress_* when not set; a fwmask of all bits
RTPROT_KERNEL = 2
# Link types whose hardware address is an IP address (tunnels), as `ip` prints it.
ARPHRD_INET4 = (768, 776, 778)  # ipip, sit, gre
ARPHRD_INET6 = (769, 823)  # ip6tnl, ip6gre
U32 = struct.Struct("=I")


def read_kernel(names):
    """The kernel's reads named (KERNEL_READS), each as its entries; one socket
    for all; a ToolError if the kernel does not answer."""
    sock = netlink_socket()
    try:
        sock.settimeout(NETLINK_TIMEOUT)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except OSError:
            pass  # an older kernel sends every table: the entries are filtered here alike
        sock.bind((0, 0))
        outputs, links = {}, None
        for name in names:
            if links is None and name in ("addr", "link", "route4", "route6", "own4", "own6"):
                links = link_entries(netlink_dump(sock, RTM_GETLINK, IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0)))
            if name == "link":
                outputs[name] = [dict(entry) for entry in links]
            elif name == "addr":
                outputs[name] = address_entries(links, netlink_dump(sock, RTM_GETADDR, IFADDR.pack(0, 0, 0, 0, 0)))
            elif name.startswith("rule"):
                family = INET_FAMILIES[int(name[-1])]
                outputs[name] = [rule_entry(family, payload) for payload in
                                 netlink_dump(sock, RTM_GETRULE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))]
            else:
                family = INET_FAMILIES[int(name[-1])]
                table, protocol = (TABLE_MAIN, 0) if name.startswith("route") else (0, RT_PROTO)
                names_of = {entry["ifindex"]: entry["ifname"] for entry in links}
                payloads = route_dump(sock, RTMSG.pack(family, 0, 0, 0, table, protocol, 0, 0, 0))
                outputs[name] = [entry for entry in (route_entry(family, payload, names_of, table, protocol)
                                                     for payload in payloads) if entry]
        return outputs
    except OSError as exc:
        raise ToolError("reading the kernel's links, addresses, rules and routes (netlink) failed: %s"
                        % (exc.strerror or exc))
    finally:
        sock.close()


def route_dump(sock, body):
    """A route dump's payloads; none where the kernel, filtering by table
    (strict checking), says the table does not exist (ENOENT): a namespace
    with no route at all has no main table yet, and `ip` prints nothing."""
    try:
        return netlink_dump(sock, RTM_GETROUTE, body)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise


def netlink_dump(sock, request, body):
    """The payloads of one dump; read again (up to DUMP_ATTEMPTS times) when the
    kernel says the objects changed meanwhile, as `ip` would have printed them."""
    message = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), request, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
    for _ in range(DUMP_ATTEMPTS):
        sock.send(message)
        payloads, interrupted, done = [], False, False
        while not done:
            data = sock.recv(NETLINK_RECEIVE)
            offset = 0
            while offset + NLMSG_HEADER.size <= len(data):
                length, kind, flags, _, _ = NLMSG_HEADER.unpack_from(data, offset)
                if length < NLMSG_HEADER.size or offset + length > len(data):
                    raise OSError("a netlink message of %d bytes in %d" % (length, len(data) - offset))
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                payload = data[offset + NLMSG_HEADER.size:offset + length]
                if kind == NLMSG_DONE or kind == NLMSG_ERROR:
                    error = struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if error < 0:
                        raise OSError(-error, os.strerror(-error))
                    done = True
                    break
                payloads.append(payload)
                offset += (length + 3) & ~3
        if not interrupted:
            break
    return payloads


def ntop(family, data):
    """An address as `ip` prints it (inet_ntop: canonical)."""
    import _socket
    return _socket.inet_ntop(family, data)


def link_entries(payloads):
    """`ip -j link show`'s entries: name, index, hardware address, master, UP, group."""
    entries = []
    for payload in payloads:
        _, kind, index, flags, _ = IFINFO.unpack_from(payload)
        attributes = netlink_attributes(payload, IFINFO.size)
        entry = {"ifindex": index, "ifname": attributes[IFLA_IFNAME].rstrip(b"\0").decode("utf-8", "replace"),
                 "flags": ["UP"] if flags & IFF_UP else []}
        if IFLA_ADDRESS in attributes:
            entry["address"] = hardware_address(attributes[IFLA_ADDRESS], kind)
        if IFLA_MASTER in attributes:
            entry["master"] = U32.unpack(attributes[IFLA_MASTER])[0]  # an index until all names are known
        if IFLA_GROUP in attributes:
            entry["group"] = U32.unpack(attributes[IFLA_GROUP])[0]
        entries.append(entry)
    names_of = {entry["ifindex"]: entry["ifname"] for entry in entries}
    for entry in entries:
        if "master" in entry:
            entry["master"] = names_of.get(entry["master"], "if%d" % entry["master"])
    return entries


def hardware_address(data, kind):
    """A link's address as `ip` prints it: a tunnel's as an IP address, else hex pairs."""
    if len(data) == 4 and kind in ARPHRD_INET4:
        return ntop(AF_INET, data)
    if len(data) == 16 and kind in ARPHRD_INET6:
        return ntop(AF_INET6, data)
    return ":".join("%02x" % byte for byte in data)


def address_entries(links, payloads):
    """`ip -j address show`'s entries: the links, each with its addresses in `addr_info`."""
    entries = [dict(entry, addr_info=[]) for entry in links]
    listed = {entry["ifindex"]: entry["addr_info"] for entry in entries}
    for payload in payloads:
        family, prefixlen, _, scope, index = IFADDR.unpack_from(payload)
        local = local_address(payload)
        if index in listed and family in FAMILY_NAMES and local:
            listed[index].append({"family": FAMILY_NAMES[family], "local": ntop(family, local),
                                  "prefixlen": prefixlen, "scope": IFA_SCOPE_NAMES.get(scope, scope)})
    return entries


def local_address(payload):
    """An address message's own address: IFA_LOCAL, else IFA_ADDRESS (which is
    the peer's where both are). Not netlink_attributes(): 750 of these at
    15x50, and IPv4's IFA_LOCAL comes second of about six."""
    found, offset, end = None, IFADDR.size, len(payload)
    while offset + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(payload, offset)
        if length < RTATTR.size or offset + length > end:
            break
        if kind & 0x3FFF == IFA_LOCAL:
            return payload[offset + RTATTR.size:offset + length]
        if kind & 0x3FFF == IFA_ADDRESS:
            found = payload[offset + RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    return found


def rule_entry(family, payload):
    """One entry of `ip -j rule show` (fib_rule_hdr is laid out as RTMSG)."""
    _, dst_len, src_len, _, table, _, _, _, _ = RTMSG.unpack_from(payload)
    attributes = netlink_attributes(payload, RTMSG.size)
    entry = {"priority": U32.unpack(attributes[FRA_PRIORITY])[0] if FRA_PRIORITY in attributes else 0}
    for key, kind, length in (("src", FRA_SRC, src_len), ("dst", FRA_DST, dst_len)):
        if kind in attributes:
            entry[key], entry[key + "len"] = ntop(family, attributes[kind]), length
        elif length:
            entry[key], entry[key + "len"] = "0", length
        else:
            entry[key] = "all"
    protocol = attributes.get(FRA_PROTOCOL, b"\0")[0]
    if protocol and protocol != RTPROT_KERNEL:
        entry["protocol"] = protocol
    if FRA_FWMARK in attributes or FRA_FWMASK in attributes:
        entry["fwmark"] = hex_of(U32.unpack(attributes[FRA_FWMARK])[0] if FRA_FWMARK in attributes else 0)
        mask = U32.unpack(attributes[FRA_FWMASK])[0] if FRA_FWMASK in attributes else UNSET
        if mask != UNSET:
            entry["fwmask"] = hex_of(mask)
    if FRA_IIFNAME in attributes:
        entry["iif"] = attributes[FRA_IIFNAME].rstrip(b"\0").decode("utf-8", "replace")
    table = U32.unpack(attributes[FRA_TABLE])[0] if FRA_TABLE in attributes else table
    if table:  # `ip` prints no table (nor what goes with it) for a goto, nop or blackhole rule
        entry["table"] = table
        for key, kind in (("suppress_prefixlen", FRA_SUPPRESS_PREFIXLEN), ("suppress_ifgroup", FRA_SUPPRESS_IFGROUP)):
            value = U32.unpack(attributes[kind])[0] if kind in attributes else UNSET
            if value != UNSET:
                entry[key] = value
    return entry


def hex_of(value):
    """A mark as `ip` prints it (C's %#x: 0 without its 0x)."""
    return "%#x" % value if value else "0"


def route_entry(family, payload, names_of, table=0, protocol=0):
    """One entry of `ip -j route show [table T] [proto P]`, or None for a route
    it leaves out (a cached one, another table's or protocol's)."""
    _, dst_len, _, _, rtm_table, rtm_protocol, _, kind, flags = RTMSG.unpack_from(payload)
    if flags & RTM_F_CLONED or (protocol and rtm_protocol != protocol):
        return None
    attributes = netlink_attributes(payload, RTMSG.size)
    in_table = U32.unpack(attributes[RTA_TABLE])[0] if RTA_TABLE in attributes else rtm_table
    if table and in_table != table:
        return None
    if RTA_DST in attributes:
        dst = "%s/%d" % (ntop(family, attributes[RTA_DST]), dst_len)
    else:
        dst = "0/%d" % dst_len if dst_len else "default"
    entry = {"dst": dst, "table": in_table, "protocol": rtm_protocol}
    if kind != RTN_UNICAST:
        entry["type"] = kind  # `ip` names it (blackhole, local, ...): anything but unicast
    if RTA_OIF in attributes:
        index = U32.unpack(attributes[RTA_OIF])[0]
        entry["dev"] = names_of.get(index, "if%d" % index)
    if RTA_GATEWAY in attributes:
        entry["gateway"] = ntop(family, attributes[RTA_GATEWAY])
    return entry


# The reads whose output a command of each kind can alter.
# (The tool's routes are all in its own tables: main's, route4/6, are never altered.)
SOURCES_OF = {("ip", "rule"): ("rule%d",), ("ip", "route"): ("own%d",), ("ip", "address"): ("addr",),
              ("ip", "link"): ("link",), ("iptables", None): ("mangle%d",)}


def sources_touched(changes):
    """The reads whose output the changes can alter: verify re-reads only those."""
    names = set()
    for command in changes.commands:
        kind = command.words[0] if command.tool == "ip" else None
        names.update(name.replace("%d", str(command.family)) for name in SOURCES_OF[command.tool, kind])
    return names


def parse_system(outputs, sysfs, ipv6=True):
    """A System from the reads' outputs (pure: testable from recordings of `ip -j`)."""
    rules, routes = [], []
    for family in FAMILIES:
        rules += parse_rules(load_json(outputs["rule%d" % family], "ip -%d rule" % family), family)
        routes += parse_routes(load_json(outputs["route%d" % family], "ip -%d route" % family), family)
        # Main's routes are in route4/6 (a recording's, of all tables, has the tool's too).
        own = parse_routes(load_json(outputs.get("own%d" % family), "ip -%d route" % family), family, RT_PROTO)
        routes += [route for route in own if isinstance(route, Route)]
    links = parse_links(load_json(outputs["addr"], "ip address"))
    if outputs.get("link"):
        links = with_addresses_of(parse_links(load_json(outputs["link"], "ip link")), links)
    return System(
        links=links,
        main_routes=[route for route in routes if isinstance(route, MainRoute)],
        rules=[r for r in rules if isinstance(r, Rule)],
        foreign_rules=[r for r in rules if isinstance(r, ForeignRule)],
        routes=[route for route in routes if isinstance(route, Route)],
        mangle={family: parse_mangle(outputs["mangle%d" % family]) for family in FAMILIES},
        sysfs=sysfs, ipv6=ipv6)


def load_json(text, what):
    """Parse a program's JSON output, as a ToolError when it is not JSON; the
    kernel's entries (read_kernel's, already parsed) as they are."""
    if isinstance(text, list):
        return text
    try:
        import json
        return json.loads(text or "[]")
    except ValueError:
        raise ToolError("could not parse the JSON output of %s" % what)


ADDRESS_FAMILIES = {"inet": 4, "inet6": 6}


def parse_links(data):
    """Links with their global addresses, from `ip -j address show`."""
    links = []
    for entry in data:
        addrs = {4: [], 6: []}
        for info in entry.get("addr_info", []):
            if info.get("scope") == "global" and info.get("family") in ADDRESS_FAMILIES:
                addrs[ADDRESS_FAMILIES[info["family"]]].append(LinkAddress(info["local"], info["prefixlen"]))
        links.append(Link(
            name=entry["ifname"], index=entry.get("ifindex", 0),
            mac=(entry.get("address") or "").lower(),
            master=entry.get("master"), up="UP" in entry.get("flags", []),
            group=group_number(entry.get("group")),
            addresses={family: tuple(found) for family, found in addrs.items()}))
    return links


def with_addresses_of(links, earlier):
    """The links as `ip link` shows them now, each with its addresses as
    `earlier` (from `ip address`, read before) lists them."""
    addresses = {link.index: link.addresses for link in earlier}
    return [link._replace(addresses=addresses.get(link.index, link.addresses)) for link in links]


def group_number(value):
    """A link group as a number; `ip` prints group 0 as "default"."""
    if value in (None, "default"):
        return 0
    try:
        return int(value)
    except ValueError:
        return value  # named in /etc/iproute2/group: someone else's


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
    """From `ip -j rule show`: the tool's own rules (protocol RT_PROTO) as Rule,
    the others as ForeignRule."""
    rules = []
    for entry in data:
        src = entry.get("src", "all")
        src = None if src == "all" else host_cidr(src, entry.get("srclen"))
        if str(entry.get("protocol")) != str(RT_PROTO):
            dst = entry.get("dst", "all")
            rules.append(ForeignRule(family, entry.get("priority"), src,
                                     None if dst == "all" else host_cidr(dst, entry.get("dstlen"))))
            continue
        fwmark = entry.get("fwmark")
        group = entry.get("suppress_ifgroup")
        rules.append(Rule(
            family=family, priority=entry["priority"], src=src, iif=entry.get("iif"),
            fwmark=None if fwmark is None else "%s/%s" % (fwmark, entry.get("fwmask", "0xffffffff")),
            table=table_number(entry.get("table")),
            suppress_prefixlength=entry.get("suppress_prefixlen"),
            suppress_ifgroup=None if group is None else group_number(group)))
    return rules


def parse_routes(data, family, protocol=None):
    """The tool's own routes (Route), and main's unicast routes (MainRoute).
    `protocol`: that of every entry, read with `proto N` (`ip` then omits it)."""
    routes = []
    for entry in data:
        table = table_number(entry.get("table"))
        if entry.get("type", "unicast") != "unicast" or "dev" not in entry:
            continue
        dst = entry["dst"] if entry["dst"] == "default" else host_cidr(*entry["dst"].split("/"))
        if table == TABLE_MAIN:
            routes.append(MainRoute(family, dst, entry.get("gateway"), entry["dev"]))
        elif (str(entry.get("protocol", protocol)) == str(RT_PROTO)
              and isinstance(table, int) and TABLE_BASE <= table <= TABLE_LAST):
            routes.append(Route(family, table, dst, entry.get("gateway"), entry["dev"]))
    return routes


def parse_mangle(text):
    """The tool's rules and chains from `iptables-save -t mangle`: its chains,
    and in the built-in chains every rule that carries its comment or jumps to
    one of its chains (also those of earlier versions, so they are replaced)."""
    ours = (CHAIN_PREROUTING, CHAIN_OUTPUT)
    jumps, chains = [], collections.OrderedDict()
    for line in text.splitlines():
        if line.startswith(":") and line[1:].split(" ")[0] in ours:
            chains.setdefault(line[1:].split(" ")[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            if chain in ours:
                chains.setdefault(chain, []).append(spec)
            elif is_tool_rule(spec.split(" "), ours):
                jumps.append("%s %s" % (chain, spec))
    return Mangle(tuple(sorted(jumps)), tuple(sorted((name, tuple(specs)) for name, specs in chains.items())))


def read_links():
    """The links alone (what IMDS is asked about, before the lock is taken)."""
    return parse_links(read_kernel(["link"])["link"])


def is_tool_rule(words, ours):
    """Whether a rule's words carry the tool's comment or jump to its chains."""
    pairs = set(zip(words, words[1:]))
    return ("--comment", JUMP_COMMENT) in pairs or any(("-j", name) in pairs or ("-g", name) in pairs
                                                       for name in ours)


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


# amazon-ec2-net-utils as discovery sees it: `program` its path if installed,
# `rules` how many rules of its shape there are.
NetUtils = collections.namedtuple("NetUtils", "present program rules")


def find_netutils(system, program=NETUTILS_PROGRAM):
    """amazon-ec2-net-utils here: its program installed, or its rules present."""
    rules = len(netutils_rules(system))
    installed = os.path.exists(program)
    return NetUtils(present=installed or rules > 0, program=program if installed else None, rules=rules)


def netutils_rules(system):
    """The rules of net-utils' shape: `from SOURCE` at 10000-13199 (pure)."""
    return [r for r in system.foreign_rules if r.src is not None
            and NETUTILS_PRIO_FIRST <= (r.priority or 0) <= NETUTILS_PRIO_LAST]


def kernel_version():
    """(major, minor) of the running kernel, (0, 0) if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def netns_id():
    """This network namespace's own inode: one state record per namespace,
    whatever PID 1 is and whether its namespace can be read."""
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


# -- Discover: instance metadata (IMDSv2, bounded, never trusted blindly). --------

class ImdsError(Exception):
    """IMDS did not give a usable answer."""


# One address family of an ENI: addresses as canonical strings (the primary IPv4
# first, as IMDS lists it), subnets and delegated prefixes as ipaddress networks.
ImdsFamily = collections.namedtuple("ImdsFamily", "addresses subnets prefixes")
ImdsEni = collections.namedtuple("ImdsEni", "mac device_number network_card interface_id families")  # {4:, 6:}
Imds = collections.namedtuple("Imds", "primary_mac enis")

# The keys of an ENI's directory the tool reads per family: addresses, subnets, prefixes.
FAMILY_KEYS = {4: ("local-ipv4s", "subnet-ipv4-cidr-block", "ipv4-prefix"),
               6: ("ipv6s", "subnet-ipv6-cidr-blocks", "ipv6-prefix")}
IMDS_CONNECTIONS = 4  # ENIs fetched at once: 15 ENIs in a third of the time, a few hundred packets in all
IMDS_KEY = re.compile(r"^[A-Za-z0-9._-]+/?$")  # a name in a directory listing (junk is refused)


class ImdsClient:
    """A small IMDSv2 client: token first, v1 if the token call is unknown, retries
    with backoff on 404 (a new ENI not propagated yet), 429 and 5xx, and one
    deadline over everything. another() gives a client for a second thread."""

    RETRIED = (429, 500, 502, 503, 504)  # throttled or briefly unavailable

    def __init__(self, timeout, endpoints=None, port=None, session=None):
        import http.client  # here: 15 ms of imports that runs without IMDS do not need
        self.http = http.client
        self.deadline = time.monotonic() + timeout
        self.endpoints = endpoints or IMDS_ENDPOINTS
        self.port = port or IMDS_PORT
        self.session = session or ImdsSession()
        self.host = None
        self.conn = None
        self.token = None

    def remaining(self):
        return self.deadline - time.monotonic()

    def close(self):
        if self.conn:
            self.conn.close()

    def connect(self):
        """Find an endpoint that answers and get a token (or use the session's
        again while it is young); raise ImdsError if none."""
        known = self.session.reusable()
        if known:
            self.host, self.token = known
            self.conn = self.http.HTTPConnection(self.host, self.port)
            return self.host
        problems = []
        for host in self.endpoints:
            if self.remaining() <= 0:
                break
            self.conn = self.http.HTTPConnection(
                host, self.port, timeout=min(IMDS_CONNECT_TIMEOUT, self.remaining()))
            try:
                status, body = self.request_retried(
                    "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)})
            except (OSError, self.http.HTTPException) as exc:
                problems.append("%s: %s" % (host, describe_socket_error(exc)))
                self.conn.close()
                continue
            self.host = host
            if status == 200 and body.strip():
                self.token = body.strip()
                log.info("instance metadata: IMDSv2 at %s", host)
                self.session.remember(host, self.token)
                return host
            if status in (404, 405):  # IMDSv1 only: GETs without a token
                log.info("instance metadata: IMDSv1 at %s (no token service)", host)
                self.session.remember(host, None)
                return host
            problems.append("%s: token refused (HTTP %s)" % (host, status))
            self.conn.close()
        raise ImdsError("; ".join(problems) or "no time left")

    def another(self):
        """A client for another thread, after connect(): the same endpoint, token
        and deadline, its own connection (an HTTPConnection serves one request at a time)."""
        other = object.__new__(ImdsClient)
        other.__dict__.update(self.__dict__)
        other.conn = self.http.HTTPConnection(self.host, self.port, timeout=IMDS_CONNECT_TIMEOUT)
        return other

    def request(self, method, path, headers):
        """One HTTP exchange on the kept-alive connection: (status, body text).
        Every send and receive ends by the deadline (see DeadlineSocket)."""
        if self.token:
            headers = dict(headers, **{"X-aws-ec2-metadata-token": self.token})
        self.session.count("requests")
        try:
            if self.conn.sock is None:
                if self.remaining() <= 0:
                    raise TimeoutError("timed out")
                self.conn.timeout = max(0.05, min(IMDS_CONNECT_TIMEOUT, self.remaining()))
                self.conn.connect()
                self.conn.sock = DeadlineSocket(self.conn.sock, self)
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
            self.session.forget()  # a token IMDS no longer takes: the next run asks for another
            raise ImdsError("%s: HTTP %s (token not accepted)" % (path, status))
        raise ImdsError("%s: HTTP %s%s" % (path, status, ", still after retries" if status in retried else ""))


class ImdsSession:
    """What IMDS clients of one process share: the endpoint and token that
    worked (the watcher uses them again for a while instead of a PUT per poll)
    and the counts of requests and failures (its metrics)."""

    def __init__(self):
        self.host = self.token = None
        self.until = 0.0
        import threading
        self.counts = collections.Counter()
        self.lock = threading.Lock()  # the clients of one discovery run in threads

    def remember(self, host, token):
        self.host, self.token = host, token
        self.until = time.monotonic() + IMDS_TOKEN_REUSE

    def forget(self):
        self.until = 0.0

    def reusable(self):
        """(host, token) while young enough to use again, else None."""
        return (self.host, self.token) if time.monotonic() < self.until else None

    def count(self, what):
        with self.lock:
            self.counts[what] += 1


class DeadlineSocket:
    """A connected socket whose every send and receive ends by the client's
    deadline: http.client sets one timeout per receive, so an IMDS that drips
    one byte at a time (or sends headers slowly, or a body without end) could
    otherwise hold a run far past --imds-timeout."""

    def __init__(self, sock, client):
        self.sock, self.client = sock, client
        self.readers, self.closing = 0, False

    def time_left(self):
        """Set the socket's timeout to what is left (at most one receive's worth)."""
        left = self.client.remaining()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(min(IMDS_CONNECT_TIMEOUT, left))

    def sendall(self, data):
        self.time_left()
        self.sock.sendall(data)

    def recv_into(self, buffer, size=0):
        self.time_left()
        return self.sock.recv_into(buffer, size)

    def makefile(self, mode):
        """What http.client reads a response from: buffered, through recv_into."""
        self.readers += 1
        return io.BufferedReader(SocketReader(self))

    def close(self):
        """Close, once no response reads from it any more (http.client closes
        the connection of a response that ends with it before reading it)."""
        self.closing = True
        if not self.readers:
            self.sock.close()

    def reader_closed(self):
        self.readers -= 1
        if self.closing and not self.readers:
            self.sock.close()


class SocketReader(io.RawIOBase):
    """The raw stream under DeadlineSocket.makefile()."""

    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def readable(self):
        return True

    def readinto(self, buffer):
        return self.sock.recv_into(buffer)

    def close(self):
        if not self.closed:
            self.sock.reader_closed()
        super().close()


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
        enis = fetch_imds_enis(client, macs, primary)
    finally:
        client.close()
    return Imds(primary, enis)


def imds_unchanged(client, imds):
    """Whether IMDS still lists the ENIs of `imds` and, per ENI, its addresses
    of one family (IPv4, else IPv6): one request per ENI plus one, the watcher's
    poll. Raises ImdsError."""
    client.connect()
    try:
        if set(mac_listing(client)) != set(imds.enis):
            return False
        for mac, eni in sorted(imds.enis.items()):
            family = next((f for f in FAMILIES if eni.families[f].addresses), None)
            if family is None:  # nothing to poll (an EFA-only ENI): its MAC in the listing is all
                continue
            key = FAMILY_KEYS[family][0]
            listed = client.get("network/interfaces/macs/%s/%s" % (mac, key))
            if parse_addresses(listed, family, key) != eni.families[family].addresses:
                return False
        return True
    finally:
        client.close()


def mac_listing(client):
    """The MACs IMDS lists, in its order."""
    listing = client.get("network/interfaces/macs/", missing_ok=False)
    return [parse_mac(line.strip().rstrip("/")) for line in listing.split() if line.strip()]


def listed_macs(client, expected_macs):
    """The MACs IMDS lists, asked again while a NIC of this instance is missing
    from them (an ENI attached a moment ago), as long as time is left."""
    delay = 0.1
    while True:
        macs = mac_listing(client)
        missing = set(expected_macs) - set(macs)
        if not missing or client.remaining() < delay:
            if missing:
                log.info("not listed by IMDS (yet): %s", ", ".join(sorted(missing)))
            return macs
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def fetch_imds_enis(client, macs, primary):
    """{mac: ImdsEni}, fetched on up to IMDS_CONNECTIONS connections at once, one
    thread each: an ENI is a few round trips, most of them waiting. The first
    error stops every thread and is raised."""
    workers = [client] + [client.another() for _ in range(min(IMDS_CONNECTIONS, len(macs)) - 1)]
    pending = list(reversed(macs))
    import threading
    enis, errors, lock = {}, [], threading.Lock()

    def take():
        with lock:
            return pending.pop() if pending and not errors else None

    def work(worker):
        try:
            for mac in iter(take, None):
                enis[mac] = fetch_imds_eni(worker, mac, is_primary=(mac == primary))
        except Exception as exc:  # noqa: BLE001 (raised again in the calling thread)
            with lock:
                errors.append(exc)
            for other in workers:
                other.deadline = 0  # the others stop retrying: the answer is refused anyway
        finally:
            worker.close()

    threads = [threading.Thread(target=work, args=(worker,), daemon=True) for worker in workers[1:]]
    for thread in threads:
        thread.start()
    work(client)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {mac: enis[mac] for mac in macs}


def fetch_imds_eni(client, mac, is_primary):
    """One ENI's meta-data: its listing, then only the keys it has that the tool
    reads (a typical ENI: 5 requests). A key it does not list is absent, not late:
    no local-ipv4s is an IPv6-only ENI. A listed ENI may 404 or say device 0 for a
    moment after it is attached."""
    base = "network/interfaces/macs/%s/" % mac
    keys = eni_keys(client, base)

    def field(name):  # a listed key that 404s is late: asked again while time is left
        return client.get(base + name, missing_ok=False, retry_missing=True) if name in keys else None

    card = field("network-card")  # listed on multi-card instance types only
    card = 0 if card is None else parse_int(card, "network-card")
    # Device 0 of card 0 is the primary's; every other card has a device 0 of its own.
    device_number = parse_int(field("device-number"), "device-number")
    while device_number == 0 and card == 0 and not is_primary and client.remaining() > 0.1:
        time.sleep(0.1)  # a just-attached ENI reports 0 before its real number
        device_number = parse_int(field("device-number"), "device-number")
    if device_number == 0 and card == 0 and not is_primary:
        raise ImdsError("%s: device-number stays 0 for a secondary ENI" % mac)
    return ImdsEni(
        mac=mac, device_number=device_number, network_card=card,
        interface_id=(field("interface-id") or "").strip(),
        families={family: imds_family(field, family) for family in FAMILY_KEYS})


def eni_keys(client, base):
    """The names an ENI's directory lists. While it 404s or lacks device-number
    (just attached, not propagated yet), asked again as long as time is left."""
    delay = 0.1
    while True:
        listing = client.get(base, missing_ok=False, retry_missing=True)
        keys = {line.strip() for line in listing.split()}
        bad = sorted(key for key in keys if not IMDS_KEY.match(key))
        if bad:
            raise ImdsError("%s: not a key listing: %r" % (base, bad[0][:40]))
        if "device-number" in keys:
            return {key.rstrip("/") for key in keys}
        if client.remaining() < delay:
            raise ImdsError("%s lists no device-number" % base)
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def imds_family(field, family):
    """One family's ImdsFamily. Its subnet is asked for only where the ENI has
    addresses or prefixes of that family (an IPv4-only ENI in a dual-stack subnet)."""
    addresses_key, subnets_key, prefixes_key = FAMILY_KEYS[family]
    addresses = parse_addresses(field(addresses_key), family, addresses_key)
    prefixes = parse_networks(field(prefixes_key), family, prefixes_key)
    subnets = parse_networks(field(subnets_key), family, subnets_key) if addresses or prefixes else ()
    return ImdsFamily(addresses, subnets, prefixes)


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


def routed_slots(system):
    """Interface name -> the slot the tool routes it with now (survives IMDS gaps)."""
    slots = {}
    for route in system.routes:
        slots.setdefault(route.dev, route.table - TABLE_BASE)
    return slots


def select_enis(system, imds, include=(), exclude=(), add_from_imds=True, owned_addresses=frozenset(),
                remembered=None, max_slots=SLOTS_MAX):
    """The ENIs to route, primary first, each with its addresses, subnets and gateways.
    `owned_addresses` are those the tool added earlier, `remembered` the slots
    it gave (card, device) pairs (both from its state record)."""
    links = {link.name: link for link in system.links}
    routed = routed_slots(system)
    if include:
        candidates = [(links[name], imds and imds.enis.get(links[name].mac)) for name in unique(include)]
    elif imds:
        candidates = imds_candidates(system.links, imds)
    else:
        candidates = [(link, None) for link in fallback_nics(system)]
    if not include:  # an ENI routed before but missing from this answer stays
        names = {link.name for link, _ in candidates}
        for name in sorted(routed):
            if name in links and name not in names:
                log.warning("%s is routed but missing from the current answer: kept as it is", name)
                candidates.append((links[name], None))
        for link in [link for link, _ in candidates if not SAFE_NAME.match(link.name)]:
            log.warning("%r is not a name the tool can route safely ([A-Za-z0-9_.-], 1-15 "
                        "characters): skipped", link.name)
    candidates = [(link, meta) for link, meta in candidates
                  if link.name not in exclude and SAFE_NAME.match(link.name)]
    for link in [link for link, _ in candidates if not link.up]:
        log.info("%s is down: routed once it is up", link.name)
    candidates = [(link, meta) for link, meta in candidates if link.up]
    numbers = numbers_of(candidates)
    slots = slots_of(numbers, [routed.get(link.name) for link, _ in candidates], remembered or {}, max_slots)
    owned = {(a.dev, a.cidr.split("/")[0]) for a in owned_addresses}
    return [build_eni(link, number, slot, meta, system, add_from_imds, owned)
            for (link, meta), number, slot in zip(candidates, numbers, slots)]


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


def numbers_of(candidates):
    """(network card, device number) of each candidate, all different: IMDS's
    own, else the lowest free device on card 0 (device 0 for the primary)."""
    taken = {(meta.network_card, meta.device_number) for _, meta in candidates if meta}
    numbers = []
    for position, (_, meta) in enumerate(candidates):
        if meta:
            number = (meta.network_card, meta.device_number)
        else:
            number = lowest_free_number(taken, primary=(position == 0))
            taken.add(number)
        numbers.append(number)
    if len(set(numbers)) < len(numbers):
        raise ToolError("two ENIs have the same network card and device number in IMDS: %s"
                        % ", ".join(link.name for link, _ in candidates))
    return numbers


def lowest_free_number(taken, primary):
    """Device 0 of card 0 is the primary's; others take the lowest free one on card 0."""
    if primary and (0, 0) not in taken:
        return (0, 0)
    return next((0, device) for device in range(1, 1000) if (0, device) not in taken)


def pair_key(number):
    """How the state record names a (network card, device number) pair."""
    return "%d:%d" % number


def slots_of(numbers, routed, remembered, max_slots):
    """A slot per (card, device) pair: dense from 0 and stable. A pair keeps the
    slot the record remembers for it, else the one its interface is routed with
    now, else takes the lowest slot nobody holds or remembers; only when none is
    left does it take one remembered for a pair that is not here."""
    if len(numbers) > max_slots:
        raise ToolError("%d ENIs, but room for %d (the mark mask and the tool's priority range "
                        "number them): use a wider --mark-mask" % (len(numbers), max_slots))
    slots = [None] * len(numbers)
    held = set()
    for wish in ([remembered.get(pair_key(n)) for n in numbers], routed):
        for index, slot in enumerate(wish):
            if slots[index] is None and slot is not None and 0 <= slot < max_slots and slot not in held:
                slots[index] = slot
                held.add(slot)
    elsewhere = set(remembered.values())
    for index in range(len(numbers)):
        if slots[index] is None:
            free = [s for s in range(max_slots) if s not in held]
            slots[index] = next((s for s in free if s not in elsewhere), free[0])
            held.add(slots[index])
    return slots


def build_eni(link, number, slot, meta, system, add_from_imds, owned=frozenset()):
    """Combine what the interface has, what main says and what IMDS says."""
    card, device = number
    families = {}
    for family in FAMILIES:
        listed = meta.families[family] if meta else None
        adding = add_from_imds and (family == 4 or system.ipv6)
        families[family] = eni_family(link, family, listed, system, adding, owned)
    return Eni(name=link.name, index=link.index, mac=link.mac, slot=slot, network_card=card,
               device_number=device, origin="imds" if meta else "local", families=families)


def eni_family(link, family, meta, system, add_from_imds, owned):
    """One address family of an ENI. With a full IMDS answer, an address the tool
    added that IMDS no longer lists is neither kept nor routed; one the admin
    configured always stays."""
    # IMDS lists the ENI's primary IPv4 first; DHCP configures that one, so an
    # interface whose DHCP has not finished yet is left to it, not given a /32.
    if meta is not None and not meta.addresses and link.addresses[family]:
        meta = None  # IMDS lists none of the addresses the ENI has: not propagated yet, keep what is
    listed = None if meta is None else (meta.addresses[1:] if family == 4 else meta.addresses)
    own_subnets = tuple(meta.subnets) if meta and meta.subnets else connected_subnets(link, family, system)
    refused = ()
    if listed:
        configured = {a.ip for a in link.addresses[family]}
        refused = tuple((a, why) for a, why in ((a, routed_elsewhere(a, link.name, own_subnets, system))
                                                 for a in listed if a not in configured) if why)
        listed = [a for a in listed if a not in dict(refused)]
    addresses, added = addresses_of(link.name, link.addresses[family], listed, add_from_imds, owned)
    if family == 4:
        gateway = gateway4_of(link.name, own_subnets, system.main_routes)
    else:
        gateway = gateway6_of(link.name, system.main_routes)
    if family == 6 and addresses and not gateway:
        log.warning("%s has IPv6 addresses but no router learned from RAs (accept_ra?): "
                    "its IPv6 replies beyond its subnet are not routed through it", link.name)
    for address, why in refused:
        log.info("%s: %s is not added: %s", link.name, address, why)
    return EniFamily(addresses=addresses, added=added, subnets=own_subnets, gateway=gateway,
                     prefixes=tuple(meta.prefixes) if meta else (), refused=refused)


def connected_subnets(link, family, system):
    """The ENI's subnets as main's connected routes show them, else as its
    addresses' prefix lengths do (never link-local, multicast or host routes)."""
    subnets = unique(ipaddress.ip_network(r.dst) for r in system.main_routes
                     if r.dev == link.name and r.family == family and r.gateway is None
                     and r.dst != "default")
    subnets = [s for s in subnets if s.prefixlen < s.max_prefixlen and not s.is_link_local
               and not s.is_multicast]
    if not subnets:
        subnets = unique(ipaddress.ip_network("%s/%s" % a, strict=False) for a in link.addresses[family])
        subnets = [s for s in subnets if s.prefixlen < s.max_prefixlen]
    return tuple(subnets)


def routed_elsewhere(address, dev, own_subnets, system):
    """Why an address IMDS lists is not the host's to add, or None: a foreign rule
    names it, or main routes it to another device more specifically than the
    ENI's own subnet does (the VPC CNI routes its pods' addresses to veths)."""
    cidr = host_cidr(address)
    for foreign in system.foreign_rules:
        if cidr in (foreign.src, foreign.dst):
            return "rule %s of another program names it" % foreign.priority
    ip = ipaddress.ip_address(address)
    floor = max([s.prefixlen for s in own_subnets if ip in s] or [0])
    best = None
    for route in system.main_routes:
        if route.dst == "default" or family_of(route.dst) != ip.version:
            continue
        network = ipaddress.ip_network(route.dst)
        if network.prefixlen > floor and ip in network and (best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, route.dev)
    if best and best[1] != dev:
        return "main routes it to %s" % best[1]
    return None


def addresses_of(dev, configured, listed, add_from_imds, owned):
    """(addresses to route, addresses the tool adds or keeps) of one family."""
    mine = [a.ip for a in configured if (dev, a.ip) in owned]
    theirs = [a.ip for a in configured if (dev, a.ip) not in owned]
    if listed is None:  # no IMDS answer: what the tool added stays
        return tuple(theirs + mine), tuple(mine)
    added = tuple(a for a in listed if a not in theirs) if add_from_imds else ()
    return tuple(theirs) + added, added


def gateway4_of(dev, subnets, main_routes):
    """The VPC router: the subnet's base + 1, else the default route DHCP set."""
    if subnets:
        return str(subnets[0].network_address + 1)
    return next((r.gateway for r in main_routes
                 if r.family == 4 and r.dst == "default" and r.dev == dev and r.gateway), None)


def gateway6_of(dev, main_routes):
    """The IPv6 router learned from RAs on the ENI (never guessed)."""
    return next((r.gateway for r in main_routes if r.family == 6 and r.dst == "default"
                 and r.dev == dev and r.gateway), None)


def unique(items):
    """Items in first-seen order, without repeats."""
    seen = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


# -- Plan (pure): the state the system should be in. ------------------------------

def plan(enis, mark_mask=DEFAULT_MARK_MASK, groups=None, ahead_of_netutils=False):
    """The owned state that routes every ENI address through its own ENI.
    `groups`: interface name -> its link group now (a link in someone else's
    group keeps it). `ahead_of_netutils`: main's non-ENI routes also win
    ahead of amazon-ec2-net-utils' rules (PRIO_NETUTILS)."""
    addresses = frozenset(Address(eni.name, host_cidr(a)) for eni in enis
                          for family in FAMILIES for a in eni.families[family].added)
    if len(enis) < 2:  # one ENI: main already routes it; only add its addresses
        return NOTHING._replace(addresses=addresses)
    rules, routes, routed = set(), set(), {4: [], 6: []}
    for family in FAMILIES:
        exclusive = exclusive_subnets(enis, family)
        for eni in enis:
            eni_rules, eni_routes = plan_family(eni, family, exclusive, mark_mask)
            rules |= eni_rules
            routes |= eni_routes
            if eni_rules:
                routed[family].append(eni)
        if routed[family]:
            rules.add(rule(family, PRIO_MAIN, TABLE_MAIN, suppress_ifgroup=ENI_GROUP))
        if routed[family] and ahead_of_netutils:
            rules.add(rule(family, PRIO_NETUTILS, TABLE_MAIN, suppress_ifgroup=ENI_GROUP))
    names = unique(eni.name for family in FAMILIES for eni in routed[family])
    for name in names:
        if (groups or {}).get(name, 0) not in (0, ENI_GROUP):
            log.warning("%s is in link group %s of someone else's: main's routes through it are not "
                        "suppressed for the other ENIs' addresses", name, groups[name])
    return OwnedState(
        rules=frozenset(rules), routes=frozenset(routes),
        mangle={family: plan_mangle(routed[family], mark_mask) for family in FAMILIES},
        sysctls={"net/ipv4/conf/%s/rp_filter" % eni.name: RP_FILTER_LOOSE for eni in routed[4]},
        addresses=addresses,
        groups=frozenset(n for n in names if (groups or {}).get(n, 0) in (0, ENI_GROUP)))


def exclusive_subnets(enis, family):
    """Subnet -> the one ENI it belongs to: no other ENI has a subnet or delegated
    prefix overlapping it, or an address inside it. (EC2 takes every private
    address and prefix of an ENI from its subnet.)"""
    claims = {}
    by_length = collections.defaultdict(dict)  # prefix length -> {network as int: subnet}
    for eni in enis:
        for subnet in eni.families[family].subnets:
            claims.setdefault(subnet, set()).add(eni.name)
            by_length[subnet.prefixlen][int(subnet.network_address)] = subnet
    bits = 32 if family == 4 else 128
    for eni in enis:
        own = eni.families[family]
        for network in own.subnets + own.prefixes:
            for subnet in claims:
                if subnet.overlaps(network):
                    claims[subnet].add(eni.name)
        for address in own.addresses:
            value = address_value(address)
            for length, subnets in by_length.items():
                subnet = subnets.get(value >> (bits - length) << (bits - length))
                if subnet is not None:
                    claims[subnet].add(eni.name)
    return {subnet: names.pop() for subnet, names in claims.items() if len(names) == 1}


def plan_family(eni, family, exclusive, mark_mask):
    """One ENI's rules and table routes for one address family. Sources: each
    subnet that is the ENI's alone, for traffic this host originates (`iif lo`:
    what it merely forwards, a NAT instance's say, keeps main's routing); each
    delegated prefix, whatever sends from it; and only the addresses no such
    subnet covers, one by one."""
    own = eni.families[family]
    if not (own.addresses or own.prefixes) or not (own.gateway or own.subnets):
        return set(), set()
    table, slot = table_of(eni), eni.slot
    routes = {Route(family, table, str(s), None, eni.name) for s in own.subnets}
    if own.gateway:
        routes.add(Route(family, table, "default", own.gateway, eni.name))
    mine = [s for s in own.subnets if exclusive.get(s) == eni.name]
    rules = {rule(family, PRIO_FWMARK + slot, table, fwmark=fwmark_of(eni, mark_mask))}
    rules |= {rule(family, PRIO_SOURCE + slot, table, src=str(s), iif="lo") for s in mine}
    rules |= {rule(family, PRIO_SOURCE + slot, table, src=str(p)) for p in own.prefixes}
    rules |= {rule(family, PRIO_SOURCE + slot, table, src=host_cidr(a))
              for a in own.addresses if not any(covers(s, address_value(a)) for s in mine)}
    return rules, routes


def address_value(address):
    """An address as a number. (ipaddress takes 3 us an address, a tenth of a
    run at 15 x 50; `ip` and the IMDS parser give canonical text.)"""
    if ":" in address:
        return int(ipaddress.IPv6Address(address))
    a, b, c, d = address.split(".")
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


def covers(network, value):
    """Whether the network holds the address `value`."""
    shift = network.max_prefixlen - network.prefixlen
    return value >> shift == int(network.network_address) >> shift


def mark_capacity(mark_mask):
    """How many ENIs the mask can number: 0 means unmarked, all bits "seen"."""
    shift = (mark_mask & -mark_mask).bit_length() - 1
    return (mark_mask >> shift) - 1


def mark_value(eni, mark_mask):
    """The ENI's mark: slot + 1 shifted into the mask."""
    shift = (mark_mask & -mark_mask).bit_length() - 1
    return (eni.slot + 1) << shift


def mark_of(eni, mark_mask):
    """The ENI's connection mark as `value/mask`, as CONNMARK sets it."""
    return "%#x/%#x" % (mark_value(eni, mark_mask), mark_mask)


def fwmark_of(eni, mark_mask):
    """What the ENI's fwmark rule matches: exactly its mark, all 32 bits. The
    tool restores a mark only onto a packet that has none, so its replies carry
    exactly this; a mark of someone else's (wg-quick's 0xca6c, whose bits
    overlap 0x3f00) never selects the ENI's table."""
    return "%#x/0xffffffff" % mark_value(eni, mark_mask)


def plan_mangle(enis, mark_mask):
    """Mark each connection by the ENI it came in on, from its first packet the
    rules see (also of flows older than the tool), and a connection that came
    in elsewhere as "seen"; restore an ENI's mark onto the connection's replies
    that carry no mark, whatever interface they enter on, so routing sends them
    back out of that ENI. So a packet of a marked or seen connection meets two
    rules in PREROUTING and one in OUTPUT; only a connection's first packet
    enters the per-ENI chain. Packets that carry a mark, and connections that
    only this host or a container started, are left alone."""
    if not enis:
        return NO_MANGLE
    # The marker comes last: a match is evaluated per packet (with iptables-nft
    # each of these is an xt call), and a packet a rule turns away never gets
    # past its first one. ctdir first in the restore: it turns away every
    # packet of the other direction at once; the mark first in the jump: it
    # turns away every packet of a marked or seen connection.
    tag = "-m comment --comment %s" % JUMP_COMMENT
    unmarked = "-m connmark --mark 0x0/%#x" % mark_mask
    restore = ("-m conntrack --ctdir REPLY -m connmark ! --mark 0x0/%#x -m connmark ! --mark %#x/%#x "
               "-m mark --mark 0x0 %s -j CONNMARK --restore-mark --nfmask %#x --ctmask %#x"
               % (mark_mask, mark_mask, mark_mask, tag, mark_mask, mark_mask))
    first = "%s -m conntrack --ctdir ORIGINAL %s -j %s" % (unmarked, tag, CHAIN_PREROUTING)
    marking = ["-i %s -j CONNMARK --set-xmark %s" % (eni.name, mark_of(eni, mark_mask)) for eni in enis]
    marking.append("%s -j CONNMARK --set-xmark %#x/%#x" % (unmarked, mark_mask, mark_mask))
    # Sorted, as parse_mangle returns them, so that equal states compare equal.
    return Mangle(
        jumps=tuple(sorted(["PREROUTING " + first, "PREROUTING " + restore, "OUTPUT " + restore])),
        chains=((CHAIN_PREROUTING, tuple(marking)),))


# -- The state record: what the kernel cannot tell, typed and distrusted. ---------
#
# Everything else the tool owns is read back from the system by its markers. The
# record keeps only what carries none: the sysctl values from before the tool
# changed them, the addresses it added, the slots it gave (card, device) pairs.
# It is written atomically and read with distrust: a record that does not
# validate field by field is set aside, and the run goes on from the markers.

RECORD_VERSION = 1  # records of the tool's first versions have no "version": the same layout
RECORD_MAX_BYTES = 1 << 20  # 100 ENIs with 50 added addresses each write about 300 KiB

# sysctls: {key: RecordedSysctl}; addresses: RecordedAddress sorted by (dev,
# cidr); slots: {"card:device": slot}. `ifindex` ties an entry to the
# interface it was made for: a new interface of the same name inherits nothing.
Record = collections.namedtuple("Record", "sysctls addresses slots")
RecordedSysctl = collections.namedtuple("RecordedSysctl", "original set ifindex")
RecordedAddress = collections.namedtuple("RecordedAddress", "dev cidr ifindex")
EMPTY_RECORD = Record({}, (), {})

# The sysctls the tool writes, and the values the kernel takes for each: a
# record naming another key (`..` in it, say) or value is not the tool's.
SYSCTL_VALUES = {"rp_filter": ("0", "1", "2")}
SYSCTL_KEY = re.compile(r"^net/ipv[46]/conf/([^/]+)/([a-z_]+)$")
SLOT_PAIR = re.compile(r"^(\d{1,3}):(\d{1,3})$")
IFINDEX_MAX = 2 ** 31 - 1


class InvalidRecord(Exception):
    """The state record is not one the tool wrote: set aside, never trusted."""


def valid_ifname(name):
    """A name the kernel allows and the tool can route (never . or ..)."""
    return isinstance(name, str) and bool(SAFE_NAME.match(name)) and name not in (".", "..")


def record_of(data):
    """A Record from its JSON form, checked field by field; else InvalidRecord."""
    if not isinstance(data, dict):
        raise InvalidRecord("not a JSON object")
    unknown = sorted(set(data) - {"version", "sysctls", "addresses", "slots"})
    if unknown:
        raise InvalidRecord("unknown field %r" % unknown[0][:40])
    if data.get("version", RECORD_VERSION) != RECORD_VERSION:
        raise InvalidRecord("version %r, not %d" % (str(data["version"])[:20], RECORD_VERSION))
    return Record(
        sysctls=dict(recorded_sysctl(key, entry) for key, entry in field_of(data, "sysctls", dict).items()),
        addresses=tuple(sorted((recorded_address(entry) for entry in field_of(data, "addresses", list)),
                               key=lambda address: address[:2])),
        slots=dict(recorded_slot(key, slot) for key, slot in field_of(data, "slots", dict).items()))


def field_of(data, name, kind):
    """data[name], which must be a `kind` (dict or list) if present."""
    value = data.get(name, kind())
    if type(value) is not kind:
        raise InvalidRecord("%s is not a JSON %s" % (name, "array" if kind is list else "object"))
    return value


def recorded_sysctl(key, entry):
    """(key, RecordedSysctl): a key of the form the tool writes, values the kernel takes."""
    match = SYSCTL_KEY.match(key)
    if not match or not valid_ifname(match.group(1)) or match.group(2) not in SYSCTL_VALUES:
        raise InvalidRecord("sysctl %r is not one the tool writes" % key[:80])
    if not isinstance(entry, dict) or set(entry) - {"original", "set", "ifindex"}:
        raise InvalidRecord("sysctl %s: not an entry of the tool's" % key)
    for name in ("original", "set"):
        if not isinstance(entry.get(name), str) or entry[name] not in SYSCTL_VALUES[match.group(2)]:
            raise InvalidRecord("sysctl %s: %s %r is not a value of %s"
                                % (key, name, str(entry.get(name))[:20], match.group(2)))
    return key, RecordedSysctl(entry["original"], entry["set"], recorded_ifindex(entry.get("ifindex")))


def recorded_address(entry):
    """A RecordedAddress from [dev, "address/32 or /128", ifindex]."""
    if not isinstance(entry, list) or len(entry) not in (2, 3):
        raise InvalidRecord("an address entry is not [dev, cidr, ifindex]")
    dev, cidr = entry[:2]
    if not valid_ifname(dev):
        raise InvalidRecord("address entry: %r is not an interface name" % str(dev)[:20])
    try:
        address = ipaddress.ip_interface(cidr if isinstance(cidr, str) else "-")
    except ValueError:
        address = None
    if address is None or host_cidr(str(address.ip)) != cidr:
        raise InvalidRecord("address entry: %r is not one address" % str(cidr)[:50])
    return RecordedAddress(dev, cidr, recorded_ifindex(entry[2] if len(entry) > 2 else None))


def recorded_ifindex(value):
    """None (not known) or an interface index."""
    if value is not None and (type(value) is not int or not 0 < value <= IFINDEX_MAX):
        raise InvalidRecord("%r is not an interface index" % str(value)[:20])
    return value


def recorded_slot(key, slot):
    """("card:device", slot), each number in its range."""
    match = SLOT_PAIR.match(key)
    if not match or max(int(match.group(1)), int(match.group(2))) > 255:
        raise InvalidRecord("slot key %r is not card:device" % key[:20])
    if type(slot) is not int or not 0 <= slot < SLOTS_MAX:
        raise InvalidRecord("slot %r of %s is out of range" % (str(slot)[:20], key))
    return key, slot


def record_data(record):
    """The record's JSON form."""
    return {"version": RECORD_VERSION,
            "sysctls": {key: {"original": entry.original, "set": entry.set, "ifindex": entry.ifindex}
                        for key, entry in record.sysctls.items()},
            "addresses": [list(address) for address in record.addresses],
            "slots": record.slots}


def state_path(state_dir, netns):
    """The state record of this network namespace (by its inode)."""
    return os.path.join(state_dir, "state-netns-%d.json" % netns)


def load_record(path):
    """The state record at `path` (EMPTY_RECORD if there is none); InvalidRecord
    if it is not one the tool wrote."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(RECORD_MAX_BYTES + 1)
    except FileNotFoundError:
        return EMPTY_RECORD
    except OSError as exc:  # a directory, unreadable: not the tool's
        raise InvalidRecord(exc.strerror or str(exc))
    if len(text) > RECORD_MAX_BYTES:
        raise InvalidRecord("larger than %d bytes" % RECORD_MAX_BYTES)
    try:
        import json
        data = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise InvalidRecord("not JSON: %s" % str(exc)[:80])
    return record_of(data)


def set_record_aside(path, why):
    """Move a record that does not validate out of the way, saying so once."""
    aside = path + ".invalid"
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.warning("state record %s is not valid (%s), and cannot be set aside (%s): ignored",
                    path, why, exc.strerror or exc)
        return
    log.warning("state record %s is not valid (%s): set aside as %s; going on from what the system shows",
                path, why, aside)


def save_record(path, record, unchanged_from=None):
    """Write the record atomically, or remove it when there is nothing to
    remember; raise ToolError if it cannot be done."""
    if record == unchanged_from:
        return
    try:
        if not (record.sysctls or record.addresses or record.slots):
            if os.path.lexists(path):
                os.unlink(path)
            return
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        import json
        write_atomically(path, json.dumps(record_data(record), indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        raise ToolError("cannot write the state record %s: %s" % (path, exc.strerror or exc))


def write_atomically(path, text):
    """Write `text` to a temporary file renamed over `path`; the temporary file
    is gone whatever happens (ENOSPC shows at close, not at write)."""
    temporary = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def live_record(record, links):
    """The record without entries of interfaces that are gone: an entry names
    its interface and ifindex, so a new interface of the same name never
    inherits the old one's sysctls or addresses."""
    index = {link.name: link.index for link in links}

    def alive(dev, ifindex):
        return dev in index and ifindex in (None, index[dev])

    return record._replace(
        sysctls={key: entry for key, entry in record.sysctls.items() if alive(sysctl_device(key), entry.ifindex)},
        addresses=tuple(a for a in record.addresses if alive(a.dev, a.ifindex)))


def sysctl_device(key):
    """"net/ipv4/conf/eth1/rp_filter" -> "eth1"."""
    return key.split("/")[3]


def originals_of(record):
    """Sysctl values from before the tool changed them."""
    return {key: entry.original for key, entry in record.sysctls.items()}


def merge_record(record, desired, changes, enis):
    """The record for this run: originals kept from the first change on, the
    addresses the tool adds, the slots it gives. Written before applying, so
    that a crash midway still knows what to give back."""
    index = {eni.name: eni.index for eni in enis}
    sysctls = dict(record.sysctls)
    for key, new, old in changes.sysctls:
        if key in desired.sysctls and key not in sysctls:
            sysctls[key] = RecordedSysctl(old, new, index.get(sysctl_device(key)))
    known = {address[:2] for address in record.addresses}
    added = tuple(RecordedAddress(a.dev, a.cidr, index.get(a.dev)) for a in desired.addresses
                  if (a.dev, a.cidr) not in known)
    return Record(sysctls, tuple(sorted(record.addresses + added, key=lambda address: address[:2])),
                  remembered_slots(record, enis))


def pruned_record(record, desired, enis):
    """The record once the system matches `desired` (a flush forgets the slots too)."""
    wanted = {(a.dev, a.cidr) for a in desired.addresses}
    return Record({key: entry for key, entry in record.sysctls.items() if key in desired.sysctls},
                  tuple(a for a in record.addresses if a[:2] in wanted),
                  remembered_slots(record, enis) if enis else {})


def remembered_slots(record, enis):
    """Slots by (card, device) pair: this run's, and those of pairs not here now
    (a re-attached ENI gets its numbers back) unless their slot was given away."""
    slots = {pair_key((eni.network_card, eni.device_number)): eni.slot for eni in enis}
    taken = set(slots.values())
    for key, slot in sorted(record.slots.items()):
        if key not in slots and slot not in taken:
            slots[key] = slot
    return slots


# -- The state the tool owns now, in the plan's shape. ----------------------------

def owned_state(system, record):
    """What of the running system is the tool's: by marker, or by its state record."""
    present = {(link.name, a.ip) for link in system.links for family in FAMILIES for a in link.addresses[family]}
    addresses = frozenset(Address(a.dev, a.cidr) for a in record.addresses
                          if (a.dev, a.cidr.split("/")[0]) in present)
    sysctls = {key: entry.set for key, entry in record.sysctls.items()}
    groups = frozenset(link.name for link in system.links if link.group == ENI_GROUP)
    return OwnedState(frozenset(system.rules), frozenset(system.routes), system.mangle, sysctls, addresses,
                      groups)


# -- Diff (pure): the commands that take the system from current to desired. ------

# One command of a plan: `tool` "ip" or "iptables" (its mangle table);
# `family` 4 or 6, None for a link (family-less); `words` as the batch line
# has them; `why` a note --dry-run prints (or ""). Rendered to text only at
# the edge: the batches, --dry-run, the pending lines of --status.
Command = collections.namedtuple("Command", "tool family words why")
# A sysctl write, and the value it replaces (to give back on roll back).
SysctlWrite = collections.namedtuple("SysctlWrite", "key new old")
# The changes to make: Commands in the order they run within their batch,
# and SysctlWrites (made once the batches are done).
Changes = collections.namedtuple("Changes", "commands sysctls")
NO_CHANGES = Changes((), ())


def diff(desired, current, sysctl_values, originals):
    """The Changes, ordered so that nothing points at what is not there yet:
    addresses, links, then routes, then rules are added; removals run the
    other way. Rules are added highest priority first and removed lowest
    first: the kernel keeps them in a list by priority, so each one is then
    found near its head."""
    commands = []
    for family in FAMILIES:
        commands += (
            [address_command("add", a) for a in sorted(desired.addresses - current.addresses)
             if family_of(a.cidr) == family]
            + (group_commands(desired.groups, current.groups) if family == 4 else [])
            + route_additions(desired.routes, current.routes, family)
            + [rule_command("add", r) for r in sorted(desired.rules - current.rules, key=rule_order,
                                                      reverse=True) if r.family == family]
            + [rule_command("del", r) for r in sorted(current.rules - desired.rules, key=rule_order)
               if r.family == family]
            + route_removals(desired.routes, current.routes, family)
            + [address_command("del", a) for a in sorted(current.addresses - desired.addresses)
               if family_of(a.cidr) == family])
    for family in FAMILIES:
        commands += [Command("iptables", family, tuple(line.split()), "")
                     for line in mangle_commands(desired.mangle[family], current.mangle[family])]
    return Changes(tuple(commands), tuple(sysctl_writes(desired.sysctls, current.sysctls, sysctl_values, originals)))


def family_of(cidr):
    return 6 if ":" in cidr else 4


def rule_order(rule):
    return (rule.priority,) + tuple("" if value is None else str(value) for value in rule[2:])


def route_order(route):
    """Connected routes first: a gateway must be reachable when its route is added."""
    return (route.table, route.gateway is not None, route.dst == "default", route.dst)


def route_key(route):
    """What identifies a route in the kernel: a table holds one IPv4 and one IPv6 default."""
    return (route.family, route.table, route.dst)


def route_additions(desired, current, family):
    """`replace` for a route the tool owns already (a new gateway, say); `add` for
    a new one, so that a foreign route in the same table fails loudly instead of
    being overwritten."""
    owned_keys = {route_key(r) for r in current}
    wanted = sorted((r for r in desired - current if r.family == family), key=route_order)
    return [route_command("replace" if route_key(r) in owned_keys else "add", r) for r in wanted]


def route_removals(desired, current, family):
    """Removals, except routes a `replace` above already overwrote."""
    replaced = {route_key(r) for r in desired}
    stale = sorted((r for r in current - desired if r.family == family
                    and route_key(r) not in replaced), key=route_order, reverse=True)
    return [route_command("del", r) for r in stale]


def group_commands(desired, current):
    """Links into ENI_GROUP, and back to the default group 0 (family-less)."""
    return ([Command("ip", None, ("link", "set", "dev", name, "group", str(ENI_GROUP)), "")
             for name in sorted(desired - current)]
            + [Command("ip", None, ("link", "set", "dev", name, "group", "default"), "")
               for name in sorted(current - desired)])


def rule_command(verb, rule):
    words = ["rule", verb, "priority", str(rule.priority)]
    if rule.src:
        words += ["from", rule.src]
    if rule.iif:
        words += ["iif", rule.iif]
    if rule.fwmark:
        words += ["fwmark", rule.fwmark]
    words += ["table", "main" if rule.table == TABLE_MAIN else str(rule.table)]
    if rule.suppress_prefixlength is not None:
        words += ["suppress_prefixlength", str(rule.suppress_prefixlength)]
    if rule.suppress_ifgroup is not None:
        words += ["suppress_ifgroup", str(rule.suppress_ifgroup)]
    return Command("ip", rule.family, tuple(words + ["protocol", str(RT_PROTO)]), "")


def route_command(verb, route):
    words = ["route", verb, route.dst]
    if route.gateway:
        words += ["via", route.gateway]
    return Command("ip", route.family, tuple(words + ["dev", route.dev, "table", str(route.table),
                                                      "proto", str(RT_PROTO)]), "")


def address_command(verb, address):
    # nodad: the VPC already guarantees the address is this ENI's alone;
    # noprefixroute: a /128 needs no route in main (local delivery is in `local`).
    family = family_of(address.cidr)
    extra = ("nodad", "noprefixroute") if verb == "add" and family == 6 else ()
    why = "assigned in IMDS, not configured" if verb == "add" else "added by this tool, no longer assigned"
    return Command("ip", family, ("address", verb, address.cidr, "dev", address.dev) + extra, why)


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
            writes.append(SysctlWrite(key, value, values[key]))
    for key, ours in sorted(owned.items()):
        original = originals.get(key)
        if key not in desired and values.get(key) == ours and original not in (None, ours):
            writes.append(SysctlWrite(key, original, ours))
    return writes


def is_empty(changes):
    return not (changes.commands or changes.sysctls)


# -- The edge: commands rendered to text, once. -----------------------------------

def render(changes):
    """The changes as the exact commands, one per line, for --dry-run, --status
    and errors. Address lines say why, as a shell comment: the tool only adds
    and removes addresses that IMDS assigns (or assigned) to the ENI."""
    lines = [shown(command) for command in changes.commands]
    return lines + ["sysctl -w %s=%s" % (write.key.replace("/", "."), write.new) for write in changes.sysctls]


def shown(command):
    """One command as an admin would type it."""
    if command.tool == "iptables":
        prefix = "iptables -t mangle" if command.family == 4 else "ip6tables -t mangle"
    else:
        prefix = "ip" if command.family is None else "ip -%d" % command.family
    return "%s %s%s" % (prefix, " ".join(command.words), "  # " + command.why if command.why else "")


def batches(programs, changes):
    """(argv, stdin) of each batch: ip and iptables-restore per family. Link
    lines are family-less and go in IPv4's batch, on purpose (`ip -4` does not
    restrict `link`): a process fewer."""
    ip = {family: [" ".join(c.words) for c in changes.commands if c.tool == "ip"
                   and (c.family or 4) == family] for family in FAMILIES}
    mangle = {family: [" ".join(c.words) for c in changes.commands if c.tool == "iptables"
                       and c.family == family] for family in FAMILIES}
    return [(argv, "\n".join(lines) + "\n") for argv, lines in [
        ([programs["ip"], "-4", "-batch", "-"], ip[4]),
        ([programs["ip"], "-6", "-batch", "-"], ip[6]),
        ([programs["iptables-restore"], "-w", "10", "--noflush"], mangle_script(mangle[4])),
        ([programs["ip6tables-restore"], "-w", "10", "--noflush"], mangle_script(mangle[6])),
    ] if lines]


# -- Apply: one batch per tool; then the sysctls. ---------------------------------

def apply_changes(programs, changes, fail_after=0):
    """Run the batches, ip and iptables-restore per family, all at once (they
    touch independent parts of the kernel, and each is ordered in itself);
    then the sysctls. `fail_after` N > 0 (a test hook) fails the run after its
    Nth step; the batches finish together, so for N up to their number all ran."""
    commands = batches(programs, changes)
    run_together(commands)
    done = len(commands)
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
    """Write each SysctlWrite's new value."""
    for key, value, _ in writes:
        log.debug("sysctl: %s = %s", key, value)
        with open("/proc/sys/" + key, "w") as handle:
            handle.write(value)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """SIGTERM or SIGINT (not an Exception: nothing swallows it by accident)."""


# The watcher's reload (systemctl reload): start again with the same arguments.
RELOAD_SIGNAL = signal.SIGHUP


class Reload(Stopped):
    """SIGHUP: leave the loop and start again with the same arguments (which
    reads the options file again); the routing stays in place meanwhile."""


class stop_signals_held:  # noqa: N801 (a context manager, used like a function)
    """SIGTERM and SIGINT wait while the system is being changed: a stop comes
    after the apply, its verification and any roll back, never half way. One
    that came meanwhile is handled on the way out, inside the `with`, so the
    caller knows it came after the change. `then`: the handler from there on
    (a one-off run ignores them once its change is made: it is ending anyway)."""

    def __init__(self, then=None):
        self.then = then

    def __enter__(self):
        threading = sys.modules.get("threading")  # none imported: no thread was started, this is the main one
        if threading is None or threading.current_thread() is threading.main_thread():
            self.held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        else:
            self.held = None

    def __exit__(self, *exc):
        if self.held is None:
            return
        pending = [signum for signum in STOP_SIGNALS if signum in signal.sigpending()]
        for signum in pending:
            signal.sigtimedwait([signum], 0)  # taken off the queue: handled below, now
        if self.then is not None:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self.then)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.held)
        for signum in pending:
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


# -- Converge: one path for a one-off run and for every cycle of the watcher. -----

# Built once per process: the options, the programs found, the state record's
# path, the lock, and the test hooks (a test injects them here, nowhere else).
Context = collections.namedtuple("Context", "options programs state_file lock hooks")
# `fail_after` N > 0 fails an apply after its Nth step (MULTI_ENI_ROUTING_FAIL_AFTER).
Hooks = collections.namedtuple("Hooks", "fail_after")
NO_HOOKS = Hooks(fail_after=0)
# What one converge found and did: `changes` made (pending, for a read-only
# run); `netutils` what it found of amazon-ec2-net-utils; `stopped`: a stop
# signal came while the change was being made, which was completed first;
# `notes` the ENIs named or listed that it does not route (NotRouted).
Outcome = collections.namedtuple("Outcome", "options enis desired owned changes netutils started stopped notes")
# An ENI named with -i or listed by IMDS that is not routed, and why.
NotRouted = collections.namedtuple("NotRouted", "interface mac eni_id why")

PROGRAMS = ("ip", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")


def make_context(options, hooks=NO_HOOKS):
    """The Context of this process: root, a kernel that keeps rule protocols,
    the programs (one iptables backend), this namespace's state record."""
    if os.geteuid() != 0:
        raise ToolError("must run as root", EXIT_NOT_ROOT)
    if kernel_version() < (4, 17):
        # Older kernels drop a rule's protocol: the tool could not recognise its
        # own rules, so it could neither keep them in sync nor remove them.
        raise ToolError("Linux %s is too old: ip rules carry their protocol from 4.17 on"
                        % os.uname().release)
    programs = find_programs(PROGRAMS)
    check_iptables_backends(programs)
    return Context(options, programs, state_path(options.state_dir, netns_id()), Lock(options.state_dir), hooks)


def iptables_backend(path):
    """"nft" or "legacy" for an xtables program, None when it does not say."""
    match = re.match(r"^(?:xtables|ip6?tables)-(nft|legacy)(?:-multi|-save|-restore)$",
                     os.path.basename(os.path.realpath(path)))
    return match.group(1) if match else None


def check_iptables_backends(programs):
    """iptables-save and iptables-restore of different backends (nft, legacy)
    would write chains the save never shows: verification fails, and the roll
    back cannot see what to undo. Refused before anything changes."""
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        backends = [iptables_backend(programs[name]) for name in (save, restore)]
        if None not in backends and backends[0] != backends[1]:
            raise ToolError("%s is %s but %s is %s: make them one backend (update-alternatives --config "
                            "iptables)" % (save, backends[0], restore, backends[1]))


def read_only(options):
    """--status and --dry-run change nothing and take no lock."""
    return options.status or options.dry_run


def read_system(programs, sources=ALL_SOURCES, earlier=None):
    """(outputs, System): the reads named in `sources` made now, the
    others' outputs taken from `earlier` (a verify re-reads only what it touched)."""
    outputs = dict(earlier or {})
    outputs.update(read_outputs(programs, sources))
    return outputs, parse_system(outputs, read_sysfs(), ipv6_enabled())


def read_record(context, system):
    """The state record, without the entries of interfaces that are gone. One
    that does not validate is set aside (by a run that holds the lock) and the
    run goes on without it."""
    try:
        record = load_record(context.state_file)
    except InvalidRecord as exc:
        if read_only(context.options):
            log.warning("state record %s is not valid (%s): ignored", context.state_file, exc)
        else:
            set_record_aside(context.state_file, exc)
        record = EMPTY_RECORD
    return live_record(record, system.links)


def changes_between(desired, owned, record):
    """The Changes that take `owned` to `desired` (sysctls as they are now)."""
    values = read_sysctls(set(desired.sysctls) | set(owned.sysctls))
    return diff(desired, owned, values, originals_of(record))


def desired_state(options, system, owned, record, imds, netutils=None):
    """(ENIs, owned state to converge to): empty for a flush. `imds`: IMDS's
    answer, or None when there is none. With net-utils present and
    --net-utils coexist, its addresses are its own: none are added."""
    if options.flush:
        return [], NOTHING
    coexist = bool(netutils and netutils.present) and options.net_utils == "coexist"
    if coexist:
        log.info("amazon-ec2-net-utils is present: coexisting (rule %d ahead of its rules, "
                 "no addresses added from IMDS)", PRIO_NETUTILS)
    enis = select_enis(system, imds, options.interface, options.exclude,
                       add_from_imds=not (options.no_imds_addresses or coexist), owned_addresses=owned.addresses,
                       remembered=record.slots,
                       max_slots=min(SLOTS_MAX, TABLE_LAST - TABLE_BASE + 1, mark_capacity(options.mark_mask)))
    for eni in enis:
        log.info("ENI %s: table %d, %s, %d IPv4 and %d IPv6 addresses", eni.name, table_of(eni),
                 "from IMDS" if eni.origin == "imds" else "found locally",
                 len(eni.families[4].addresses), len(eni.families[6].addresses))
    desired = plan(enis, options.mark_mask, {link.name: link.group for link in system.links}, coexist)
    if imds is None:  # no full answer: never remove addresses added earlier
        desired = desired._replace(addresses=desired.addresses | owned.addresses)
    return enis, desired


def converge(context, imds_source=None):
    """One run, the same for a one-off and a watcher cycle: read, plan, diff;
    unless read-only, apply, verify, and roll back on failure. Its Outcome, or
    a ToolError that says whether it was rolled back and what stays if not.
    `imds_source(context)` answers for IMDS (the watcher's), else IMDS is asked."""
    started = time.monotonic()
    # IMDS first, outside the lock: the lock is never held longer than one
    # apply, whatever IMDS does, and a flush never waits on IMDS.
    imds = None
    if not (context.options.flush or context.options.no_imds):
        imds = (imds_source or ask_imds)(context)
    with contextlib.nullcontext() if read_only(context.options) else context.lock:
        outputs, system = read_system(context.programs)
        record = read_record(context, system)
        owned = owned_state(system, record)
        named, options = context.options.interface, check_interfaces(context.options, system)
        netutils = find_netutils(system)
        if named and not options.interface:  # every ENI named with -i is gone (the watcher goes on)
            enis, desired = [], NOTHING
        else:
            enis, desired = desired_state(options, system, owned, record, imds, netutils)
        notes = () if options.flush else not_routed(named, system, imds, enis, options.exclude)
        changes = changes_between(desired, owned, record)
        outcome = Outcome(options, enis, desired, owned, changes, netutils, started, stopped=False, notes=notes)
        if read_only(options):
            return outcome
        if is_empty(changes):
            keep_record(context, pruned_record(merge_record(record, desired, changes, enis), desired, enis),
                        unchanged_from=record)
            return outcome
        return apply_verified(context, outcome, outputs, record)


def ask_imds(context):
    """IMDS's answer for a one-off run (the links it should list read first)."""
    return discover_imds(context.options, read_links(), read_sysfs())


def not_routed(named, system, imds, enis, excluded=()):
    """Why ENIs named with -i or listed by IMDS are not routed (NotRouted
    each). An ENI without an interface here (EFA-only, bound to DPDK, or being
    attached) is passed over: nothing waits for it."""
    links = {link.name: link for link in system.links}
    routed = {eni.name for eni in enis}
    notes = [NotRouted(name, "", "", "named with -i, no such interface") for name in named if name not in links]
    by_mac = {link.mac: link for link in system.links if link.mac}
    for mac, meta in sorted((imds.enis if imds else {}).items(),
                            key=lambda item: (item[1].network_card, item[1].device_number)):
        link = by_mac.get(mac)
        if link is None:
            notes.append(NotRouted("", mac, meta.interface_id, "card %d device %d, no interface here has "
                                   "its MAC (EFA-only, DPDK, not attached yet, or its MAC was changed)"
                                   % (meta.network_card, meta.device_number)))
        elif link.name not in routed and not link.up and link.name not in excluded \
                and (not named or link.name in named):
            notes.append(NotRouted(link.name, mac, meta.interface_id, "down"))
    return tuple(notes)


def describe_not_routed(note):
    """One NotRouted as a phrase: what it is, then why."""
    what = note.interface or "%s (%s)" % (note.eni_id or "ENI", note.mac)
    return "%s: %s" % (what, note.why)


def not_routed_line(notes):
    """The notes in one line."""
    return "not routed: " + "; ".join(describe_not_routed(note) for note in notes)


def apply_verified(context, outcome, outputs, record):
    """Apply the outcome's changes, verify them, roll back if that fails. The
    record for the run is written first: if it cannot be, nothing changes."""
    changes, desired, enis = outcome.changes, outcome.desired, outcome.enis
    merged = merge_record(record, desired, changes, enis)
    try:
        save_record(context.state_file, merged, unchanged_from=record)
    except ToolError as exc:
        raise ToolError("%s: nothing was changed" % exc)
    failure, stopped = None, False
    try:
        with stop_signals_held(then=None if context.options.watch else signal.SIG_IGN):
            try:
                apply_changes(context.programs, changes, context.hooks.fail_after)
                verify(context, outputs, desired, merged, changes)
            except (ToolError, OSError) as exc:
                if context.options.flush:
                    failure = flush_again(context, merged, exc)
                else:
                    failure = roll_back(context, outcome.owned, record, merged, changes, exc)
            if not failure:
                keep_record(context, pruned_record(merged, desired, enis))
    except Stopped:  # handled as the signals are let through again: the change is complete
        stopped = True
    if failure:
        raise failure
    return outcome._replace(stopped=stopped)


def keep_record(context, record, unchanged_from=None):
    """Write the record after a run; if it cannot be, the one written before
    the run stays, which lists all that a flush gives back: a warning."""
    try:
        save_record(context.state_file, record, unchanged_from)
    except ToolError as exc:
        log.warning("%s; the record as it was stays (a flush gives back what it lists)", exc)


def verify(context, outputs, desired, merged, changes):
    """Re-read what the changes touched; ToolError unless it matches `desired`."""
    _, system = read_system(context.programs, sources_touched(changes), outputs)
    left = changes_between(desired, owned_state(system, merged), merged)
    if not is_empty(left):
        raise ToolError("verification failed: still pending: %s" % render(left)[0])


def roll_back(context, before, record, merged, changes, cause):
    """Converge back to the owned state read before the run (`merged`: the
    record written for this run, which knows what it added), and check that it
    did. The ToolError to raise: rolled back, or exactly what stays."""
    try:
        _, system = read_system(context.programs)
        undo = changes_between(before, owned_state(system, merged), merged)
        apply_changes(context.programs, undo._replace(sysctls=()))
        for key, new, old in reversed(changes.sysctls):
            give_back_sysctl(key, old)
        _, system = read_system(context.programs)
        left = changes_between(before, owned_state(system, merged), merged)
    except (ToolError, OSError) as exc:
        return ToolError("%s; the roll back failed too (%s): what this run changed may stay; %s -f "
                         "removes it" % (cause, exc, PROG))
    if not is_empty(left):
        return ToolError("%s; not rolled back in full, what stays: %s; %s -f removes it"
                         % (cause, "; ".join(render(left)), PROG))
    keep_record(context, record)
    return ToolError("%s; rolled back to the state before the run" % cause)


def flush_again(context, merged, cause):
    """A flush that failed half way (another program removed one of the tool's
    rules meanwhile, say) is not rolled back: that would put the routing back
    on a stop. What is left is read again and removed once more; None when
    nothing stays, else the ToolError that says what does."""
    try:
        _, system = read_system(context.programs)
        apply_changes(context.programs, changes_between(NOTHING, owned_state(system, merged), merged))
        _, system = read_system(context.programs)
        left = changes_between(NOTHING, owned_state(system, merged), merged)
    except (ToolError, OSError) as exc:
        return ToolError("%s; flushing again failed too (%s): run %s -f again" % (cause, exc, PROG))
    if not is_empty(left):
        return ToolError("%s; what stays: %s; run %s -f again" % (cause, "; ".join(render(left)), PROG))
    log.warning("%s; flushed on a second attempt", cause)
    return None


def give_back_sysctl(key, value):
    """Write an earlier value back; an interface gone meanwhile took its key along."""
    try:
        write_sysctls([(key, value, None)])
    except FileNotFoundError:
        log.info("%s is gone: nothing to give back", key)


# -- Lock: boot and hotplug runs one after the other. -----------------------------

def take_lock(state_dir, timeout=LOCK_TIMEOUT):
    """An exclusive flock on <state_dir>/lock, waiting up to `timeout` seconds.
    On a read-only or full state directory where the file cannot be made, the
    directory itself is locked: a flush must still run there."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    path = os.path.join(state_dir, "lock")
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT):
            raise
        handle = os.open(path if os.path.exists(path) else state_dir, os.O_RDONLY | os.O_CLOEXEC)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(handle)
                raise
            if time.monotonic() > deadline:
                os.close(handle)
                raise ToolError("another run holds %s for over %ds" % (path, timeout))
            time.sleep(0.05)


class Lock:
    """The lock of a state directory, taken around each changing converge (an
    admin's flush may run between two cycles of the watcher)."""

    def __init__(self, state_dir, timeout=LOCK_TIMEOUT):
        self.state_dir, self.timeout, self.handle = state_dir, timeout, None

    def __enter__(self):
        try:
            self.handle = take_lock(self.state_dir, self.timeout)
        except OSError as exc:
            raise ToolError("cannot lock %s: %s" % (self.state_dir, exc.strerror or exc))
        return self

    def __exit__(self, *exc):
        os.close(self.handle)
        self.handle = None


# -- Status. ----------------------------------------------------------------------

def status_report(enis, owned, changes, netutils=None, policy="coexist"):
    """Per ENI: its table, addresses (with origin), gateways and owned rules;
    and what the tool does about amazon-ec2-net-utils."""
    anything = (owned.rules, owned.routes, owned.addresses, owned.sysctls, owned.groups,
                any(mangle != NO_MANGLE for mangle in owned.mangle.values()))
    report = {"applied": any(anything),
              "in_sync": is_empty(changes), "pending": render(changes), "enis": [],
              "net_utils": netutils_report(netutils or NetUtils(False, None, 0), policy)}
    for eni in enis:
        table = table_of(eni)
        added = {a.cidr.split("/")[0] for a in owned.addresses if a.dev == eni.name}
        families = [eni.families[family] for family in FAMILIES]
        for own in families:
            added |= set(own.added)
        report["enis"].append({
            "name": eni.name, "mac": eni.mac, "device_number": eni.device_number,
            "network_card": eni.network_card, "slot": eni.slot, "table": table, "found_by": eni.origin,
            "addresses": [{"address": a, "origin": "imds" if a in added else "configured"}
                          for own in families for a in own.addresses],
            "not_added": [{"address": a, "why": why} for own in families for a, why in own.refused],
            "delegated_prefixes": [str(p) for own in families for p in own.prefixes],
            "gateway4": eni.families[4].gateway, "gateway6": eni.families[6].gateway,
            "rules": sum(1 for r in owned.rules if r.table == table),
            "routes": sum(1 for r in owned.routes if r.table == table)})
    return report


def netutils_report(netutils, policy):
    """amazon-ec2-net-utils in --status: found how, and what the tool does about it."""
    coexist = netutils.present and policy == "coexist"
    return {"present": netutils.present, "program": netutils.program, "rules": netutils.rules,
            "policy": policy, "rule_priority": PRIO_NETUTILS if coexist else None,
            "adds_imds_addresses": not coexist}


def netutils_line(entry):
    """The --status line on amazon-ec2-net-utils."""
    if not entry["present"]:
        return "amazon-ec2-net-utils: not found"
    found = ", ".join(filter(None, [entry["program"], "%d rules at %d-%d" % (
        entry["rules"], NETUTILS_PRIO_FIRST, NETUTILS_PRIO_LAST) if entry["rules"] else ""]))
    if entry["policy"] == "coexist":
        does = ("coexist: its rules, tables and addresses left alone; rule %d lets main's routes "
                "that do not go out through an ENI win ahead of its rules; no addresses added from "
                "IMDS" % entry["rule_priority"])
    else:
        does = "ignore: nothing done about it (its rules come before the tool's)"
    return "amazon-ec2-net-utils: present (%s); --net-utils %s" % (found, does)


ORIGINS = {"configured": "configured", "imds": "added from IMDS"}


def print_status(report):
    state = ("in sync" if report["in_sync"] else "stale") if report["applied"] else "not applied"
    print("multi-eni-routing: %s" % state)
    print(netutils_line(report["net_utils"]))
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
        for refused in eni["not_added"]:
            print("    %s (listed by IMDS, not added: %s)" % (refused["address"], refused["why"]))
    for note in report.get("not_routed", ()):
        print("not routed: " + describe_not_routed(NotRouted(**note)))
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
AF_UNSPEC = 0  # the family of a link message about the link itself
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO = 1, 3, 10, 18
IFLA_INFO_KIND = 1  # in IFLA_LINKINFO: "veth", "bridge", "vlan", "tun", ...; none on a NIC's driver
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
# IMDS polled every 9.5 s (an address assigned in EC2 is routed within 10 s),
# one request per ENI plus one: at 15 ENIs 1.7 requests/s, plus a full read (5
# per ENI plus 3) every IMDS_REDISCOVER: 0.13/s; under 2/s in all, where IMDS
# allows 1,024 packets/s per ENI for itself, DNS and NTP together.
IMDS_POLL_DEFAULT = 9.5
IMDS_REDISCOVER = 600.0
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
    family, _, index, flags, _ = IFINFO.unpack_from(payload)
    if family != AF_UNSPEC:  # a bridge's news of its ports (AF_BRIDGE): not the link itself
        return None
    if kind == RTM_DELLINK:
        return Event("link", index, None)
    attributes = netlink_attributes(payload, IFINFO.size)
    name = attributes.get(IFLA_IFNAME, b"").rstrip(b"\0").decode("utf-8", "replace")
    master = attributes.get(IFLA_MASTER)
    info = netlink_attributes(attributes.get(IFLA_LINKINFO, b""), 0)
    link_kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode("utf-8", "replace") or None
    return Event("link", index, (name, attributes.get(IFLA_ADDRESS), master,
                                 flags & (IFF_UP | IFF_RUNNING | IFF_LOWER_UP), link_kind))


def test_nics():
    """The test hook MULTI_ENI_ROUTING_TEST_NICS: name patterns of links the
    watcher takes for NICs whatever their kind (the lab's ENIs are veths)."""
    return tuple(p for p in os.environ.get("MULTI_ENI_ROUTING_TEST_NICS", "").split(",") if p)


def may_be_eni(state, named=(), nics=()):
    """Whether a link (its state in a link Event) can be an ENI: an ENI's driver
    (ena, ixgbevf, vif) registers no link kind; every virtual link has one
    (veth, bridge, vlan, tun, ...). One named with -i always can."""
    import fnmatch
    name, kind = state[0], state[4]
    return kind is None or name in named or any(fnmatch.fnmatchcase(name, p) for p in nics)


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

    def __init__(self, candidate=lambda state: True):
        self.links, self.addresses = {}, set()
        self.candidate = candidate  # may_be_eni(), with the watcher's options

    def changes(self, event):
        """Whether `event` changes what discovery would read; records it. A link
        that cannot be an ENI (a container's veth, a bridge) changes nothing,
        and neither do its addresses: container churn never wakes the watcher."""
        if event.kind == "link":
            before = self.links.get(event.key)
            if before == event.state:
                return False
            if event.state is None:
                del self.links[event.key]
                self.addresses = {a for a in self.addresses if a[0] != event.key}
            else:
                self.links[event.key] = event.state
            return any(state and self.candidate(state) for state in (before, event.state))
        if event.kind == "address":
            known = event.key in self.addresses
            if event.state:
                self.addresses.add(event.key)
            else:
                self.addresses.discard(event.key)
            link = self.links.get(event.key[0])
            return known != bool(event.state) and (link is None or self.candidate(link))
        return True  # a rule or route of ours removed, a gateway changed

    def eni_macs(self):
        """The MACs of the links that may be ENIs, as IMDS writes them."""
        return {":".join("%02x" % byte for byte in state[1]) for state in self.links.values()
                if state[1] and self.candidate(state)}

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

    def __init__(self, candidate=lambda state: True):
        self.sock = None
        self.candidate = candidate
        self.view = KernelView(candidate)
        self.open()

    def open(self):
        """Subscribe (again, on a new socket) and read the links and addresses."""
        import socket
        self.close()
        self.sock = netlink_socket()
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
        self.view = KernelView(self.candidate)
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


def netlink_socket():
    """A route netlink socket, not bound yet."""
    import _socket  # the built-in half of `socket`: the rest (its enums) costs more than a dump
    return _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)


def dump(request):
    """The Events of a netlink dump (RTM_GETLINK, RTM_GETADDR), on a socket of its own."""
    sock = netlink_socket()
    try:
        sock.settimeout(NETLINK_TIMEOUT)
        sock.bind((0, 0))
        if request == RTM_GETLINK:
            kind, body = RTM_NEWLINK, IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0)
        else:
            kind, body = RTM_NEWADDR, IFADDR.pack(AF_UNSPEC, 0, 0, 0, 0)
        return [event for event in (parse_event(kind, payload) for payload in netlink_dump(sock, request, body))
                if event]
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


class Watcher:
    """An event loop around converge(): converge, wait for netlink events or
    the next refresh, converge again."""

    def __init__(self, context):
        self.context = context
        self.stop_requested = False
        self.say = print_line
        # IMDS: its last full answer serves every converge until the poll finds
        # a change, a link that may be an ENI appears with a MAC not seen at the
        # last full read, or the answer is IMDS_REDISCOVER old.
        self.session = ImdsSession()
        self.imds = None
        self.discovered_at = None  # monotonic time of the last full read
        self.rediscover = True
        self.macs_seen = set()
        self.poll_at = None
        self.notes = ()  # why some ENIs are not routed, as last said
        options = context.options
        self.metrics = Metrics(options.metrics_file) if options.metrics_file else None
        self.converging = self.reload_requested = False

    def on_stop_signal(self, signum, frame):
        if self.stop_requested:  # a second signal: the first is being handled
            return
        self.stop_requested = True
        raise Stopped()  # never while applying: converge holds these signals

    def on_reload_signal(self, signum, frame):
        """SIGHUP: a reload, after the converge in progress if there is one."""
        if self.converging:
            self.reload_requested = True
        elif not self.stop_requested:
            raise Reload()

    def run(self):
        """Apply, then watch until stopped; the exit code."""
        previous = {signum: signal.signal(signum, self.on_stop_signal) for signum in STOP_SIGNALS}
        if not self.context.options.daemon:  # (a daemon is restarted by its init script instead)
            previous[RELOAD_SIGNAL] = signal.signal(RELOAD_SIGNAL, self.on_reload_signal)
        events = pidfile = None
        reload = False
        try:
            named, nics = self.context.options.interface, test_nics()
            events = open_netlink(lambda state: may_be_eni(state, named, nics))  # before the first apply
            schedule = Schedule(self.context.options.refresh, time.monotonic())
            code = self.converge(schedule, first=True)
            parent_exit, pidfile = self.detach(code)
            if parent_exit is not None:
                return parent_exit
            sd_notify("READY=1")
            self.loop(events, schedule)
        except Reload:
            reload = True
        except Stopped:
            pass
        finally:
            if events:
                events.close()
            if pidfile:
                remove_pidfile(pidfile)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if reload:
            self.start_again()
        sd_notify("STOPPING=1")
        log.info("stopped; the routing stays applied")
        return EXIT_OK

    def detach(self, code):
        """(the exit code of a daemon's parent or None, the pid file to remove
        at the end): with --daemon, fork; else write the pid file if asked."""
        options = self.context.options
        if options.daemon:
            parent_exit = daemonize(options.pidfile, code)
            if parent_exit is None:
                self.say = syslog_line
            return parent_exit, options.pidfile if parent_exit is None else None
        return None, write_pidfile(options.pidfile) if options.pidfile else None

    def converge(self, schedule, first=False):
        """One converge; its exit code. Failures are logged and scheduled for a
        retry, except the first apply's that no retry can mend: raised."""
        schedule.converging()
        self.converging = True
        try:
            outcome = converge(self.context, imds_source=self.imds_answer)
        except ToolError as exc:
            if first and exc.exit_code in FATAL_EXIT_CODES:
                raise
            return self.failed(schedule, str(exc), exc.exit_code)
        except Exception as exc:  # a bug or an unforeseen system error: retried all the same
            return self.failed(schedule, "unexpected %s: %s" % (exc.__class__.__name__, exc), EXIT_FAILURE)
        finally:
            self.converging = False
        schedule.succeeded(time.monotonic())
        self.report(outcome)
        if outcome.stopped:
            raise Stopped()  # held while the change was made: now
        return EXIT_OK

    def imds_answer(self, context):
        """IMDS's answer for a converge: the last full one, read anew only when
        something says it may be out of date (see __init__)."""
        now = time.monotonic()
        if self.discovered_at is not None and now - self.discovered_at >= IMDS_REDISCOVER:
            self.rediscover = True
        if self.rediscover:
            links = read_links()
            self.imds = discover_imds(context.options, links, read_sysfs(), self.session)
            self.discovered_at, self.rediscover = now, False
            self.macs_seen = {link.mac for link in links if link.mac}
        return self.imds

    def poll_imds(self, schedule):
        """The poll: a converge with a full read of IMDS soon, if its list of
        ENIs or an ENI's addresses changed (or it had no answer last time)."""
        options = self.context.options
        self.poll_at = time.monotonic() + options.imds_poll
        if self.imds is not None:
            try:
                if imds_unchanged(ImdsClient(options.imds_timeout, session=self.session), self.imds):
                    return
                log.info("IMDS lists other ENIs or addresses: reading it in full")
            except ImdsError as exc:
                self.session.count("errors")
                log.info("IMDS poll: %s", exc)
                return
        self.rediscover = True
        schedule.event(time.monotonic())

    def report(self, outcome):
        """Say what a converge did; why ENIs are not routed only when that changed."""
        line = summary(outcome)
        if is_empty(outcome.changes):
            log.info("%s", line)
        elif not self.context.options.quiet:
            self.say(line)
        if outcome.notes != self.notes:
            if outcome.notes:
                log.warning("%s", not_routed_line(outcome.notes))
            else:
                log.info("every ENI named or listed is routed again")
            self.notes = outcome.notes
        sd_notify("STATUS=" + line + ("; " + not_routed_line(outcome.notes) if outcome.notes else ""))
        if self.metrics:
            self.metrics.converged(outcome, self.session.counts)

    def failed(self, schedule, message, code):
        delay = schedule.failed(time.monotonic())
        self.say("apply failed: %s; retrying in %.0f s" % (message, delay), error=True)
        sd_notify("STATUS=apply failed: %s; retrying in %.0f s" % (message, delay))
        if self.metrics:
            self.metrics.failed(self.session.counts)
        return code

    def loop(self, events, schedule):
        """Converge when the schedule says, reading netlink events meanwhile;
        a reload (SIGHUP) leaves it, unless the options do not parse now."""
        poller = select.poll()
        poller.register(events, select.POLLIN)
        options = self.context.options
        polling = options.imds_poll and not options.no_imds
        self.poll_at = time.monotonic() + options.imds_poll if polling else None
        while not self.stop_requested:
            try:
                if self.reload_requested:  # came during a converge
                    self.reload_requested = False
                    raise Reload()
                self.step(events, poller, schedule)
            except Reload:
                if self.options_usable():
                    raise

    def step(self, events, poller, schedule):
        """Wait for an event, the next converge or the next IMDS poll, and act on it."""
        if self.poll_at is not None and self.poll_at <= time.monotonic():
            self.poll_imds(schedule)
        due = schedule.due() if self.poll_at is None else min(schedule.due(), self.poll_at)
        wait = due - time.monotonic()
        if schedule.due() <= time.monotonic():
            self.converge(schedule)
        elif wait > 0 and poller.poll(max(1, int(wait * 1000 + 1))):
            reasons = self.read_events(events, poller)
            if reasons:
                log.info("converge soon: %s", "; ".join(reasons[:5]) + (
                    " (and %d more)" % (len(reasons) - 5) if len(reasons) > 5 else ""))
                schedule.event(time.monotonic())
                unseen = events.view.eni_macs() - self.macs_seen
                if unseen and not self.rediscover:
                    log.info("a link that may be an ENI is new (%s): IMDS is read again",
                             ", ".join(sorted(unseen)))
                    self.rediscover = True

    def options_usable(self):
        """Whether the arguments, the options file included, parse now; if not,
        the watcher goes on with the ones it has (said once, in the journal)."""
        try:
            parse_args(None)
            return True
        except UsageError as exc:
            self.say("reload refused, the options stay as they were: %s" % exc, error=True)
            return False

    def start_again(self):
        """Replace this process by a new watcher with the same arguments (same
        pid, so systemd and the pid file still name it); the routing stays."""
        self.say("reloading: starting again with the same arguments")
        sys.stdout.flush()
        sys.stderr.flush()
        argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
        os.execv(sys.executable, argv)

    def read_events(self, events, poller):
        """The reasons to converge among the pending messages."""
        try:
            return events.read()
        except OSError as exc:  # unforeseen: a new socket, and converge as after an overrun
            log.error("reading netlink messages failed (%s): watching anew", exc.strerror or exc)
            poller.unregister(events)
            events.open()
            poller.register(events, select.POLLIN)
            return ["netlink error"]


def open_netlink(candidate):
    """The NetlinkWatch of the watcher (`candidate`: which links may be ENIs),
    or a ToolError saying why not."""
    try:
        return NetlinkWatch(candidate)
    except OSError as exc:
        raise ToolError("cannot watch the kernel's routing messages (netlink): %s" % (exc.strerror or exc))


def print_line(line, error=False):
    """A line of the watcher in the foreground (the journal)."""
    stream = sys.stderr if error else sys.stdout
    try:
        stream.write("%s%s\n" % ("%s: error: " % PROG if error else "", line))
        stream.flush()
    except (OSError, ValueError):  # the journal gone for a moment: keep watching
        pass


def syslog_line(line, error=False):
    """A line of the watcher as a daemon."""
    import syslog
    syslog.syslog(syslog.LOG_ERR if error else syslog.LOG_INFO, line)


def daemonize(pidfile, code):
    """Fork: the parent waits until the child has written the pid file and gets
    its exit code back (`code`, the first apply's, or EXIT_FAILURE if the child
    could not start); the child detaches (own session, /, no terminal), sends
    the log to syslog, and gets None."""
    ready_read, ready_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork():
        os.close(ready_write)
        started = os.read(ready_read, 1) == b"1"  # b"" if the child died first
        os.close(ready_read)
        return code if started else EXIT_FAILURE
    os.close(ready_read)
    os.setsid()
    try:
        write_pidfile(pidfile)
    except ToolError as exc:  # still on the caller's stderr: say why, once
        sys.stderr.write("%s: error: %s\n" % (PROG, exc))
        sys.stderr.flush()
        os._exit(EXIT_FAILURE)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    log.to_syslog()
    os.write(ready_write, b"1")
    os.close(ready_write)
    return None


# What the metrics say of one ENI: routed (1) or not (0), its addresses by
# family, when the last converge that covered it ended and whether it succeeded.
EniMetrics = collections.namedtuple("EniMetrics", "routed ipv4 ipv6 time success")


class Metrics:
    """The watcher's metrics in Prometheus text format, for node_exporter's
    textfile collector: the whole file written anew after every converge, to
    a temporary file renamed over it (the collector never reads half a file)."""

    def __init__(self, path):
        self.path = path
        self.converges = self.failures = 0
        self.last = None  # (time, success) of the last converge
        self.enis = {}  # (interface, mac) -> EniMetrics
        self.complained = False

    def converged(self, outcome, imds_counts):
        now = time.time()
        self.converges += 1
        self.last = (now, 1)
        self.enis = {(eni.name, eni.mac): EniMetrics(1, len(eni.families[4].addresses),
                                                     len(eni.families[6].addresses), now, 1)
                     for eni in outcome.enis}
        for note in outcome.notes:
            self.enis[(note.interface, note.mac)] = EniMetrics(0, 0, 0, now, 1)
        self.write(imds_counts)

    def failed(self, imds_counts):
        """A failed converge: every ENI it covered has that result now."""
        now = time.time()
        self.converges += 1
        self.failures += 1
        self.last = (now, 0)
        self.enis = {key: value._replace(time=now, success=0) for key, value in self.enis.items()}
        self.write(imds_counts)

    def text(self, imds_counts):
        """The metrics, in the text exposition format."""
        lines = []

        def family(name, kind, help_text, samples):
            lines.extend(["# HELP multi_eni_routing_%s %s" % (name, help_text),
                          "# TYPE multi_eni_routing_%s %s" % (name, kind)])
            for labels, value in samples:
                label_text = ",".join('%s="%s"' % (key, prometheus_escape(val)) for key, val in labels)
                lines.append("multi_eni_routing_%s%s %s" % (name, "{%s}" % label_text if labels else "",
                                                            repr(float(value)) if isinstance(value, float) else value))

        enis = [((("interface", name), ("mac", mac)), value) for (name, mac), value in sorted(self.enis.items())]
        family("eni_routed", "gauge", "1 if the ENI is routed, 0 if it is named or listed but not routed.",
               [(labels, value.routed) for labels, value in enis])
        family("eni_addresses", "gauge", "Addresses routed through the ENI, by family.",
               [(labels + (("family", family_name),), getattr(value, family_name))
                for labels, value in enis for family_name in ("ipv4", "ipv6")])
        family("eni_last_converge_timestamp_seconds", "gauge", "When the last converge that covered the ENI ended.",
               [(labels, value.time) for labels, value in enis])
        family("eni_last_converge_success", "gauge", "1 if the last converge that covered the ENI succeeded.",
               [(labels, value.success) for labels, value in enis])
        if self.last:
            family("last_converge_timestamp_seconds", "gauge", "When the last converge ended.", [((), self.last[0])])
            family("last_converge_success", "gauge", "1 if the last converge succeeded.", [((), self.last[1])])
        family("converges_total", "counter", "Converges run (applies, most of them changing nothing).",
               [((), self.converges)])
        family("converge_failures_total", "counter", "Converges that failed (and were rolled back).",
               [((), self.failures)])
        family("imds_requests_total", "counter", "HTTP requests sent to the instance metadata service.",
               [((), imds_counts["requests"])])
        family("imds_errors_total", "counter", "IMDS reads and polls that gave no usable answer.",
               [((), imds_counts["errors"])])
        return "\n".join(lines) + "\n"

    def write(self, imds_counts):
        """Write the file; a failure is said once, until writing works again."""
        try:
            write_atomically(self.path, self.text(imds_counts))
            self.complained = False
        except OSError as exc:
            if not self.complained:
                log.warning("cannot write the metrics file %s: %s", self.path, exc.strerror or exc)
                self.complained = True


def prometheus_escape(value):
    """A label value as the text format quotes it."""
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def write_pidfile(path):
    """Write our pid to `path` atomically; return the path."""
    try:
        write_atomically(path, "%d\n" % os.getpid())
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
            # A receiver that does not read (its queue full) never stops the
            # watcher: a STATUS is dropped at once, READY and STOPPING wait 2 s.
            sock.settimeout(0 if message.startswith("STATUS=") else 2.0)
            sock.sendto(message.encode("utf-8", "replace"), address)
    except OSError as exc:
        log.debug("sd_notify: %s", exc)


def watch(context):
    """--watch: a long-running process, so the cyclic garbage collector is back
    on (run_as_program() turned it off for one-off runs)."""
    gc.enable()
    return Watcher(context).run()


# -- Command line. ----------------------------------------------------------------

EPILOG = (
    "Per ENI it adds a table, a rule for its connection mark and one per subnet that is the ENI's "
    "alone (per address only where a subnet is shared), plus one rule that lets main's routes win "
    "unless they go out through an ENI. Everything the tool adds carries its marker: rules and "
    "routes protocol %d (tables %d-%d), link group %d, mangle chain %s and rules commented %s, "
    "and a state record for the sysctls it changed and the addresses it added. Connection marks "
    "use the bits of --mark-mask only, and a packet that already has a mark keeps it. Flush "
    "removes exactly that. Exit codes: "
    "0 success (also when interrupted once the change was being made: it completes first); 1 failure "
    "(nothing changed, or the run was rolled back, or the line says what stays, which -f removes), or "
    "with --status applied but stale; 2 bad usage; 3 with --status: nothing applied; 4 not root; 5 a "
    "required program is missing.")


class UsageError(ToolError):
    """Bad usage: one line naming the program, exit 2."""

    def __init__(self, message, prog=PROG):
        super().__init__(message, EXIT_USAGE)
        self.prog = prog


def one_line_parser(**settings):
    """An argparse parser whose errors are raised as UsageError (the edge
    prints them); argparse is imported here: see the imports."""
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        adding = True  # build_parser() clears it once every option is added

        def error(self, message):
            raise UsageError("%s (see --help)" % message, self.prog)

        def _get_formatter(self):
            # add_argument() formats each option's metavar to check it, with a
            # formatter that asks for the terminal's width: shutil and its
            # imports, 3 ms of every run, for a width a metavar does not use.
            # --help and usage get the terminal's width as ever.
            if self.adding:
                return self.formatter_class(prog=self.prog, width=80)
            return super()._get_formatter()

    return OneLineParser(**settings)


def argument_error(message):
    """What an option's type function raises for a bad value."""
    import argparse
    return argparse.ArgumentTypeError(message)


def program_name():
    """"multi-eni-routing" as the pip console script, the file's name otherwise."""
    return PROG if os.path.basename(sys.argv[0]) == PROG else "multi-eni-routing.py"


# The options, as parse_args returns them: a record nothing changes afterwards
# (validate() and check_interfaces() return a new one). Lists are tuples.
Options = collections.namedtuple("Options", (
    "flush status watch dry_run json interface exclude no_imds no_imds_addresses imds_timeout "
    "net_utils mark_mask refresh imds_poll metrics_file daemon pidfile state_dir verbose quiet options_file "
    "unless_restarting"))


def options_of(namespace):
    """The Options record of an argparse namespace."""
    return Options(**{name: tuple(value) if isinstance(value, list) else value
                      for name, value in vars(namespace).items()})


def parse_args(argv):
    """The options, validated: the command line's, after those of --options-file
    FILE. A flush uses what it can of a bad options file (see flush_options),
    so that stopping always removes the routing. Raises UsageError."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:  # answered without building the parser, as argparse would
        print("%s %s" % (program_name(), VERSION))
        raise SystemExit(EXIT_OK)
    parser = build_parser()
    given = parser.parse_args(argv)
    if not given.options_file:
        return validate(options_of(given))
    try:
        return validate(options_of(parser.parse_args(read_options_file(given.options_file) + argv)))
    except UsageError as problem:
        if not given.flush:
            raise
        if not given.quiet:  # -q: the unit's stop; the start said it already
            log.warning("flushing despite the options file %s: %s", given.options_file,
                        str(problem).replace(" (see --help)", ""))
        return flush_options(parser, given, argv)


def flush_options(parser, given, argv):
    """A flush with a bad options file: the file's words the parser knows (its
    --state-dir says where the sysctls to give back are recorded), else the
    command line's alone. The same parser: errors are UsageError as ever."""
    try:
        return validate(options_of(parser.parse_known_args(read_options_file(given.options_file) + argv)[0]))
    except UsageError:
        return validate(options_of(given))


def read_options_file(path):
    """The words of an options file: the tool's arguments, split like a shell
    would (quotes, # comments) but with no expansion of any kind. The old
    format, MULTI_ENI_ROUTING_OPTS="...", is read too; other assignments of
    the old format (hotplug settings) are ignored. Raises UsageError."""
    try:
        with open(path) as options:
            import shlex
            words = shlex.split(options.read(), comments=True)
        found = []
        for word in words:
            name, assigned, value = word.partition("=")
            if assigned and name == "MULTI_ENI_ROUTING_OPTS":
                found += shlex.split(value)
            elif not (assigned and name.startswith("MULTI_ENI_ROUTING_")):
                found.append(word)
    except (OSError, ValueError) as exc:  # ValueError: an unclosed quote, a NUL byte, not UTF-8
        raise UsageError("options file %s: %s" % (path, getattr(exc, "strerror", None) or exc))
    return found


def build_parser():
    parser = one_line_parser(
        prog=program_name(),
        description="Give every ENI of this EC2 instance its own policy routing, so that "
                    "every address of every ENI answers through its own ENI. Without an "
                    "action: apply (converge to the plan; safe to repeat).",
        epilog=EPILOG % (RT_PROTO, TABLE_BASE, TABLE_LAST, ENI_GROUP, CHAIN_PREROUTING, JUMP_COMMENT))
    action = parser.add_mutually_exclusive_group()
    action.add_argument("-f", "--flush", action="store_true",
                        help="remove every rule, route, chain and address the tool added and give "
                             "back the sysctls it changed; touches nothing else")
    action.add_argument("--status", action="store_true",
                        help="show what is applied per ENI; exit 0 in sync, 1 stale, 3 not applied")
    action.add_argument("--watch", action="store_true",
                        help="apply, then stay in the foreground and apply again within seconds "
                             "whenever a link that may be an ENI, its address, a gateway or one of "
                             "the tool's rules or routes changes (kernel netlink messages; veths, "
                             "bridges and other virtual links are ignored), when IMDS lists other "
                             "ENIs or addresses (--imds-poll), and every --refresh seconds; a "
                             "failed apply is retried with backoff. An ENI named with -i that is "
                             "gone does not stop it. SIGTERM or SIGINT ends it (exit 0) leaving the "
                             "routing applied. Tells systemd (Type=notify) when the first apply is "
                             "done, and in its status line what is not routed and why")
    parser.add_argument("--unless-restarting", metavar="UNIT",
                        help="with --flush: flush nothing while systemd restarts UNIT (its "
                             "ExecStopPost=): a restart job, or a crash that the unit's Restart= "
                             "restarts, so that the next watcher takes the routing over "
                             "without a gap; only a stop removes it")
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
                        help="one deadline over IMDS's whole answer: connecting, the token, "
                             "every request with its retries, every byte (default 5); an IMDS that "
                             "does not answer at all is given up on within 2 s. Asked before the "
                             "lock is taken: a flush never waits on it")
    parser.add_argument("--net-utils", choices=NETUTILS_POLICIES, default="coexist",
                        help="where amazon-ec2-net-utils is present (Amazon Linux 2023): coexist "
                             "(default) leaves its rules, tables and addresses alone, adds no "
                             "addresses from IMDS, and adds one rule (%d) ahead of its rules so "
                             "that main's routes not through an ENI (containers, VPNs) win; "
                             "ignore does nothing about it" % PRIO_NETUTILS)
    parser.add_argument("--mark-mask", type=mark_mask_arg, default=DEFAULT_MARK_MASK, metavar="MASK",
                        help="connmark bits the tool may use, one run of at least 2 bits, not all 32 "
                             "(default %#x: 62 ENIs); move them when other software uses these bits"
                             % DEFAULT_MARK_MASK)
    parser.add_argument("--refresh", type=refresh_arg, default=None, metavar="SECONDS",
                        help="with --watch: apply at least this often, even without events "
                             "(default %d; 1 to 86400); IMDS is read in full then when its last "
                             "full answer is %d s old" % (REFRESH_DEFAULT, IMDS_REDISCOVER))
    parser.add_argument("--imds-poll", type=poll_arg, default=None, metavar="SECONDS",
                        help="with --watch: this often, ask IMDS for its list of ENIs and, per "
                             "ENI, for its IPv4 addresses (IPv6 on an IPv6-only ENI): one request "
                             "per ENI plus one. Read in full and applied when they changed, so an "
                             "address assigned in EC2 is routed within SECONDS (default %g; 0: "
                             "never)" % IMDS_POLL_DEFAULT)
    parser.add_argument("--metrics-file", metavar="FILE",
                        help="with --watch: keep FILE up to date with Prometheus text-format "
                             "metrics (per ENI: routed, addresses; converges, failures, IMDS "
                             "requests), written atomically: put it in node_exporter's "
                             "--collector.textfile.directory, named *.prom")
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
    parser.adding = False
    return parser


def validate(options):
    """The options with their defaults filled in, checked together; raises
    UsageError. --refresh, --daemon and --pidfile go with --watch, which
    changes the system."""
    for option, given in (("--refresh", options.refresh is not None), ("--daemon", options.daemon),
                          ("--pidfile", options.pidfile), ("--imds-poll", options.imds_poll is not None),
                          ("--metrics-file", options.metrics_file)):
        if given and not options.watch:
            raise UsageError("%s goes with --watch" % option)
    if options.json and not options.status:
        raise UsageError("--json goes with --status")
    if options.unless_restarting and not options.flush:
        raise UsageError("--unless-restarting goes with --flush")
    if options.watch and options.dry_run:
        raise UsageError("--watch changes the system: it does not go with --dry-run")
    if options.daemon and not options.pidfile:
        raise UsageError("--daemon needs --pidfile FILE")
    return options._replace(
        pidfile=os.path.abspath(options.pidfile) if options.pidfile else None,  # the daemon changes to /
        metrics_file=os.path.abspath(options.metrics_file) if options.metrics_file else None,
        refresh=REFRESH_DEFAULT if options.refresh is None else options.refresh,
        imds_poll=IMDS_POLL_DEFAULT if options.imds_poll is None else options.imds_poll)


def seconds_type(low, high, never=False):
    """An argparse type: seconds from `low` (excluded when 0) to `high`, or 0
    for "never" where `never`."""
    bound = "%s %s SECONDS <= %s" % (low, "<" if low == 0 else "<=", high)

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argument_error("not a number of seconds: %r" % text)
        inside = low < value <= high if low == 0 else low <= value <= high
        if not (inside or never and value == 0):
            raise argument_error("%r: give %s%s" % (text, "0 (never) or " if never else "", bound))
        return value
    return parse


refresh_arg = seconds_type(1, 86400)
poll_arg = seconds_type(1, 86400, never=True)
seconds_arg = seconds_type(0, 300)


def mark_mask_arg(text):
    try:
        value = int(text, 0)
    except ValueError:
        raise argument_error("not a number: %r" % text)
    run_of_bits = value >> ((value & -value).bit_length() - 1) if value > 0 else 0
    if not 0 < value <= 0xFFFFFFFF or run_of_bits & (run_of_bits + 1):
        raise argument_error("%r is not one run of set bits" % text)
    if value == 0xFFFFFFFF:  # iptables-save then prints the masks as defaults: never verified
        raise argument_error("%r: the tool needs fewer than all 32 bits" % text)
    if mark_capacity(value) < 2:  # 0 is "unmarked", all bits "seen"; an ENI alone needs no mark
        raise argument_error("%r numbers %d ENI: give two bits or more" % (text, mark_capacity(value)))
    return value


def setup_logging(verbose, quiet):
    """-v and -q are counters: -v info, -vv every command; -q errors only."""
    log.level = {-1: Log.ERROR, 0: Log.WARNING, 1: Log.INFO}.get(max(-1, min(verbose - quiet, 2)), Log.DEBUG)


def discover_imds(options, links, sysfs, session=None):
    """IMDS's view, or None (and why) when it does not answer. `links` and
    `sysfs` say which NICs IMDS should list; `session` counts the requests."""
    named = set(options.interface)
    expected = {link.mac for link in links if link.name in named
                or (not named and looks_like_eni(link, sysfs) and link.name not in options.exclude)}
    session = session or ImdsSession()
    try:
        return fetch_imds(ImdsClient(options.imds_timeout, session=session), expected)
    except ImdsError as exc:
        session.count("errors")
        log.warning("instance metadata not usable (%s): using the interfaces found here", exc)
        return None


def check_interfaces(options, system):
    """The options with -i checked against the system: naming a missing
    interface is a usage error for apply; flush and status must still work
    after that ENI was detached, so they get options without the name."""
    unsafe = [name for name in options.interface if not SAFE_NAME.match(name)]
    if unsafe and not (options.flush or options.status):
        raise UsageError("cannot route %s: an interface name must be 1-15 of [A-Za-z0-9_.-]"
                         % ", ".join(repr(name) for name in unsafe))
    names = {link.name for link in system.links if SAFE_NAME.match(link.name)}
    missing = [name for name in options.interface if name not in names]
    if missing and not (options.flush or options.status or options.watch):
        raise UsageError("no such interface: %s" % ", ".join(missing))
    if missing and not (options.status or options.watch):  # those say it in their notes
        log.warning("no such interface: %s (ignored)", ", ".join(missing))
    return options._replace(interface=tuple(name for name in options.interface if name in names))


def main(argv=None, fail_after=0, exiting=False):
    """Run the tool; return its exit code. Every error is one line on stderr,
    caught here. `fail_after` N > 0 (a test hook) fails an apply after its Nth step.
    `exiting`: the process ends with this code, so SIGINT and SIGTERM are ignored
    from the moment the run is over (a stop then would only turn a completed
    run's exit code into "killed"); otherwise their handlers are given back."""
    previous = {signum: signal.signal(signum, stop_once()) for signum in STOP_SIGNALS}
    try:
        options = parse_args(argv)
        setup_logging(options.verbose, options.quiet)
        restarting = options.unless_restarting and restart_pending(options.unless_restarting)
        if restarting:
            if not options.quiet:
                print("not flushed: %s %s, its next watcher keeps the routing"
                      % (options.unless_restarting, restarting))
            return EXIT_OK
        context = make_context(options, Hooks(fail_after=fail_after))
        return watch(context) if options.watch else execute(context)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        sys.stderr.write("%s: error: %s\n" % (exc.prog, exc))
        return EXIT_USAGE
    except ToolError as exc:
        sys.stderr.write("%s: error: %s\n" % (PROG, exc))
        return exc.exit_code
    except (Stopped, KeyboardInterrupt):  # before any change (once made, they are ignored)
        sys.stderr.write("%s: interrupted: nothing was changed\n" % PROG)
        return EXIT_FAILURE
    except Exception as exc:  # a bug or an unforeseen system error: still one line
        if log.level <= Log.DEBUG:
            import traceback
            traceback.print_exc()
        sys.stderr.write("%s: error: unexpected %s: %s (-vv shows where)\n"
                         % (PROG, exc.__class__.__name__, exc))
        return EXIT_FAILURE
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if exiting else handler)


def restart_pending(unit, environ=None):
    """Why systemd starts UNIT again right after this stop ("" when it does not
    or cannot tell, so that a stop flushes): a restart job (systemctl restart,
    try-restart, a package upgrade), or a failure of the watcher that the
    unit's Restart= policy restarts (systemd tells ExecStopPost= how the
    service ended in SERVICE_RESULT and EXIT_STATUS), so that a crash does not
    take the routing away for RestartSec=. A queued stop job always flushes."""
    environ = os.environ if environ is None else environ
    systemctl = which("systemctl")
    if not systemctl:
        return ""
    try:
        jobs = run([systemctl, "list-jobs", "--no-legend", "--no-pager", "--full", "--", unit])
    except ToolError as exc:
        log.warning("cannot ask systemd for the jobs of %s (%s): flushing", unit, exc)
        return ""
    # lines: JOB UNIT TYPE STATE
    types = {fields[2] for fields in (line.split() for line in jobs.splitlines())
             if len(fields) > 2 and fields[1] == unit}
    if types & {"restart", "try-restart"}:
        return "is restarting"
    result = environ.get("SERVICE_RESULT", "success")
    if "stop" in types or result == "success":
        return ""
    try:
        policy = dict(line.split("=", 1) for line in run(
            [systemctl, "show", "--property", "Restart", "--property", "RestartPreventExitStatus",
             "--", unit]).splitlines() if "=" in line)
    except ToolError as exc:
        log.warning("cannot ask systemd how %s restarts (%s): flushing", unit, exc)
        return ""
    return "ended (%s) and is restarted" % result \
        if restarts_after(policy, result, environ.get("EXIT_STATUS", "")) else ""


# Which service results each Restart= setting restarts (systemd.service(5),
# "Table 2"); a clean exit ("success") is never taken for a crash here.
RESTARTED_RESULTS = {
    "always": {"exit-code", "signal", "core-dump", "watchdog", "timeout"},
    "on-failure": {"exit-code", "signal", "core-dump", "watchdog", "timeout"},
    "on-abnormal": {"signal", "core-dump", "watchdog", "timeout"},
    "on-abort": {"signal", "core-dump"},
    "on-watchdog": {"watchdog"},
}


def restarts_after(policy, result, status):
    """Whether systemd restarts a service with POLICY (its Restart= and
    RestartPreventExitStatus= as `systemctl show` prints them) after it ended
    with RESULT and EXIT_STATUS (a number, or a signal's name without SIG)."""
    if result not in RESTARTED_RESULTS.get(policy.get("Restart", "no"), ()):
        return False
    def plain(word):  # "2", "KILL" ("SIGKILL" as some versions print it)
        word = word.upper()
        return word[3:] if word.startswith("SIG") else word
    return plain(status) not in {plain(word) for word in policy.get("RestartPreventExitStatus", "").split()}


def stop_once():
    """A handler for SIGINT and SIGTERM: Stopped, once (the second waits for the first)."""
    seen = []

    def handler(signum, frame):
        if not seen:
            seen.append(signum)
            raise Stopped()
    return handler


def execute(context):
    """A one-off run (apply, flush, --status, --dry-run): one converge, its
    result on stdout, its exit code."""
    outcome = converge(context)
    options = outcome.options
    if options.status:
        return show_status(options, outcome.enis, outcome.owned, outcome.changes, outcome.netutils,
                           outcome.notes)
    if outcome.notes:
        log.warning("%s", not_routed_line(outcome.notes))
    if options.dry_run:
        print("\n".join(render(outcome.changes)) if not is_empty(outcome.changes) else "in sync: nothing to do")
    elif not options.quiet:
        print(summary(outcome))
    return EXIT_OK


def show_status(options, enis, owned, changes, netutils=None, notes=()):
    """Print the status; its exit code: 0 in sync, 1 stale, 3 not applied."""
    report = status_report(enis, owned, changes, netutils, options.net_utils)
    report["not_routed"] = [dict(note._asdict()) for note in notes]
    if options.json:
        import json
        print(json.dumps(report, indent=1))
    else:
        print_status(report)
    if not report["applied"]:
        return EXIT_NOT_APPLIED
    return EXIT_OK if report["in_sync"] else EXIT_FAILURE


def summary(outcome):
    """One line saying what the run did."""
    options, enis, desired, changes = outcome.options, outcome.enis, outcome.desired, outcome.changes
    elapsed = (time.monotonic() - outcome.started) * 1000
    count = len(render(changes))
    if options.flush:
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


def run_as_program():
    """The tool as a program: a short run that builds thousands of small objects
    and no cycles worth collecting, so the cyclic collector would only cost time
    (~5 ms at 15x50); the test hook MULTI_ENI_ROUTING_FAIL_AFTER; a quick exit."""
    gc.disable()
    exit_at_once(main(fail_after=int(os.environ.get("MULTI_ENI_ROUTING_FAIL_AFTER") or 0), exiting=True))


def console_main():
    """Entry point of the `multi-eni-routing` console script."""
    run_as_program()


if __name__ == "__main__":
    run_as_program()
