#!/usr/bin/env python3
"""Benchmark of multi_eni_routing.py against the naive one-process-per-command way.

Run as root from anywhere:  python3 bench/bench.py [--sizes 1x1,4x10,15x50] [--repeat 5]
                              [--quick] [--lookups N] [--tool FILE] [--json FILE]
                              [--profile] [--python PATH] [--check]

For each size ExN (E ENIs with N IPv4 addresses each) it builds the test lab,
tests/lab.py's Lab, in network namespaces it creates and deletes again
(mer-bench-<pid>-<size>-instance, -router, -client, -peer): the ENIs are veth
pairs eth0..eth<E-1> whose other ends (holding the gateway) are ports of the VPC
router, ENI k has 198.18.(128 + k).0/24 with N addresses (.10 up) and the
instance has `default via <eth0's base+1> dev eth0 proto dhcp`, as DHCP would
leave it. The router also serves tests/imds_emulator.py at 169.254.169.254,
reached through eth0. Inside the instance namespace it times,
as a user sees it (wall clock of the whole process):

  tool apply      multi_eni_routing.py -i eth0 .. --no-imds --state-dir DIR  (from clean)
  tool re-apply   the same on the in-sync system
  tool flush      the same with -f
  IMDS apply      multi_eni_routing.py --state-dir DIR (the ENIs IMDS lists), and re-apply
  baseline apply  sh running fixed per-address routing commands, one process per line
                  (baseline_commands: what the tool did before routing model v2)
  baseline flush  sh running their removal the same way
  own cmds        sh running the tool's own --dry-run / -f -n output, one process per line
  route lookups   one `ip -batch` of --lookups `route get DST from ENI-ADDRESS`, without
                  the tool applied and with it

It also counts the rules and routes of protocol 231 after an apply, and the peak
memory (max RSS, wait4) of each kind of run; and, outside any lab, `python -c
pass` (the interpreter's floor) and the tool's --version. Every step is checked:
the tool's output line, the own commands leave what the tool would (its
--dry-run then says "in sync"), every flush leaves nothing.

The programs it runs besides the tool are files here: peak_rss.py (memory),
stage_timers.py and cprofile_run.py (--profile).

Nothing is changed in this machine's own network namespace: the lab runs
everything in its namespaces, and the timed runs happen in a worker started
with `ip netns exec` that refuses to run in the initial namespace. The ENIs'
addresses come from 198.18.128.0/17 (lookups also name 203.0.113.0/24 and
198.51.100.0/24 as destinations; nothing is sent). Python standard library only.
"""

import argparse
import hashlib
import ipaddress
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "multi_eni_routing.py")
# The lab is tests/lab.py's (subnets="benchmark"); the programs run in it are files here.
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
PEAK_RSS = os.path.join(HERE, "peak_rss.py")
STAGE_TIMERS = os.path.join(HERE, "stage_timers.py")
CPROFILE_RUN = os.path.join(HERE, "cprofile_run.py")
OUTSIDE = ("203.0.113", "198.51.100")  # route-get destinations outside the VPC (never sent)
PREFIX = "mer-bench"
FIRST_HOST = 10  # addresses .10 up; .1 is the gateway (on the VPC router)
MAX_ENIS = 63  # the default mark mask 0x3f00 numbers 63 ENIs
MAX_ADDRESSES = 254 - FIRST_HOST + 1
DEFAULT_SIZES = "1x1,4x10,15x50"
TARGET_SIZE = (15, 50)  # the largest instance's limit
LINEAR_REFERENCE = (4, 10)
QUICK_SIZES, QUICK_REPEAT = "15x50", 3
DEFAULT_LOOKUPS = 20000
TARGETS_MS = {"apply": 100.0, "reapply": 60.0, "flush": 100.0}
TARGET_SPEEDUP = 12.0  # flush
TARGET_LINEARITY = 2.0
# Issue 7, at TARGET_SIZE: ratios to the baseline apply of the same run, so that
# a slower or busier machine moves both sides.
TARGET_RATIOS = {"apply": 0.05, "reapply": 0.04, "imds_apply": 0.07}
TARGET_RULES_PER_ENI, TARGET_RULES_EXTRA = 4, 4  # per family: at most 4 x ENIs + 4
TARGET_LOOKUP_RATIO = 1.3
TARGET_PEAK_MIB = 30.0
PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
ENV = dict(os.environ, PATH=PATH, LC_ALL="C")


class BenchError(Exception):
    pass


# -- Small helpers. ----------------------------------------------------------------

def sh(argv, stdin=None, check=True):
    """Run a setup command (never timed); return its stdout."""
    proc = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=ENV)
    if check and proc.returncode != 0:
        raise BenchError("%s exited %d: %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()))
    return proc.stdout


def timed(argv, expect=(0,), stdin=None):
    """Run argv, return (wall ms, stdout); the wall clock covers the whole process."""
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=ENV)
    elapsed = (time.perf_counter() - start) * 1000.0
    if proc.returncode not in expect:
        raise BenchError("%s exited %d\nstdout: %s\nstderr: %s" % (
            " ".join(argv), proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:]))
    return elapsed, proc.stdout


def summary(samples):
    return {"median": statistics.median(samples), "min": min(samples), "samples": samples}


