#!/usr/bin/env python3
"""Benchmark of multi_eni_routing.py --watch: how fast the routing comes back,
and what the watcher costs while nothing happens.

Run as root from anywhere:  python3 bench/watch_bench.py [--repeat 7] [--idle 10] [--json FILE]

It builds the test lab (tests/lab.py: network namespaces mer-<id>-*, an IMDS
emulator, two ENIs eth0/eth1 with two addresses each, IPv6) and starts the
watcher in the lab's instance namespace, then measures:

  address re-add   every IPv4 address of eth1 removed and added again in one
                   `ip -batch` (what `networkctl reconfigure` does; the kernel
                   drops eth1's routes from every table): from the moment that
                   command returned to eth1's rules and table being back
  rule deletion    another program deletes eth1's IPv4 rules: the same
  ENI attach       an ENI hot-plugged (interface up, then listed by IMDS): to
                   its rules being in place
  idle             with --refresh 5, once settled: CPU of the watcher and the
                   programs it ran (utime+stime+cutime+cstime from /proc) over
                   --idle seconds, the converges in that time, VmHWM and VmRSS

"Back" is polled every 5 ms with `ip -n` (rules and the ENI's table, compared
with what the first apply left); medians (and min, max) over --repeat runs.
Targets (issue 9): back within 3 s (5 s for an attached ENI), idle under 0.5 s
of CPU per 10 s, under 40 MB resident. Nothing runs in this machine's own
network namespace; the lab and the watcher are removed also on failure.
"""

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from lab import TOOL_PYTHON, Lab, Watching, _run, cpu_ticks, memory_kb, wait_for  # noqa: E402

TARGETS = {"readd_s": 3.0, "rule_deletion_s": 3.0, "attach_s": 5.0, "idle_cpu_s_per_10s": 0.5, "rss_mb": 40.0}
POLL = 0.005


def ip_out(lab, *argv):
    """Output of `ip -n INSTANCE ARGV`; "" when it fails (a table not there yet)."""
    return _run(["ip", "-n", lab.instance, *argv], check=False).stdout


def eni_routing(lab, table):
    """The rules naming `table` and its IPv4 routes, sorted."""
    rules = [line for line in ip_out(lab, "-4", "rule").splitlines() if "lookup %d" % table in line]
    return sorted(rules) + sorted(ip_out(lab, "-4", "route", "show", "table", str(table)).splitlines())


def readd_addresses(lab):
    eni = lab.enis[1]
    lab.ip(lab.instance, *["addr del %s/24 dev %s" % (a, eni.name) for a in reversed(eni.addresses4)]
           + ["addr add %s/24 dev %s" % (a, eni.name) for a in eni.addresses4])


def delete_rules(lab):
    lines = [line for line in ip_out(lab, "-4", "rule").splitlines() if "lookup 22001" in line]
    commands = []
    for line in lines:
        priority, rest = line.split(":", 1)
        words = rest.split()
        source = words[words.index("from") + 1]
        commands.append("rule del priority %s table 22001%s" % (priority, "" if source == "all" else " from " + source))
    lab.ip(lab.instance, *commands)


def measure_heal(lab, watcher, change, repeat, timeout=10):
    """Seconds from `change(lab)` returning to eth1's routing being back, per run."""
    applied = eni_routing(lab, 22001)
    samples = []
    for _ in range(repeat):
        watcher.settle(timeout=20)
        change(lab)
        try:
            samples.append(wait_for(lambda: eni_routing(lab, 22001) == applied, timeout,
                                    "eth1's routing back", interval=POLL))
        except AssertionError as exc:
            raise RuntimeError("%s:\n%s" % (exc, watcher.output()[-2000:])) from None
    return samples


def measure_attach(lab, watcher, repeat, timeout=10):
    samples = []
    for _ in range(repeat):
        watcher.settle(timeout=20)
        eni = lab.attach_eni()
        table = 22000 + eni.device_number
        samples.append(wait_for(lambda table=table: any("default" in line for line in eni_routing(lab, table)),
                                timeout, "the attached ENI routed", interval=POLL))
    return samples


def memory_mb(pid, key):
    return memory_kb(pid, key) / 1024.0


def measure_idle(lab, seconds):
    watcher = Watching(lab, "--refresh", "5", verbose=False)
    try:
        watcher.ready(timeout=30)
        watcher.settle(timeout=20)
        pid = watcher.process.pid
        before = cpu_ticks(pid)
        converges = watcher.statuses_during(seconds)
        cpu = (cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK")
        return {"seconds": seconds, "cpu_s": cpu, "cpu_s_per_10s": cpu * 10.0 / seconds,
                "converges": len(converges), "vmhwm_mb": memory_mb(pid, "VmHWM"),
                "vmrss_mb": memory_mb(pid, "VmRSS")}
    finally:
        watcher.close()


def summary(samples):
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def main():
    parser = argparse.ArgumentParser(description="Benchmark of multi_eni_routing.py --watch (root; in a lab).")
    parser.add_argument("--repeat", type=int, default=7, help="runs per latency figure (default 7)")
    parser.add_argument("--attach", type=int, default=3, help="ENIs attached, one run each (default 3)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measured (default 10)")
    parser.add_argument("--json", metavar="FILE", help="also write every sample to FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("watch_bench.py: needs root (it builds network namespaces)")
    results = {"python": TOOL_PYTHON}
    with Lab() as lab:
        watcher = Watching(lab, verbose=False)
        try:
            watcher.ready(timeout=30)
            results["readd"] = summary(measure_heal(lab, watcher, readd_addresses, args.repeat))
            results["rule_deletion"] = summary(measure_heal(lab, watcher, delete_rules, args.repeat))
            results["attach"] = summary(measure_attach(lab, watcher, args.attach))
        finally:
            watcher.close()
        results["idle"] = measure_idle(lab, args.idle)
    idle = results["idle"]
    rows = [("address re-add -> routing back", results["readd"], TARGETS["readd_s"]),
            ("rule deletion -> routing back", results["rule_deletion"], TARGETS["rule_deletion_s"]),
            ("ENI attached -> routed", results["attach"], TARGETS["attach_s"])]
    print("%-34s %10s %10s %10s %8s" % ("figure", "median", "min", "max", "target"))
    for label, figure, target in rows:
        print("%-34s %8.0f ms %7.0f ms %7.0f ms %6.0f s" % (
            label, figure["median_s"] * 1000, figure["min_s"] * 1000, figure["max_s"] * 1000, target))
    print("idle (--refresh 5, %.0f s): %.2f s CPU per 10 s (target < %.1f), %d converges; "
          "VmHWM %.1f MB, VmRSS %.1f MB (target < %.0f)" % (
              idle["seconds"], idle["cpu_s_per_10s"], TARGETS["idle_cpu_s_per_10s"], idle["converges"],
              idle["vmhwm_mb"], idle["vmrss_mb"], TARGETS["rss_mb"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    met = (all(figure["max_s"] < target for _, figure, target in rows)
           and idle["cpu_s_per_10s"] < TARGETS["idle_cpu_s_per_10s"] and idle["vmhwm_mb"] < TARGETS["rss_mb"])
    print("targets: %s" % ("met" if met else "MISSED"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
