#!/usr/bin/env python3
"""What the tool's connection marking costs per packet (issue 16).

Run as root from anywhere:  python3 bench/datapath.py [--enis 15] [--cycles 30] [--slice 0.5]
                              [--no-old] [--no-floor] [--json FILE] [--check]

It builds the simulated VPC of tests/lab.py (network namespaces mer-<id>-*,
deleted again, also on failure) with ENIS ENIs (eth0 .. eth14 at 15), applies
multi_eni_routing.py there (IMDS from the lab's emulator), and measures with
iperf3 from the lab's client ("the internet") to servers bound to an address
of the first ENI and of the last:

  pps first / pps last   64-byte UDP datagrams as fast as the client sends
                         (-u -b 0 -l 64), to eth0's and to the last ENI's
                         address: (cpu) datagrams sent per CPU-second of the
                         sending iperf3, (wall) datagrams the instance
                         received per second
  tcp                    TCP to the last ENI's address: (cpu) bits the ENI
                         received per CPU-second of both iperf3s, (wall) per
                         second

in each of these arms, the same routing (the tool's rules and routes) in all:

  chains   the tool's mangle rules, exactly as it applied them
  none     no mangle rule of the tool's at all
  marker-first  the tool's rules as the version before wrote them, the
           comment match first (with iptables-nft every match of a rule a
           packet reaches is evaluated, the comment too)
  old      the layout before issue 16 (every packet jumps into the per-ENI
           chain; `--no-old` leaves this arm and marker-first out)
  floor    two rules in mangle PREROUTING that match nothing, one match
           each: what a packet of a known connection meets of the tool's
           (two rules, turned away by the first match of each), whatever the
           rules do (`--no-floor`: left out)
  hooks    the built-in chains the tool's rules live in (mangle PREROUTING
           and OUTPUT), empty: what the chains alone cost (`--no-floor`: left
           out too)
  native   (nft only) the tool's rules as native nftables rules in a table
           of their own, the same tests in the same order and hooks: what
           they would cost without iptables-nft's xt calls (`--no-floor`:
           left out too)

Conntrack is in use in every arm, as on any host with Docker or a stateful
firewall: a filter rule `-A INPUT -m conntrack --ctstate INVALID -j DROP` is
in place throughout (and the bench checks that connections are tracked). With
iptables-nft every built-in chain that exists is a netfilter hook every packet
passes, empty or not, and a chain exists once a rule or a declaration (`:INPUT
ACCEPT`, as iptables-save prints for all five) made it; so an arm is switched
by deleting the mangle table (`nft delete table`) and restoring only its rules,
without declaring the built-in chains: each arm has the chains its rules use,
as the tool leaves them ("none": no mangle table at all, as on an instance
before the tool). With iptables-legacy (or without nft) the table is replaced
whole instead (legacy's mangle table hooks all five chains anyway).

Each figure is one iperf3 stream under which the arms take turns: a cycle
gives each arm one slice (`--slice` seconds, after SETTLE), in an order that
rotates cycle by cycle; a slice's figure is the difference of counters read
from /proc at its start and end (the client's and server's CPU time from
their schedstat, datagrams from the namespaces' /proc/net/snmp, bytes from
/proc/net/dev). Arms half a second apart see nearly the same machine, so the
per-cycle ratios resolve a per cent where separate runs seconds apart on this
shared VM did not. Each figure is the median over the cycles; the ratios to
"none" are given of those medians and as the median of each cycle's own
ratio with its quartiles, all from one run. At the end the tool's own
--dry-run must find its state in sync (the "chains" arm is the tool's).

Targets (issue 16): chains/none >= 0.98 for packets per second (first and last
ENI), >= 0.99 for TCP, per CPU-second. `--check` exits 1 when one is missed.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from lab import Lab, applied, eventually  # noqa: E402

IPERF_PORTS = {"first": 5201, "last": 5202}
TARGETS = {"pps first": 0.98, "pps last": 0.98, "tcp": 0.99}  # chains/none, checked per CPU-second
NATIVE_TABLE = "multi-eni-native"  # the native arm's table
SETTLE = 0.1  # seconds after switching arms before a slice starts (the old table's rules are gone)
OLD_MASK = 0x3F00  # the layout before issue 16 used the default mask
CONNTRACK_RULE = "-A INPUT -m conntrack --ctstate INVALID -j DROP"
CHAIN = "MULTI-ENI-PREROUTING"
# Two rules every packet evaluates and none matches (no such connection mark):
# the tool's layout makes a packet of a known connection meet two in PREROUTING.
INERT = ["-A PREROUTING -m connmark --mark 0x1234/0xffff", "-A PREROUTING -m connmark --mark 0x1235/0xffff"]
HOOKS = [":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]  # the built-in chains the tool's rules use
BUILT_IN = (":PREROUTING ", ":INPUT ", ":FORWARD ", ":OUTPUT ", ":POSTROUTING ")  # declarations
EMPTY_MANGLE = ["*mangle", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]


def cpu_ns(pid):
    """CPU time of a process so far, all its threads, in nanoseconds (the
    scheduler's own count: finer than clock ticks)."""
    total = 0
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/schedstat" % (pid, task)) as handle:
            total += int(handle.read().split()[0])
    return total


def proc_counter(pid, name, section, field):
    """A counter of /proc/PID/net/NAME (snmp, netstat): the process's network
    namespace's, read without entering it."""
    with open("/proc/%d/net/%s" % (pid, name)) as handle:
        lines = [line.split() for line in handle if line.startswith(section + ":")]
    return int(lines[1][lines[0].index(field)])


def rx_bytes(pid, device):
    """Bytes DEVICE received, in PID's network namespace."""
    with open("/proc/%d/net/dev" % pid) as handle:
        for line in handle:
            name, _, counters = line.partition(":")
            if name.strip() == device:
                return int(counters.split()[0])
    raise RuntimeError("no device %s in /proc/%d/net/dev" % (device, pid))


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Per-packet cost of the tool's mangle rules (issue 16).")
    parser.add_argument("--enis", type=int, default=15, help="ENIs in the lab (default 15, 2-15)")
    parser.add_argument("--cycles", type=int, default=30,
                        help="cycles per figure, each arm one slice per cycle (default 30, >= 5)")
    parser.add_argument("--slice", type=float, default=0.5, help="seconds per slice (default 0.5)")
    parser.add_argument("--no-old", action="store_true", help="leave out the arm with the layout before issue 16")
    parser.add_argument("--no-floor", action="store_true",
                        help="leave out the arms floor, hooks and native")
    parser.add_argument("--arms", metavar="LIST",
                        help="comma-separated arms to run (default: all; chains and none are always run)")
    parser.add_argument("--json", metavar="FILE", help="also write every sample and the ratios to FILE")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if not 2 <= args.enis <= 15 or args.cycles < 5 or not 0.1 <= args.slice <= 10:
        parser.error("give 2 <= --enis <= 15, --cycles >= 5, 0.1 <= --slice <= 10")
    return args


def old_mangle(enis):
    """The mangle table the tool left before issue 16, for ENIS (in slot order)."""
    mask = "%#x" % OLD_MASK
    restore = ("-m conntrack --ctdir REPLY -m connmark ! --mark 0x0/{m} -j CONNMARK --restore-mark "
               "--nfmask {m} --ctmask {m}".format(m=mask))
    return EMPTY_MANGLE + [
        ":MULTI-ENI-OUTPUT - [0:0]", ":%s - [0:0]" % CHAIN,
        "-A PREROUTING -m comment --comment multi-eni-routing -j " + CHAIN,
        "-A OUTPUT -m comment --comment multi-eni-routing -j MULTI-ENI-OUTPUT",
        "-A MULTI-ENI-OUTPUT " + restore,
    ] + ["-A %s -i %s -m conntrack --ctdir ORIGINAL -m connmark --mark 0x0/%s -j CONNMARK --set-xmark %#x/%s"
         % (CHAIN, eni.name, mask, (slot + 1) << 8, mask) for slot, eni in enumerate(enis)
         ] + ["-A %s %s" % (CHAIN, restore), "COMMIT", ""]


def native_rules(enis):
    """The tool's rules for ENIS as native nftables rules (nft -f input): the
    same tests in the same order, at mangle's priority in the same hooks."""
    mask, keep = OLD_MASK, 0xFFFFFFFF ^ OLD_MASK
    restore = ("ct direction reply ct mark and {m:#x} != 0x0 ct mark and {m:#x} != {m:#x} meta mark 0x0 "
               "meta mark set ct mark and {m:#x}".format(m=mask))
    marking = ['iifname "%s" ct mark set ct mark and %#x or %#x return' % (eni.name, keep, (slot + 1) << 8)
               for slot, eni in enumerate(enis)] + ["ct mark set ct mark or %#x" % mask]
    return "\n".join(
        ["table ip %s {" % NATIVE_TABLE,
         "  chain prerouting {", "    type filter hook prerouting priority mangle; policy accept;",
         "    " + restore, "    ct mark and %#x == 0x0 ct direction original jump first" % mask, "  }",
         "  chain output {", "    type route hook output priority mangle; policy accept;", "    " + restore, "  }",
         "  chain first {"] + ["    " + rule for rule in marking] + ["  }", "}", ""])


def marker_first(text):
    """The tool's mangle rules with the comment match moved first, as the
    version before this one wrote them (the same matches otherwise)."""
    marker = " -m comment --comment multi-eni-routing"
    lines = []
    for line in text.splitlines():
        if marker + " " in line:
            chain, _, rest = line[3:].partition(" ")
            line = "-A %s%s %s" % (chain, marker, (" " + rest).replace(marker, "", 1).strip())
        lines.append(line)
    return "\n".join(lines) + "\n"


class Bench:
    """The lab, its arms and the iperf3 runs."""

    def __init__(self, lab, args):
        self.lab, self.args = lab, args
        self.servers = []
        self.targets = {"first": lab.enis[0].addresses4[0], "last": lab.enis[-1].addresses4[0]}
        self.devices = {"first": lab.enis[0].name, "last": lab.enis[-1].name}
        self.arms = {}
        self.nft = False
        self.hooks = {}  # arm: the mangle chains that are hooks in it

    def prepare(self):
        lab = self.lab
        lab.iptables_restore(lab.instance, "\n".join(["*filter", CONNTRACK_RULE, "COMMIT", ""]), flush=False)
        applied(lab)
        tool = lab.run(lab.instance, "iptables-save", "-t", "mangle").stdout
        assert "multi-eni-routing" in tool, "the tool applied no mangle rules"
        self.nft = "nf_tables" in lab.run(lab.instance, "iptables", "--version").stdout and bool(shutil.which("nft"))
        self.arms = {"chains": tool, "none": "\n".join(EMPTY_MANGLE + ["COMMIT", ""])}
        if not self.args.no_old:
            self.arms["marker-first"] = marker_first(tool)
            self.arms["old"] = "\n".join(old_mangle(lab.enis))
        if not self.args.no_floor:
            self.arms["floor"] = "\n".join(EMPTY_MANGLE + INERT + ["COMMIT", ""])
            self.arms["hooks"] = "\n".join(EMPTY_MANGLE + ["COMMIT", ""])
        if self.nft:  # only the rules (and the built-in chains they use)
            self.arms = {arm: "\n".join(line for line in text.splitlines() if not line.startswith(BUILT_IN))
                         for arm, text in self.arms.items()}
            if not self.args.no_floor:
                self.arms["hooks"] = "\n".join(["*mangle"] + HOOKS + ["COMMIT", ""])
                self.arms["native"] = native_rules(lab.enis)
        if self.args.arms:  # fewer arms: shorter cycles, so arms closer in time
            wanted = set(self.args.arms.split(",")) | {"chains", "none"}
            self.arms = {arm: text for arm, text in self.arms.items() if arm in wanted}
        for name, address in self.targets.items():
            self.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", lab.instance, "iperf3", "-s", "-B", address, "-p",
                 str(IPERF_PORTS[name])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for name, address in self.targets.items():
            assert eventually(lambda a=address, p=IPERF_PORTS[name]: self.listening(a, p), timeout=10), \
                "iperf3 server on %s did not start" % address

    def listening(self, address, port):
        out = self.lab.run(self.lab.instance, "ss", "-Hltn", "src", "%s:%d" % (address, port), check=False).stdout
        return bool(out.strip())

    def switch(self, arm):
        """Replace the instance's mangle table by the arm's: with nft, delete the
        table and add the arm's rules (and only the built-in chains they use);
        else replace the table whole."""
        lab = self.lab
        if self.nft:
            for table in ("mangle", NATIVE_TABLE):
                lab.run(lab.instance, "nft", "delete", "table", "ip", table, check=False)
            if arm == "native":
                lab.run(lab.instance, "nft", "-f", "-", input=self.arms[arm])
            else:
                lab.run(lab.instance, "iptables-restore", "--noflush", input=self.arms[arm])
        else:
            lab.run(lab.instance, "iptables-restore", "-T", "mangle", input=self.arms[arm])

    def hooked(self):
        """The mangle chains that are netfilter hooks now (nft's base chains)."""
        if not self.nft:
            return ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]  # legacy: the table hooks all
        out = "".join(self.lab.run(self.lab.instance, "nft", "list", "table", "ip", table, check=False).stdout
                      for table in ("mangle", NATIVE_TABLE))
        return re.findall(r"chain (\S+) \{\s*type \S+ hook", out)

    def start_client(self, target, *options):
        """An iperf3 client to TARGET that runs until stopped (retried while the
        server still finishes the test before)."""
        argv = ["ip", "netns", "exec", self.lab.client, "iperf3", "-c", self.targets[target],
                "-p", str(IPERF_PORTS[target]), "-t", "3600", *options]
        deadline = time.monotonic() + 20
        while True:
            client = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if eventually(lambda: client.poll() is not None or self.flowing(client.pid, target, options),
                          timeout=10) and client.poll() is None:
                return client
            error = client.communicate(timeout=10)[1].strip() if client.poll() is not None else "no traffic"
            client.kill()
            client.wait(timeout=10)
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 to %s did not start: %s" % (target, error))
            time.sleep(0.5)

    def flowing(self, pid, target, options):
        first = self.reading(pid, target, "-u" in options)
        time.sleep(0.2)
        return self.reading(pid, target, "-u" in options)["count"] > first["count"]

    def reading(self, client, target, udp):
        """The counters a slice is the difference of. UDP: datagrams the client
        sent and its CPU time, datagrams the instance received. TCP: bits the
        target ENI received and the CPU time of both ends."""
        server = self.servers[list(self.targets).index(target)].pid
        if udp:
            sent = proc_counter(client, "snmp", "Udp", "OutDatagrams")
            return {"count": sent, "cpu": cpu_ns(client), "got": proc_counter(server, "snmp", "Udp", "InDatagrams"),
                    "time": time.monotonic()}
        bits = 8 * rx_bytes(server, self.devices[target])
        return {"count": bits, "cpu": cpu_ns(client) + cpu_ns(server), "got": bits, "time": time.monotonic()}

    def tracked(self):
        """Connections conntrack holds in the instance now."""
        out = self.lab.run(self.lab.instance, "conntrack", "-C", check=False).stdout.strip()
        return int(out) if out.isdigit() else 0

    def figure(self, figure, samples):
        """One iperf3 stream for the whole figure; the arms take turns under it,
        one slice each per cycle, in an order that rotates cycle by cycle (so
        that a change of the machine's load between them is small)."""
        target = "first" if figure == "pps first" else "last"
        options = ("-u", "-b", "0", "-l", "64") if figure.startswith("pps") else ()
        client = self.start_client(target, *options)
        arms = list(self.arms)
        try:
            for number in range(self.args.cycles):
                for arm in arms[number % len(arms):] + arms[:number % len(arms)]:
                    self.switch(arm)
                    time.sleep(SETTLE)
                    before = self.reading(client.pid, target, bool(options))
                    time.sleep(self.args.slice)
                    after = self.reading(client.pid, target, bool(options))
                    if client.poll() is not None:
                        raise RuntimeError("iperf3 to %s stopped: %s" % (target, client.communicate()[1].strip()))
                    samples[arm][figure + " (cpu)"].append(
                        (after["count"] - before["count"]) / ((after["cpu"] - before["cpu"]) / 1e9))
                    samples[arm][figure + " (wall)"].append(
                        (after["got"] - before["got"]) / (after["time"] - before["time"]))
            if not self.tracked():
                raise RuntimeError("conntrack holds no connection: it is not in use")
        finally:
            client.terminate()
            client.wait(timeout=10)

    def run(self):
        samples = {arm: {"%s (%s)" % (f, kind): [] for f in TARGETS for kind in ("cpu", "wall")}
                   for arm in self.arms}
        for arm in self.arms:
            self.switch(arm)
            self.hooks[arm] = self.hooked()
        for figure in TARGETS:
            started = time.monotonic()
            self.figure(figure, samples)
            print("%s: %.0f s" % (figure, time.monotonic() - started), file=sys.stderr)
        self.switch("chains")
        check = self.lab.run_tool("--dry-run")
        if check.rc != 0 or "in sync" not in check.stdout:
            raise RuntimeError("the 'chains' arm is not the tool's state: %r" % (check,))
        return samples

    def close(self):
        for server in self.servers:
            server.terminate()
            server.wait(timeout=10)