def parse_size(text):
    match = re.match(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$", text)
    if not match:
        raise argparse.ArgumentTypeError("size must be ENIsxADDRESSES, e.g. 15x50: %r" % text)
    enis, addresses = int(match.group(1)), int(match.group(2))
    if not 1 <= enis <= MAX_ENIS or not 1 <= addresses <= MAX_ADDRESSES:
        raise argparse.ArgumentTypeError("size %s: 1-%d ENIs with 1-%d addresses each"
                                         % (text, MAX_ENIS, MAX_ADDRESSES))
    return enis, addresses


def size_name(size):
    return "%dx%d" % size


def netns_inode(path):
    return os.stat(path).st_ino


# -- The lab: tests/lab.py's Lab with the benchmark's address plan. -----------------

def remove_stale_labs():
    """Namespaces of an earlier bench run whose process is gone (killed hard)."""
    from lab import remove_namespace  # see benchmark_lab
    for line in sh(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(r"^%s-(\d+)-" % PREFIX, name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            remove_namespace(name)
        except PermissionError:
            pass


# -- The worker: runs inside the lab namespace (ip netns exec) and does the timing. --

def dry_lines(output):
    """The commands of a --dry-run output, without comments."""
    text = output.strip()
    if not text or text.startswith(("in sync", "nothing to do")):
        return []
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def write_script(path, lines):
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\nset -e\n")
        for line in lines:
            handle.write(" ".join(shlex.quote(word) for word in line.split()) + "\n")


def expect_prefix(output, prefix, what):
    if not output.strip().startswith(prefix):
        raise BenchError("%s: expected %r, got %r" % (what, prefix, output.strip()[:300]))


def count_protocol_231(argv):
    """Lines of `ip -N ...` output that carry protocol 231, whatever their shape."""
    return sum(1 for line in sh(argv).splitlines() if re.search(r"\bproto 231\b", line))


def rule_counts():
    return {"ipv4": count_protocol_231(["ip", "-N", "-4", "rule", "show"]),
            "ipv6": count_protocol_231(["ip", "-N", "-6", "rule", "show"])}


def route_counts():
    return {"ipv4": count_protocol_231(["ip", "-N", "-4", "route", "show", "table", "all"]),
            "ipv6": count_protocol_231(["ip", "-N", "-6", "route", "show", "table", "all"])}


# The baseline: per-address policy routing for the lab, one process per command,
# the way the tool did it before routing model v2 (two rules per address, each
# table routing the other ENIs' subnets, the mangle chains, rp_filter). It is
# fixed, not the tool's own --dry-run, so that the ratios of issue 7 compare
# every version of the tool with the same work (about 1,800 commands at 15x50).
def baseline_commands(interfaces, subnets, addresses_of, rp_filter):
    """(apply lines, flush lines) for ENIs eth0.. in SUBNETS (gateway: their
    first host) with the given addresses."""
    if len(interfaces) < 2:
        return [], []  # one ENI needs no policy routing
    count = len(interfaces)
    tables = [22000 + k for k in range(count)]
    routes, rules = [], []
    for k, dev in enumerate(interfaces):
        gateway = str(ipaddress.ip_network(subnets[k])[1])
        routes.append("%s dev %s table %d proto 231" % (subnets[k], dev, tables[k]))
        routes += ["%s via %s dev %s table %d proto 231" % (subnets[j], gateway, dev, tables[k])
                   for j in range(count) if j != k]
        routes.append("default via %s dev %s table %d proto 231" % (gateway, dev, tables[k]))
    by_address = lambda base, extra: [
        "priority %d from %s/32 table %d%s protocol 231" % (base + k, a, tables[k], extra)
        for k in reversed(range(count)) for a in reversed(addresses_of(k))]
    rules += by_address(20300, "")
    rules.append("priority 20200 table main suppress_prefixlength 0 protocol 231")
    rules += by_address(20100, " suppress_prefixlength 0")
    rules += ["priority %d fwmark 0x%x/0x3f00 table %d protocol 231" % (20000 + k, (k + 1) << 8, tables[k])
              for k in reversed(range(count))]
    mangle = ["-N MULTI-ENI-OUTPUT",
              "-A MULTI-ENI-OUTPUT -j CONNMARK --restore-mark --nfmask 0x3f00 --ctmask 0x3f00",
              "-N MULTI-ENI-PREROUTING"]
    for k, dev in enumerate(interfaces):
        mangle += ["-A MULTI-ENI-PREROUTING -i %s -m conntrack --ctstate NEW -j CONNMARK --set-xmark 0x%x/0x3f00"
                   % (dev, (k + 1) << 8), "-A MULTI-ENI-PREROUTING -i %s -j RETURN" % dev]
    mangle += ["-A MULTI-ENI-PREROUTING -j CONNMARK --restore-mark --nfmask 0x3f00 --ctmask 0x3f00",
               "-I OUTPUT 1 -m comment --comment multi-eni-routing -j MULTI-ENI-OUTPUT",
               "-I PREROUTING 1 -m comment --comment multi-eni-routing -j MULTI-ENI-PREROUTING"]
    apply = (["ip -4 route add " + r for r in routes] + ["ip -4 rule add " + r for r in rules]
             + ["iptables -t mangle " + m for m in mangle]
             + ["sysctl -w net.ipv4.conf.%s.rp_filter=2" % dev for dev in interfaces])
    flush = (["ip -4 rule del " + r for r in reversed(rules)] + ["ip -4 route del " + r for r in reversed(routes)]
             + ["iptables -t mangle " + m for m in (
                 "-D OUTPUT -m comment --comment multi-eni-routing -j MULTI-ENI-OUTPUT",
                 "-D PREROUTING -m comment --comment multi-eni-routing -j MULTI-ENI-PREROUTING",
                 "-F MULTI-ENI-OUTPUT", "-X MULTI-ENI-OUTPUT", "-F MULTI-ENI-PREROUTING",
                 "-X MULTI-ENI-PREROUTING")]
             + ["sysctl -w net.ipv4.conf.%s.rp_filter=%s" % (dev, rp_filter[dev]) for dev in interfaces])
    return apply, flush


def lookup_plan(interfaces, subnets, addresses_of, count, seed=231):
    """COUNT `route get DST from SRC` lines, SRC an address of a random ENI; even
    lines to a destination outside the VPC, odd ones into another ENI's subnet
    (a host that is not the instance's). Also the ENI each line's SRC is on."""
    rnd = random.Random(seed)
    per_eni = len(addresses_of(0))
    others = list(range(2, FIRST_HOST)) + list(range(FIRST_HOST + per_eni, 255))
    lines, sources = [], []
    for i in range(count):
        k = rnd.randrange(len(interfaces))
        source = rnd.choice(addresses_of(k))
        if i % 2 == 0:
            destination = "%s.%d" % (rnd.choice(OUTSIDE), rnd.randrange(1, 255))
        else:
            j = (k + 1 + rnd.randrange(len(interfaces) - 1)) % len(interfaces)
            destination = str(ipaddress.ip_network(subnets[j])[rnd.choice(others)])
        lines.append("route get %s from %s" % (destination, source))
        sources.append(interfaces[k])
    return lines, sources


def run_lookups(batch_path, out_path, sources):
    """One `ip -batch` of the lookups: (microseconds per lookup, how many of the
    outside / other-subnet lookups leave through the source's ENI)."""
    with open(out_path, "w") as out:
        start = time.perf_counter()
        proc = subprocess.run(["ip", "-batch", batch_path], stdout=out, stderr=subprocess.PIPE,
                              universal_newlines=True, env=ENV)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError("ip -batch of route lookups exited %d: %s" % (proc.returncode, proc.stderr.strip()[-500:]))
    with open(out_path) as handle:
        answers = [line for line in handle if line.strip() and not line[0].isspace()]
    if len(answers) != len(sources):
        raise BenchError("%d route lookups gave %d answers" % (len(sources), len(answers)))
    own = {"outside": 0, "other_subnet": 0}
    for i, (answer, source) in enumerate(zip(answers, sources)):
        match = re.search(r"\bdev (\S+)", answer)
        if match and match.group(1) == source:
            own["outside" if i % 2 == 0 else "other_subnet"] += 1
    return elapsed * 1e6 / len(sources), own


def peak_rss(py, argv, work, expect=(0,)):
    """(max RSS in KiB, stdout) of one run of argv, through peak_rss.py."""
    out_path = os.path.join(work, "rusage")
    _, out = timed([py, "-S", PEAK_RSS, out_path] + argv, expect=expect)
    with open(out_path) as handle:
        return int(handle.read().split()[0]), out


class Worker:
    """The runs of one size, inside the lab namespace: commands, checks, figures."""

    def __init__(self, spec):
        own_ns = netns_inode("/proc/self/ns/net")
        if own_ns == spec["outer_netns"] or own_ns != netns_inode("/run/netns/" + spec["netns"]):
            raise BenchError("worker is not inside the lab namespace %s: refusing" % spec["netns"])
        self.spec = spec
        self.py, self.tool, self.work = spec["python"], spec["tool"], spec["workdir"]
        self.interfaces, self.subnets = spec["interfaces"], spec["subnets"]
        self.addresses = spec["addresses"]  # per ENI, the primary first
        state = ["--state-dir", os.path.join(self.work, "state")]
        self.base = ([self.py, self.tool] + [w for dev in self.interfaces for w in ("-i", dev)]
                     + ["--no-imds"] + state)
        self.imds_run = [self.py, self.tool] + state  # as on an instance: the ENIs IMDS lists
        multi = len(self.interfaces) > 1  # one ENI: no policy routing
        self.applied = "applied:" if multi else "nothing to do"
        self.in_sync = "in sync" if multi else "nothing to do"
        self.flushed = "flushed:"
        self.scripts = {}

    def addresses_of(self, k):
        return self.addresses[k]

    def run(self, argv, prefix, what):
        """(ms, stdout) of one run whose output must start with prefix."""
        ms, out = timed(argv)
        expect_prefix(out, prefix, what)
        return ms, out

    def clean_check(self, what):
        self.run(self.base + ["-f", "-n"], "in sync", what + ": something of the tool's is left")
        left = rule_counts()
        if left["ipv4"] or left["ipv6"]:
            raise BenchError("%s: rules of protocol 231 are left: %s" % (what, left))

    def imds_requests(self):
        with open(self.spec["imds_log"]) as handle:
            return sum(1 for _ in handle)

    def warm_up(self):
        """Untimed rounds (caches); the tool's own apply and flush commands."""
        base = self.base
        self.clean_check("before the first run")
        apply_lines = dry_lines(timed(base + ["-n"])[1])
        self.run(base, self.applied, "warm-up apply")
        if len(self.interfaces) > 1:
            timed(base + ["--status"], expect=(0,))
        flush_lines = dry_lines(timed(base + ["-f", "-n"])[1])
        self.run(base, self.in_sync, "warm-up re-apply")
        self.run(base + ["-f"], self.flushed, "warm-up flush")
        self.clean_check("after the warm-up flush")
        # The same with IMDS answering; its apply must leave what -i leaves.
        self.run(self.imds_run, self.applied, "warm-up apply with IMDS")
        self.run(base + ["-n"], "in sync", "after the apply with IMDS, the tool with -i")
        self.run(self.imds_run, self.in_sync, "warm-up re-apply with IMDS")
        self.run(base + ["-f"], self.flushed, "warm-up flush after IMDS")
        self.clean_check("after the warm-up with IMDS")
        return apply_lines, flush_lines

    def write_scripts(self, apply_lines, flush_lines):
        rp_filter = {}
        for dev in self.interfaces:
            with open("/proc/sys/net/ipv4/conf/%s/rp_filter" % dev) as handle:
                rp_filter[dev] = handle.read().strip()
        base_apply, base_flush = baseline_commands(self.interfaces, self.subnets, self.addresses_of, rp_filter)
        for name, lines in (("own-apply", apply_lines), ("own-flush", flush_lines),
                            ("baseline-apply", base_apply), ("baseline-flush", base_flush)):
            self.scripts[name] = os.path.join(self.work, name + ".sh")
            write_script(self.scripts[name], lines)
        self.baseline_rules = sum(1 for line in base_apply if line.startswith("ip -4 rule add "))
        return base_apply, base_flush

    def own_round(self, samples):
        """The tool's own commands, one process each; must leave what the tool would."""
        ms, _ = timed(["sh", self.scripts["own-apply"]])
        self.run(self.base + ["-n"], "in sync", "after its commands one by one, the tool")
        samples["apply"].append(ms)
        ms, _ = timed(["sh", self.scripts["own-flush"]])
        self.clean_check("after its flush commands one by one")
        samples["flush"].append(ms)

    def baseline_round(self, samples):
        ms, _ = timed(["sh", self.scripts["baseline-apply"]])
        if rule_counts()["ipv4"] != self.baseline_rules:
            raise BenchError("the baseline apply left %s rules, expected %d" % (rule_counts(), self.baseline_rules))
        samples["apply"].append(ms)
        ms, _ = timed(["sh", self.scripts["baseline-flush"]])
        self.clean_check("after the baseline flush")
        samples["flush"].append(ms)

    def prepare_lookups(self):
        """The lookup batch (None with one ENI: no other ENI's subnet to ask for)."""
        count = self.spec["lookups"] if len(self.interfaces) > 1 else 0
        if not count:
            return None
        lines, sources = lookup_plan(self.interfaces, self.subnets, self.addresses_of, count)
        batch = os.path.join(self.work, "lookups.batch")
        with open(batch, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        lookups = lambda: run_lookups(batch, os.path.join(self.work, "lookups.out"), sources)
        lookups()  # warm-up
        return lookups

    def timed_rounds(self, repeat, lookups):
        tool = {"apply": [], "reapply": [], "flush": [], "dry_run": [], "imds_apply": [], "imds_reapply": []}
        baseline, own = {"apply": [], "flush": []}, {"apply": [], "flush": []}
        look = {"without": [], "with": []}
        imds = {"apply": [], "reapply": []}
        applied_counts = None
        for _ in range(repeat):
            if lookups:  # clean here: the cost without the tool
                us, look["own_without"] = lookups()
                look["without"].append(us)
            tool["apply"].append(self.run(self.base, self.applied, "apply")[0])
            if applied_counts is None:
                applied_counts = {"rules": rule_counts(), "routes": route_counts()}
            if lookups:
                us, look["own_with"] = lookups()
                look["with"].append(us)
            tool["reapply"].append(self.run(self.base, self.in_sync, "re-apply")[0])
            tool["flush"].append(self.run(self.base + ["-f"], self.flushed, "flush")[0])
            tool["dry_run"].append(timed(self.base + ["-n"])[0])  # discover + plan + diff, from clean
            for label, prefix in (("apply", self.applied), ("reapply", self.in_sync)):
                before = self.imds_requests()
                tool["imds_" + label].append(self.run(self.imds_run, prefix, label + " with IMDS")[0])
                imds[label].append(self.imds_requests() - before)
            self.run(self.base + ["-f"], self.flushed, "flush after IMDS")
            self.own_round(own)
            self.baseline_round(baseline)
        self.clean_check("at the end")
        return tool, baseline, own, look, imds, applied_counts

    def memory(self):
        """Max RSS (MiB) of each kind of run, untimed, through the launcher."""
        py, base, imds_run = self.py, self.base, self.imds_run
        kib = {"python -c pass": peak_rss(py, [py, "-c", "pass"], self.work)[0],
               "tool --version": peak_rss(py, [py, self.tool, "--version"], self.work)[0]}
        runs = (("apply", base, self.applied), ("reapply", base, self.in_sync),
                ("flush", base + ["-f"], self.flushed), ("imds_apply", imds_run, self.applied),
                ("imds_reapply", imds_run, self.in_sync), ("imds_flush", imds_run + ["-f"], self.flushed))
        for label, argv, prefix in runs:
            kib[label], out = peak_rss(py, argv, self.work)
            expect_prefix(out, prefix, label + " (memory)")
        self.clean_check("after the memory runs")
        mib = {k: v / 1024.0 for k, v in kib.items()}
        mib["peak_run"] = max(mib[label] for label, _, _ in runs)
        return mib


def worker(spec):
    w = Worker(spec)
    apply_lines, flush_lines = w.warm_up()
    base_apply, base_flush = w.write_scripts(apply_lines, flush_lines)
    w.baseline_round({"apply": [], "flush": []})  # warm-up
    w.own_round({"apply": [], "flush": []})
    lookups = w.prepare_lookups()
    tool, baseline, own, look, imds, applied_counts = w.timed_rounds(spec["repeat"], lookups)
    counts = {
        "rules": sum(1 for l in apply_lines if re.match(r"^ip -[46] rule add ", l)),
        "routes": sum(1 for l in apply_lines if re.match(r"^ip -[46] route (add|replace) ", l)),
        "addresses_added": sum(1 for l in apply_lines if re.match(r"^ip -[46] address add ", l)),
        "iptables": sum(1 for l in apply_lines if re.match(r"^ip6?tables ", l)),
        "sysctls": sum(1 for l in apply_lines if l.startswith("sysctl ")),
        "apply_commands": len(apply_lines),
        "flush_commands": len(flush_lines),
        "baseline_apply_commands": len(base_apply),
        "baseline_flush_commands": len(base_flush),
        "applied_rules": applied_counts["rules"],
        "applied_routes": applied_counts["routes"],
    }
    result = {"counts": counts,
              "tool": {k: summary(v) for k, v in tool.items()},
              "baseline": {k: summary(v) for k, v in baseline.items()},
              "own_commands": {k: summary(v) for k, v in own.items()},
              "imds_requests": {k: statistics.median(v) for k, v in imds.items()},
              "memory_mib": w.memory(),
              "lookups": None}
    if lookups:
        count = spec["lookups"]
        result["lookups"] = {
            "count": count, "per_kind": {"outside": (count + 1) // 2, "other_subnet": count // 2},
            "without_us": summary(look["without"]), "with_us": summary(look["with"]),
            "ratio": statistics.median(look["with"]) / statistics.median(look["without"]),
            "own_eni_without": look["own_without"], "own_eni_with": look["own_with"]}
    if spec.get("profile"):
        result["profile"] = profile(spec, w.base, w.work)
        w.clean_check("after profiling")
    return result


def profile(spec, base, work):
    """Where the time of the largest size goes: imports, stages, commands, cProfile."""
    py, tool = spec["python"], spec["tool"]
    args = base[2:]
    found = {}
    # 1. Interpreter start-up and imports.
    _, _ = timed([py, "-X", "importtime", "-c", "pass"])
    proc = subprocess.run([py, "-X", "importtime", tool, "--version"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=ENV)
    found["importtime"] = parse_importtime(proc.stderr)
    # 2. Stages and commands of apply, re-apply and flush, in-process timers.
    runs = {"apply": [], "reapply": [], "flush": []}
    for _ in range(3):  # three cycles; the run with the median wall time is kept
        for label, extra, prefix in (("apply", [], "applied"), ("reapply", [], "in sync"),
                                     ("flush", ["-f"], "flushed")):
            out_path = os.path.join(work, "stages-%s.json" % label)
            wall, out = timed([py, STAGE_TIMERS, tool, out_path] + args + extra)
            expect_prefix(out, prefix if len(spec["interfaces"]) > 1 or label == "flush" else "in sync",
                          "profiled " + label)
            with open(out_path) as handle:
                data = json.load(handle)
            data["wall_ms"] = wall
            data["startup_and_exit_ms"] = wall - data["inside_ms"]
            runs[label].append(data)
    found["stages"] = {label: sorted(data, key=lambda d: d["wall_ms"])[len(data) // 2]
                       for label, data in runs.items()}
    # 3. Each read program alone, on the applied system (the tool runs them at once, reading
    # the kernel's links, addresses, rules and routes through netlink meanwhile; `ip -j
    # address show`, which it ran before, for comparison).
    timed(base)
    reads = [["iptables-save", "-t", "mangle"], ["ip6tables-save", "-t", "mangle"], ["ip", "-j", "address", "show"]]
    found["reads_applied"] = {" ".join(r): statistics.median([timed(r)[0] for _ in range(5)]) for r in reads}
    timed(base + ["-f"])
    # 4. cProfile of apply (from clean), re-apply and flush.
    cprof = {}
    for label, extra in (("apply", []), ("reapply", []), ("flush", ["-f"])):
        path = os.path.join(work, "cprofile-%s.json" % label)
        timed([py, CPROFILE_RUN, tool, path] + args + extra)
        with open(path) as handle:
            cprof[label] = {name: trim_pstats(text) for name, text in json.load(handle).items()}
    found["cprofile"] = cprof
    return found


def parse_importtime(text):
    rows = []
    for line in text.splitlines():
        match = re.match(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            rows.append({"self_us": int(match.group(1)), "cumulative_us": int(match.group(2)),
                         "depth": (len(match.group(3)) - 1) // 2, "module": match.group(4)})
    top_level = sorted((r for r in rows if r["depth"] == 0), key=lambda r: -r["cumulative_us"])
    return {"total_ms": sum(r["self_us"] for r in rows) / 1000.0,
            "top_level": [{"module": r["module"], "ms": r["cumulative_us"] / 1000.0} for r in top_level[:12]],
            "top_self": [{"module": r["module"], "ms": r["self_us"] / 1000.0}
                         for r in sorted(rows, key=lambda r: -r["self_us"])[:12]]}


def trim_pstats(text):
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("ncalls"):
            head = [l.strip() for l in lines[:i] if "function calls" in l]
            return "\n".join(head + [l.rstrip() for l in lines[i:] if l.strip()])
    return text


# -- The driver: floors, labs, the table and the targets. ------------------------

def floors(python, repeat):
    """Interpreter start-up floors and --version, outside any lab (no network use)."""
    n = max(repeat * 2, 10)
    result = {}

    def measure(label, argv):
        timed(argv)  # warm
        result[label] = summary([timed(argv)[0] for _ in range(n)])

    measure("python -c pass", [python, "-c", "pass"])
    measure("tool --version", [python, TOOL, "--version"])
    # For comparison: other interpreters a user may get as `python3` here.
    others = []
    on_path = shutil.which("python3", path=PATH)
    for candidate in (on_path, sys.executable, "/usr/bin/python3"):
        if candidate and os.path.exists(candidate) and candidate != python and candidate not in others:
            others.append(candidate)
    for other in others:
        measure("%s -c pass" % other, [other, "-c", "pass"])
    return result


def tool_identity():
    """Which version of the tool was measured: commit, whether edited, content hash."""
    with open(TOOL, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    root = os.path.dirname(TOOL)
    git = lambda *a: subprocess.run(["git", "-C", root] + list(a), stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, universal_newlines=True)
    commit = git("log", "-1", "--format=%h", "--", os.path.basename(TOOL)).stdout.strip() or None
    dirty = bool(git("status", "--porcelain", "--", os.path.basename(TOOL)).stdout.strip())
    return {"commit": commit, "modified": dirty, "sha256": digest,
            "describe": "%s at commit %s%s (sha256 %s)" % (os.path.basename(TOOL), commit or "?",
                                                          " + local changes" if dirty else "", digest[:12])}


def choose_python(requested):
    if requested:
        return requested
    # The distribution's interpreter: what `#!/usr/bin/env python3` finds on an instance.
    # A version manager's shim on a developer machine adds tens of ms per start.
    system = "/usr/bin/python3"
    if os.path.exists(system):
        out = subprocess.run([system, "-c", "import sys; print(sys.version_info >= (3, 8))"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        if out == "True":
            return system
    return sys.executable


def benchmark_lab(size):
    """tests/lab.py's Lab for ExN: E ENIs eth0.. of N IPv4 addresses each, ENI k
    in 198.18.(128 + k).0/24 (.10 up, the gateway .1 on the VPC router), the
    default route as DHCP leaves it, IMDSv2 (tokens required) on the router.
    Imported here, not at the top: the worker, which starts every timed run,
    stays a small process."""
    from lab import Lab
    return Lab(enis=size[0], addresses=size[1], ipv6=False, imds="v2", subnets="benchmark", dhcp=True,
               id="%s-%d-%s" % (PREFIX[len("mer-"):], os.getpid(), size_name(size)))


def run_size(size, args, python, profile_it):
    with benchmark_lab(size) as lab:
        found = json.loads(sh(["ip", "-n", lab.instance, "-j", "-4", "address", "show"]) or "[]")
        count = sum(1 for link in found for a in link.get("addr_info", []) if a.get("scope") == "global")
        if count != size[0] * size[1]:  # the lab is what it claims to be
            raise BenchError("lab %s has %d addresses, expected %d" % (lab.instance, count, size[0] * size[1]))
        spec = {"netns": lab.instance, "python": python, "tool": TOOL,
                "interfaces": [eni.name for eni in lab.enis], "subnets": [str(eni.subnet4) for eni in lab.enis],
                "addresses": [eni.addresses4 for eni in lab.enis], "repeat": args.repeat,
                "lookups": args.lookups, "imds_log": str(lab.imds.log_path), "workdir": lab.tmpdir,
                "profile": profile_it, "outer_netns": netns_inode("/proc/self/ns/net")}
        proc = subprocess.run(["ip", "netns", "exec", lab.instance, sys.executable, os.path.abspath(__file__),
                               "--worker"], input=json.dumps(spec), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, env=ENV)
        if proc.returncode != 0:
            raise BenchError("size %s failed:\n%s" % (size_name(size), proc.stderr.strip()[-4000:]))
        return json.loads(proc.stdout)


def fmt(ms):
    return "-" if ms is None else ("%.0f" % ms if ms >= 100 else "%.1f" % ms)


def report(results, fixed, fixed_label):
    rows = []
    header = ["size", "addrs", "rules+routes", "apply", "re-apply", "flush", "base apply", "base flush",
              "speed-up a/f", "ms/addr"]
    for r in results:
        t, b = r["tool"], r["baseline"]
        speed = ("%.0fx / %.0fx" % (r["speedup_apply"], r["speedup_flush"])
                 if r["speedup_apply"] else "-")
        rows.append([r["size"], str(r["addresses"]), str(r["counts"]["rules"] + r["counts"]["routes"]),
                     "%s (%s)" % (fmt(t["apply"]["median"]), fmt(t["apply"]["min"])),
                     "%s (%s)" % (fmt(t["reapply"]["median"]), fmt(t["reapply"]["min"])),
                     "%s (%s)" % (fmt(t["flush"]["median"]), fmt(t["flush"]["min"])),
                     "%s (%s)" % (fmt(b["apply"]["median"]), fmt(b["apply"]["min"])),
                     "%s (%s)" % (fmt(b["flush"]["median"]), fmt(b["flush"]["min"])),
                     speed,
                     "-" if r["per_address_ms"] is None else "%.3f" % r["per_address_ms"]])
    print("times in ms, median (min); apply/re-apply/flush = the tool told the ENIs (-i, --no-imds);")
    print("base = the baseline: per-address routing, one process per command (fixed, see README)")
    print_table(header, rows)
    print("ms/addr = (tool apply - %s %s ms) / addresses" % (fixed_label, fmt(fixed)))
    # Marginal cost between a size and the next larger one with at least as many
    # ENIs and addresses per ENI (so that each step only adds work).
    multi = sorted((r for r in results if r["dims"][0] > 1), key=lambda r: r["addresses"])
    for a in multi:
        b = next((b for b in multi if b["addresses"] > a["addresses"] and b["dims"][0] >= a["dims"][0]
                  and b["dims"][1] >= a["dims"][1]), None)
        if b:
            print("marginal cost %s -> %s: %.3f ms per address (tool apply), %.3f (baseline apply)" % (
                a["size"], b["size"],
                (b["tool"]["apply"]["median"] - a["tool"]["apply"]["median"]) / (b["addresses"] - a["addresses"]),
                (b["baseline"]["apply"]["median"] - a["baseline"]["apply"]["median"])
                / (b["addresses"] - a["addresses"])))
    print()
    rows = []
    header = ["size", "rules v4 (/ENI)", "v6", "routes", "own cmds a/f", "IMDS apply", "IMDS re-apply",
              "IMDS req", "ratio a/r/IMDS", "peak MiB"]
    for r in results:
        t, c, o = r["tool"], r["counts"], r["own_commands"]
        rules = c["applied_rules"]
        rows.append([r["size"], "%d (%.1f)" % (rules["ipv4"], rules["ipv4"] / float(r["dims"][0])),
                     str(rules["ipv6"]), str(c["applied_routes"]["ipv4"] + c["applied_routes"]["ipv6"]),
                     "%s / %s" % (fmt(o["apply"]["median"]), fmt(o["flush"]["median"])),
                     "%s (%s)" % (fmt(t["imds_apply"]["median"]), fmt(t["imds_apply"]["min"])),
                     "%s (%s)" % (fmt(t["imds_reapply"]["median"]), fmt(t["imds_reapply"]["min"])),
                     "%g / %g" % (r["imds_requests"]["apply"], r["imds_requests"]["reapply"]),
                     "-" if r["ratio"]["apply"] is None else "%.3f / %.3f / %.3f (%.3f / %.3f / %.3f)" % (
                         r["ratio"]["apply"], r["ratio"]["reapply"], r["ratio"]["imds_apply"],
                         r["ratio_of_mins"]["apply"], r["ratio_of_mins"]["reapply"],
                         r["ratio_of_mins"]["imds_apply"]),
                     "%.1f" % r["memory_mib"]["peak_run"]])
    print("rules/routes: protocol 231, counted with `ip rule`/`ip route` after the apply; own cmds = the tool's")
    print("own --dry-run, one process per command; IMDS = the tool without -i/--no-imds, emulator answering")
    print("(IMDS req: requests per apply / re-apply); ratio = tool median / baseline apply median")
    print("(in parentheses: min / min, less moved by other load);")
    print("peak = largest max RSS of apply, re-apply, flush (with and without IMDS)")
    print_table(header, rows)
    looked = [r for r in results if r["lookups"]]
    if looked:
        print()
        rows = []
        header = ["size", "lookups", "us without", "us with", "ratio", "own ENI w/o: out/other",
                  "own ENI with: out/other"]
        for r in looked:
            lk = r["lookups"]
            mix = lambda own: "%d/%d" % (own["outside"], own["other_subnet"])
            rows.append([r["size"], str(lk["count"]),
                         "%.2f (%.2f)" % (lk["without_us"]["median"], lk["without_us"]["min"]),
                         "%.2f (%.2f)" % (lk["with_us"]["median"], lk["with_us"]["min"]),
                         "%.2f" % lk["ratio"], mix(lk["own_eni_without"]), mix(lk["own_eni_with"])])
        print("route lookups: one `ip -batch` of `route get DST from ENI-ADDRESS`, half outside the VPC,")
        print("half into another ENI's subnet; us per lookup, median (min); own ENI = answers leaving")
        print("through the source address's ENI, of %s" % ", ".join(
            "%s: %d/%d" % (r["size"], r["lookups"]["per_kind"]["outside"], r["lookups"]["per_kind"]["other_subnet"])
            for r in looked))
        print_table(header, rows)
    peaks = [r for r in results if r["size"] == size_name(TARGET_SIZE)] or results[-1:]
    for r in peaks:
        m = r["memory_mib"]
        print("max RSS at %s, MiB: %s" % (r["size"], ", ".join(
            "%s %.1f" % (k, v) for k, v in m.items() if k != "peak_run")))


def target_value(target):
    value, unit = target["value"], target["unit"]
    if value is None:
        return "-"
    if unit in ("rules", "lookups"):
        return "%d %s (limit %d)" % (value, unit, target["limit"])
    if unit == "ratio":
        return "%.2f" % value
    return ("%.4f %s" if value < 1 else "%.3f %s" if unit == "x" else "%.1f %s") % (value, unit)


def print_table(header, rows):
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def check_targets(results):
    by_size = {tuple(r["dims"]): r for r in results}
    big, ref = by_size.get(TARGET_SIZE), by_size.get(LINEAR_REFERENCE)
    targets = []

    def add(name, value, limit, ok, unit):
        targets.append({"target": name, "value": value, "limit": limit, "unit": unit,
                        "result": "SKIP" if ok is None else ("PASS" if ok else "FAIL")})

    def at_most(name, value, limit, unit, strict=False):
        add(name, value, limit, None if value is None else (value < limit if strict else value <= limit), unit)

    where = size_name(TARGET_SIZE)
    enis = TARGET_SIZE[0]
    rule_limit = TARGET_RULES_PER_ENI * enis + TARGET_RULES_EXTRA
    for family in ("ipv4", "ipv6"):
        value = big["counts"]["applied_rules"][family] if big else None
        at_most("%s %s rules <= %d per ENI + %d (%d)" % (where, family, TARGET_RULES_PER_ENI, TARGET_RULES_EXTRA,
                                                         rule_limit), value, rule_limit, "rules")
    lookups = big and big["lookups"]
    at_most("%s route lookups <= %.1fx without the tool" % (where, TARGET_LOOKUP_RATIO),
            lookups["ratio"] if lookups else None, TARGET_LOOKUP_RATIO, "x")
    outside = lookups and lookups["own_eni_with"]["outside"]
    add("%s lookups to outside leave by their ENI" % where, outside,
        lookups["per_kind"]["outside"] if lookups else None,
        None if not lookups else outside == lookups["per_kind"]["outside"], "lookups")
    for key, label in (("apply", "apply"), ("reapply", "re-apply"), ("imds_apply", "apply with IMDS")):
        value = big["ratio"][key] if big else None
        at_most("%s %s <= %.2fx baseline apply" % (where, label, TARGET_RATIOS[key]), value,
                TARGET_RATIOS[key], "x")
    value = big["memory_mib"]["peak_run"] if big else None
    at_most("%s peak memory of a run < %.0f MiB" % (where, TARGET_PEAK_MIB), value, TARGET_PEAK_MIB, "MiB",
            strict=True)
    for key, label in (("apply", "apply"), ("reapply", "re-apply"), ("flush", "flush")):
        value = big["tool"][key]["median"] if big else None
        at_most("%s %s < %.0f ms" % (where, label, TARGETS_MS[key]), value, TARGETS_MS[key], "ms", strict=True)
    value = big["speedup_flush"] if big else None
    add("%s flush >= %.0fx faster than the baseline" % (where, TARGET_SPEEDUP), value, TARGET_SPEEDUP,
        None if value is None else value >= TARGET_SPEEDUP, "x")
    ratio = None
    if big and ref and big["per_address_ms"] and ref["per_address_ms"]:
        ratio = big["per_address_ms"] / ref["per_address_ms"]
    add("linear: ms/addr at %s <= %.0fx that at %s" % (where, TARGET_LINEARITY, size_name(LINEAR_REFERENCE)),
        ratio, TARGET_LINEARITY, None if ratio is None else ratio <= TARGET_LINEARITY, "ratio")
    return targets


def print_profile(prof, size):
    print()
    print("== profile at %s ==" % size)
    imp = prof["importtime"]
    print("imports (python -X importtime TOOL --version): %.1f ms in all; top level, cumulative:" % imp["total_ms"])
    for row in imp["top_level"][:10]:
        print("  %7.1f ms  %s" % (row["ms"], row["module"]))
    for label, data in prof["stages"].items():
        print("%s (median of 3, in-process timers): wall %.0f ms = start-up+exit %.0f + compile %.1f"
              " + module body (imports) %.1f + main %.0f" % (label, data["wall_ms"], data["startup_and_exit_ms"], data["compile_ms"], data["exec_ms"],
                 data["main_ms"]))
        funcs = sorted(data["functions"].items(), key=lambda kv: -kv[1]["ms"])
        print("   " + ", ".join("%s %.1f ms (x%d)" % (k, v["ms"], v["calls"]) for k, v in funcs[:12]))
        for cmd, ms in data["commands"]:
            print("   %6.1f ms  %s" % (ms, cmd[:150]))
    print("read programs alone on the applied system (median of 5):")
    for cmd, ms in sorted(prof["reads_applied"].items(), key=lambda kv: -kv[1]):
        print("  %6.1f ms  %s" % (ms, cmd))
    for label in ("apply", "reapply"):
        print("cProfile of %s, by own time (profiling inflates Python-heavy parts):" % label)
        print("\n".join("  " + l for l in prof["cprofile"][label]["tottime"].splitlines()[:16]))
        print("cProfile of %s, the tool's functions by cumulative time:" % label)
        print("\n".join("  " + l for l in prof["cprofile"][label]["tool_cumulative"].splitlines()[:16]))


def main(argv=None):
    global TOOL
    parser = argparse.ArgumentParser(description="Benchmark multi_eni_routing.py in lab network namespaces.")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated ENIsxADDRESSES (default %s)" % DEFAULT_SIZES)
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions per figure (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--python", metavar="PATH",
                        help="interpreter to run the tool with (default /usr/bin/python3 if it is "
                             "3.8+, else the one running this script)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the largest size (importtime, stage timers, cProfile)")
    parser.add_argument("--quick", action="store_true",
                        help="only %s with %d repetitions (overrides --sizes and --repeat)"
                             % (QUICK_SIZES, QUICK_REPEAT))
    parser.add_argument("--lookups", type=int, default=DEFAULT_LOOKUPS, metavar="N",
                        help="route lookups per timed batch (default %d; 0: none)" % DEFAULT_LOOKUPS)
    parser.add_argument("--tool", metavar="FILE", help="the tool to measure (default %s)" % TOOL)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        try:
            print(json.dumps(worker(json.load(sys.stdin))))
        except BenchError as exc:
            sys.stderr.write("bench worker: %s\n" % exc)
            return 1
        return 0

    if args.tool:
        TOOL = os.path.abspath(args.tool)
        if not os.path.isfile(TOOL):
            parser.error("--tool: %s is not a file" % args.tool)
    if args.quick:
        args.sizes, args.repeat = QUICK_SIZES, QUICK_REPEAT
    if args.lookups < 0:
        parser.error("--lookups must be 0 or more")
    try:
        sizes = [parse_size(s) for s in args.sizes.replace(" ", ",").split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if os.geteuid() != 0:
        sys.stderr.write("bench: must run as root (it creates network namespaces)\n")
        return 4
    for program in ("ip", "iptables", "iptables-save", "iptables-restore", "sysctl", "sh"):
        if not shutil.which(program, path=PATH):
            sys.stderr.write("bench: %s not found\n" % program)
            return 5

    # SIGTERM/SIGHUP end the run through the finally blocks that delete the labs.
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    python = choose_python(args.python)
    if not (shutil.which(python) and os.access(shutil.which(python), os.X_OK)):
        parser.error("--python: %s is not an executable" % python)
    remove_stale_labs()
    machine = {"cpus": os.cpu_count(), "kernel": platform.release(),
               "python": python, "python_version": sh([python, "-c", "import sys; print(sys.version.split()[0])"]).strip(),
               "ip": sh(["ip", "-V"]).strip(), "iptables": sh(["iptables", "--version"]).strip()}
    print("bench: %s, python %s (%s), %d cpus, kernel %s, %s" % (
        os.path.relpath(TOOL), machine["python_version"], python, machine["cpus"], machine["kernel"],
        machine["iptables"]))
    identity = tool_identity()
    print("tool: %s" % identity["describe"])
    floor = floors(python, args.repeat)
    largest = max(sizes, key=lambda s: s[0] * s[1])
    results = []
    try:
        for size in sizes:
            sys.stdout.write("size %s ... " % size_name(size))
            sys.stdout.flush()
            started = time.monotonic()
            data = run_size(size, args, python, args.profile and size == largest)
            print("%.0f s" % (time.monotonic() - started))
            data.update(size=size_name(size), dims=list(size), addresses=size[0] * size[1])
            results.append(data)
    except BenchError as exc:
        sys.stderr.write("bench: %s\n" % exc)
        return 1
    finally:
        leftovers = [l for l in sh(["ip", "netns", "list"]).splitlines()
                     if l.startswith("%s-%d-" % (PREFIX, os.getpid()))]
        if leftovers:
            sys.stderr.write("bench: WARNING: namespaces left: %s\n" % leftovers)

    if tool_identity()["sha256"] != identity["sha256"]:
        sys.stderr.write("bench: WARNING: %s changed during the run: figures mix versions\n" % TOOL)
        identity["changed_during_run"] = True
    # The fixed start-up cost: interpreter, compiling the tool, its imports (what
    # --version costs). What is left of an apply is the work that grows with size.
    fixed, fixed_label = floor["tool --version"]["median"], "start-up (tool --version)"
    for r in results:
        t, b = r["tool"], r["baseline"]
        work = r["counts"]["baseline_apply_commands"]
        r["speedup_apply"] = b["apply"]["median"] / t["apply"]["median"] if work else None
        r["speedup_flush"] = b["flush"]["median"] / t["flush"]["median"] if work else None
        r["ratio"] = {k: (t[k]["median"] / b["apply"]["median"] if work else None)
                      for k in ("apply", "reapply", "imds_apply")}
        r["ratio"]["flush"] = t["flush"]["median"] / b["flush"]["median"] if work else None
        # The same from the fastest runs: less moved by other load on the machine.
        r["ratio_of_mins"] = {k: (t[k]["min"] / b["apply"]["min"] if work else None)
                              for k in ("apply", "reapply", "imds_apply")}
        r["per_address_ms"] = ((t["apply"]["median"] - fixed) / r["addresses"]
                               if r["addresses"] > 1 else None)
    print()
    print("floors (median of %d, ms): %s" % (
        len(floor["python -c pass"]["samples"]),
        ", ".join("%s %s" % (k, fmt(v["median"])) for k, v in floor.items())))
    report(results, fixed, fixed_label)
    targets = check_targets(results)
    print()
    for t in targets:
        print("%-4s  %-52s  %s" % (t["result"], t["target"], target_value(t)))
    for r in results:
        if "profile" in r:
            print_profile(r["profile"], r["size"])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "tool": identity, "repeat": args.repeat, "quick": args.quick,
                       "lookups": args.lookups, "floors": floor,
                       "fixed_cost": {"ms": fixed, "what": fixed_label},
                       "sizes": results, "targets": targets}, handle, indent=1)
        print("\nwrote %s" % args.json)
    if args.check and any(t["result"] == "FAIL" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.stderr.write("bench: %s\n" % exc)
        sys.exit(1)
