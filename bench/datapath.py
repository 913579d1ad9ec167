#!/usr/bin/env python3
"""What the tool's connection marking costs per packet (issue 16).

Run as root from anywhere:  python3 bench/datapath.py [--enis 15] [--rounds 7] [--seconds 3]
                              [--no-old] [--json FILE] [--check]

It builds the simulated VPC of tests/lab.py (network namespaces mer-<id>-*,
deleted again, also on failure) with ENIS ENIs (eth0 .. eth14 at 15), applies
multi_eni_routing.py there (IMDS from the lab's emulator), and measures with
iperf3 from the lab's client ("the internet") to servers bound to an address
of the first ENI and of the last:

  pps first / pps last   64-byte UDP datagrams as fast as the client sends
                         (-u -b 0 -l 64): datagrams per second the server
                         received (sent - lost), to eth0's and to the last
                         ENI's address
  tcp                    TCP throughput to the last ENI's address (receiver)

in each of these arms, the same routing (the tool's rules and routes) in all:

  chains   the tool's mangle rules, exactly as it applied them
  none     no mangle rule of the tool's at all
  old      the layout before issue 16 (every packet jumps into the per-ENI
           chain; `--no-old` leaves this arm out)
  floor    two rules in mangle PREROUTING that match nothing, one match
           each: what a packet of a known connection meets of the tool's
           (two rules, turned away by the first match of each), whatever the
           rules do (`--no-floor`: left out)
  hooks    the built-in chains the tool's rules live in (mangle PREROUTING
           and OUTPUT), empty: what the chains alone cost (`--no-floor`: left
           out too)

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
whole instead (legacy's mangle table hooks all five chains anyway). A
round measures each figure in every arm back to back, in an order that rotates
round by round; each figure is the median over the
rounds; the ratios (chains / none, old / none) are given both of those
medians and as the median of each round's own ratio, all from one run. Every iperf3 run has a hard time limit. At the end the tool's
own --dry-run must find its state in sync (the "chains" arm is the tool's).

Targets (issue 16): chains/none >= 0.98 for packets per second (first and last
ENI), >= 0.99 for TCP. `--check` exits 1 when one is missed.
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


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Per-packet cost of the tool's mangle rules (issue 16).")
    parser.add_argument("--enis", type=int, default=15, help="ENIs in the lab (default 15, 2-15)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, each arm once per round (default 7, >= 5)")
    parser.add_argument("--seconds", type=int, default=3, help="seconds per iperf3 run (default 3)")
    parser.add_argument("--no-old", action="store_true", help="leave out the arm with the layout before issue 16")
    parser.add_argument("--no-floor", action="store_true",
                        help="leave out the arms with two rules that match nothing and with empty chains")
    parser.add_argument("--json", metavar="FILE", help="also write every sample and the ratios to FILE")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if not 2 <= args.enis <= 15 or args.rounds < 5 or not 1 <= args.seconds <= 30:
        parser.error("give 2 <= --enis <= 15, --rounds >= 5, 1 <= --seconds <= 30")
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


class Bench:
    """The lab, its arms and the iperf3 runs."""

    def __init__(self, lab, args):
        self.lab, self.args = lab, args
        self.servers = []
        self.targets = {"first": lab.enis[0].addresses4[0], "last": lab.enis[-1].addresses4[0]}
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
            self.arms["old"] = "\n".join(old_mangle(lab.enis))
        if not self.args.no_floor:
            self.arms["floor"] = "\n".join(EMPTY_MANGLE + INERT + ["COMMIT", ""])
            self.arms["hooks"] = "\n".join(EMPTY_MANGLE + ["COMMIT", ""])
        if self.nft:  # only the rules (and the built-in chains they use)
            self.arms = {arm: "\n".join(line for line in text.splitlines() if not line.startswith(BUILT_IN))
                         for arm, text in self.arms.items()}
            self.arms["hooks"] = "\n".join(["*mangle"] + HOOKS + ["COMMIT", ""])
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
            lab.run(lab.instance, "nft", "delete", "table", "ip", "mangle", check=False)
            lab.run(lab.instance, "iptables-restore", "--noflush", input=self.arms[arm])
        else:
            lab.run(lab.instance, "iptables-restore", "-T", "mangle", input=self.arms[arm])

    def hooked(self):
        """The mangle chains that are netfilter hooks now (nft's base chains)."""
        if not self.nft:
            return ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]  # legacy: the table hooks all
        out = self.lab.run(self.lab.instance, "nft", "list", "table", "ip", "mangle", check=False).stdout
        return re.findall(r"chain (\S+) \{\s*type \S+ hook", out)

    def iperf(self, target, *options):
        """iperf3's JSON result of one run from the client to TARGET."""
        argv = ["ip", "netns", "exec", self.lab.client, "iperf3", "-c", self.targets[target],
                "-p", str(IPERF_PORTS[target]), "-t", str(self.args.seconds), "-J", *options]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.args.seconds + 20)
        result = json.loads(proc.stdout or "{}")
        if proc.returncode or "error" in result:
            raise RuntimeError("iperf3 failed: %s" % (result.get("error") or proc.stderr.strip()))
        return result["end"]

    def pps(self, target):
        """64-byte datagrams per second: received (wall clock), and sent per
        CPU-second of the sending process. The second is what a core can carry:
        veth hands each datagram on in the sender's own context, so its CPU
        time holds the router's forwarding and the instance's receive path,
        the tool's rules among them, whatever else the machine is doing."""
        end = self.iperf(target, "-u", "-b", "0", "-l", "64")
        received, sent = end["sum_received"], end["sum_sent"]
        cpu = end["cpu_utilization_percent"]["host_total"] / 100.0 * sent["seconds"]
        return {"wall": (received["packets"] - received["lost_packets"]) / received["seconds"],
                "cpu": sent["packets"] / cpu}

    def tcp(self, target):
        """Received bits per second (wall clock), and per CPU-second of both ends."""
        end = self.iperf(target)
        received, cpu = end["sum_received"], end["cpu_utilization_percent"]
        return {"wall": received["bits_per_second"],
                "cpu": received["bits_per_second"] / ((cpu["host_total"] + cpu["remote_total"]) / 100.0)}

    def tracked(self):
        """Connections conntrack holds in the instance now."""
        out = self.lab.run(self.lab.instance, "conntrack", "-C", check=False).stdout.strip()
        return int(out) if out.isdigit() else 0

    def measure(self, figure):
        return self.pps("first") if figure == "pps first" else self.pps("last") if figure == "pps last" \
            else self.tcp("last")

    def round(self, number, samples):
        """Each figure in each arm once, the arms of one figure back to back (so
        that a change of the machine's load between them is small), in an order
        that rotates round by round."""
        arms = list(self.arms)
        order = arms[number % len(arms):] + arms[:number % len(arms)]
        for figure in TARGETS:
            for arm in order:
                self.switch(arm)
                for kind, value in self.measure(figure).items():
                    samples[arm]["%s (%s)" % (figure, kind)].append(value)
                if not self.tracked():
                    raise RuntimeError("conntrack holds no connection in arm %r: it is not in use" % arm)

    def run(self):
        samples = {arm: {"%s (%s)" % (f, kind): [] for f in TARGETS for kind in ("cpu", "wall")}
                   for arm in self.arms}
        for arm in self.arms:
            self.switch(arm)
            self.hooks[arm] = self.hooked()
        for number in range(self.args.rounds):
            started = time.monotonic()
            self.round(number, samples)
            print("round %d/%d: %.0f s" % (number + 1, self.args.rounds, time.monotonic() - started),
                  file=sys.stderr)
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
    figure: of the medians, and the median of the rounds' own ratios (each
    round's arms ran back to back) with its quartiles. The targets are checked
    on the per-CPU figures (both ratios must meet them): the wall-clock ones
    move with whatever else the machine runs."""
    figures = list(samples["none"])
    medians = {arm: {f: statistics.median(v) for f, v in values.items()} for arm, values in samples.items()}
    ratios, paired, spread = {}, {}, {}
    for arm in medians:
        if arm == "none":
            continue
        ratios[arm] = {f: medians[arm][f] / medians["none"][f] for f in figures}
        per_round = {f: sorted(a / b for a, b in zip(samples[arm][f], samples["none"][f])) for f in figures}
        paired[arm] = {f: statistics.median(v) for f, v in per_round.items()}
        spread[arm] = {f: (v[len(v) // 4], v[-1 - len(v) // 4]) for f, v in per_round.items()}
    others = list(ratios)
    lines = ["%d ENIs, %d rounds of %d s per run. Medians; ratios to the arm without the tool's "
             "chains: of the medians / median of the rounds' ratios [its quartiles]."
             % (args.enis, args.rounds, args.seconds),
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
                              "settings": {"enis": args.enis, "rounds": args.rounds, "seconds": args.seconds}}


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