def report(samples, args, hooks):
    """The medians and ratios as a table; the data for --json. Two ratios per
    figure: of the medians, and the median of the cycles' own ratios (each
    cycle's arms ran back to back) with its quartiles. The targets are checked
    on the per-CPU figures (both ratios must meet them): the wall-clock ones
    move with whatever else the machine runs."""
    figures = list(samples["none"])
    medians = {arm: {f: statistics.median(v) for f, v in values.items()} for arm, values in samples.items()}
    ratios, paired, spread = {}, {}, {}
    for arm in medians:
        if arm == "none":
            continue
        ratios[arm] = {f: medians[arm][f] / medians["none"][f] for f in figures}
        per_cycle = {f: sorted(a / b for a, b in zip(samples[arm][f], samples["none"][f])) for f in figures}
        paired[arm] = {f: statistics.median(v) for f, v in per_cycle.items()}
        spread[arm] = {f: (v[len(v) // 4], v[-1 - len(v) // 4]) for f, v in per_cycle.items()}
    others = list(ratios)
    lines = ["%d ENIs, %d cycles of %g s slices per figure. Medians; ratios to the arm without the tool's "
             "chains: of the medians / median of the cycles' ratios [its quartiles]."
             % (args.enis, args.cycles, args.slice),
             "pps: 64-byte UDP, thousands; tcp: Gbit/s; (cpu) = per CPU-second of the sender (pps) "
             "or of both ends (tcp), (wall) = per second",
             "mangle chains hooked: " + "; ".join("%s: %s" % (arm, " ".join(chains) or "none")
                                                  for arm, chains in hooks.items()), ""]
    lines.append("| figure | " + " | ".join(medians) + " | " + " | ".join("%s/none" % a for a in others)
                 + " | target |")
    lines.append("|" + " --- |" * (2 + len(medians) + len(others)))
    for figure in figures:
        scale = 1e9 if figure.startswith("tcp") else 1e3
        target = TARGETS[figure.split(" (")[0]]
        lines.append("| %s | " % figure
                     + " | ".join("%.1f" % (medians[a][figure] / scale) for a in medians) + " | "
                     + " | ".join("%.3f / %.3f [%.3f-%.3f]" % ((ratios[a][figure], paired[a][figure])
                                                              + spread[a][figure]) for a in others)
                     + " | %s |" % (">= %.2f" % target if figure.endswith("(cpu)") else "-"))
    missed = [f for f in figures if f.endswith("(cpu)")
              and min(ratios["chains"][f], paired["chains"][f]) < TARGETS[f.split(" (")[0]]]
    lines += ["", "targets (chains/none, per CPU-second): "
              + ("all met" if not missed else "missed: " + ", ".join(missed))]
    return "\n".join(lines), {"medians": medians, "ratios": ratios, "round_ratios": paired,
                              "round_ratio_quartiles": spread, "samples": samples,
                              "targets": TARGETS, "missed": missed, "hooks": hooks,
                              "settings": {"enis": args.enis, "cycles": args.cycles, "slice": args.slice}}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        sys.exit("datapath.py: needs root (it builds network namespaces)")
    for program in ("iperf3", "conntrack", "ss"):
        if not shutil.which(program):
            sys.exit("datapath.py: %s is missing (apt-get install iperf3 conntrack iproute2)" % program)
    lab = Lab(enis=args.enis, addresses=1, ipv6=False)
    with lab:
        bench = Bench(lab, args)
        try:
            bench.prepare()
            samples = bench.run()
        finally:
            bench.close()
    text, data = report(samples, args, bench.hooks)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=2)
    return 1 if args.check and data["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
