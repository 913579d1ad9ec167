#!/usr/bin/env python3
"""Benchmark of multi_eni_routing.py against the naive one-process-per-command way.

Run as root from anywhere:  python3 bench/bench.py [--sizes 1x1,4x10,15x50] [--repeat 5]
                                                  [--json FILE] [--profile] [--python PATH]

For each size ExN (E ENIs with N IPv4 addresses each) it builds a lab in network
namespaces it creates and deletes again (mer-bench-<pid>-<size> and its -peer):
the ENIs are veth pairs eth0..eth<E-1> whose peers (holding the gateway) live in
the peer namespace, ENI k has 198.18.0.0/15's k-th /24 with N addresses (.10 up)
and the instance has `default via <eth0's base+1> dev eth0 proto dhcp`, as DHCP
would leave it. Inside the instance namespace it times, as a user sees it (wall
clock of the whole process):

  tool apply      multi_eni_routing.py -i eth0 .. --no-imds --state-dir DIR  (from clean)
  tool re-apply   the same on the in-sync system
  tool flush      the same with -f
  baseline apply  sh running the tool's own --dry-run output, one process per line
                  (ip -4 rule add .., ip -4 route replace .., iptables -t mangle .., sysctl -w ..)
  baseline flush  sh running the tool's `-f -n` output the same way

and, outside any lab, `python -c pass` (the interpreter's floor) and the tool's
--version. Every baseline apply is checked to leave what the tool would (the
tool's --dry-run must then say "in sync") and every flush to leave nothing.

Nothing is changed in this machine's own network namespace: every `ip` the bench
runs itself carries `-n <lab namespace>`, and the timed runs happen in a worker
started with `ip netns exec` that refuses to run in the initial namespace.
Addresses come only from 198.18.0.0/15. Python standard library only.
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "multi_eni_routing.py")
PREFIX = "mer-bench"
NETWORK = (198, 18)  # 198.18.0.0/15: ENI k gets 198.(18 + k // 256).(k % 256).0/24
FIRST_HOST = 10  # addresses .10 up; .1 is the gateway (on the peer)
MAX_ENIS = 63  # the default mark mask 0x3f00 numbers 63 ENIs
MAX_ADDRESSES = 254 - FIRST_HOST + 1
DEFAULT_SIZES = "1x1,4x10,15x50"
TARGET_SIZE = (15, 50)  # the largest instance's limit
LINEAR_REFERENCE = (4, 10)
TARGETS_MS = {"apply": 100.0, "reapply": 60.0, "flush": 100.0}
TARGET_SPEEDUP = 12.0
TARGET_LINEARITY = 2.0
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


def subnet_of(k):
    return "198.%d.%d" % (NETWORK[1] + k // 256, k % 256)


def netns_inode(path):
    return os.stat(path).st_ino


# -- The lab: instance namespace with veth ENIs, peers in a second namespace. ------

class Lab:
    """Namespaces mer-bench-<pid>-<size> (instance) and ...-peer; deleted on close."""

    def __init__(self, size):
        self.size = size
        self.name = "%s-%d-%s" % (PREFIX, os.getpid(), size_name(size))
        self.peer = self.name + "-peer"
        self.created = []
        self.interfaces = ["eth%d" % k for k in range(size[0])]

    def build(self):
        enis, count = self.size
        for ns in (self.name, self.peer):
            sh(["ip", "netns", "add", ns])
            self.created.append(ns)
        # The first address (.10) is the primary DHCP gives; the rest are secondaries.
        inst = ["link set lo up"]
        peer = ["link set lo up"]
        for k, dev in enumerate(self.interfaces):
            net = subnet_of(k)
            inst.append("link add %s type veth peer name gw%d netns %s" % (dev, k, self.peer))
            peer.append("address add %s.1/24 dev gw%d" % (net, k))
            peer.append("link set gw%d up" % k)
        sh(["ip", "-n", self.name, "-batch", "-"], "\n".join(inst) + "\n")
        sh(["ip", "-n", self.peer, "-batch", "-"], "\n".join(peer) + "\n")
        addrs = []
        for k, dev in enumerate(self.interfaces):
            net = subnet_of(k)
            addrs += ["address add %s.%d/24 dev %s" % (net, FIRST_HOST + j, dev) for j in range(count)]
            addrs.append("link set %s up" % dev)
        addrs.append("route add default via %s.1 dev eth0 proto dhcp src %s.%d"
                     % (subnet_of(0), subnet_of(0), FIRST_HOST))
        sh(["ip", "-n", self.name, "-batch", "-"], "\n".join(addrs) + "\n")
        # Sanity: the lab is what it claims to be.
        data = json.loads(sh(["ip", "-n", self.name, "-j", "-4", "address", "show"]) or "[]")
        found = sum(1 for link in data for a in link.get("addr_info", []) if a.get("scope") == "global")
        if found != enis * count:
            raise BenchError("lab %s has %d addresses, expected %d" % (self.name, found, enis * count))

    def close(self):
        for ns in reversed(self.created):
            sh(["ip", "netns", "del", ns], check=False)
        self.created = []


def remove_stale_labs():
    """Namespaces of an earlier bench run whose process is gone (killed hard)."""
    for line in sh(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(r"^%s-(\d+)-" % PREFIX, name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            sh(["ip", "netns", "del", name], check=False)
        except PermissionError:
            pass


# -- The worker: runs inside the lab namespace (ip netns exec) and does the timing. --

def dry_lines(output):
    text = output.strip()
    return [] if text.startswith("in sync") or not text else text.splitlines()


def write_script(path, lines):
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\nset -e\n")
        for line in lines:
            handle.write(" ".join(shlex.quote(word) for word in line.split()) + "\n")


def expect_prefix(output, prefix, what):
    if not output.strip().startswith(prefix):
        raise BenchError("%s: expected %r, got %r" % (what, prefix, output.strip()[:300]))


def worker(spec):
    own = netns_inode("/proc/self/ns/net")
    if own == spec["outer_netns"] or own != netns_inode("/run/netns/" + spec["netns"]):
        raise BenchError("worker is not inside the lab namespace %s: refusing" % spec["netns"])
    py, tool, repeat, work = spec["python"], spec["tool"], spec["repeat"], spec["workdir"]
    enis = len(spec["interfaces"])
    base = [py, tool] + [w for dev in spec["interfaces"] for w in ("-i", dev)]
    base += ["--no-imds", "--state-dir", os.path.join(work, "state")]
    applied = "applied:" if enis > 1 else "nothing to do"  # one ENI: no policy routing
    in_sync = "in sync" if enis > 1 else "nothing to do"
    flushed = "flushed:"

    def clean_check(what):
        _, out = timed(base + ["-f", "-n"])
        expect_prefix(out, "in sync", what + ": something of the tool's is left")

    clean_check("before the first run")
    apply_lines = dry_lines(timed(base + ["-n"])[1])
    # Warm-up round (caches), and the flush commands the tool would run.
    expect_prefix(timed(base)[1], applied, "warm-up apply")
    if enis > 1:
        timed(base + ["--status"], expect=(0,))
    flush_lines = dry_lines(timed(base + ["-f", "-n"])[1])
    expect_prefix(timed(base)[1], in_sync, "warm-up re-apply")
    expect_prefix(timed(base + ["-f"])[1], flushed, "warm-up flush")
    clean_check("after the warm-up flush")

    apply_sh, flush_sh = os.path.join(work, "baseline-apply.sh"), os.path.join(work, "baseline-flush.sh")
    write_script(apply_sh, apply_lines)
    write_script(flush_sh, flush_lines)

    def baseline_round(samples):
        ms, _ = timed(["sh", apply_sh])
        expect_prefix(timed(base + ["-n"])[1], "in sync", "after the baseline apply, the tool")
        samples["apply"].append(ms)
        ms, _ = timed(["sh", flush_sh])
        clean_check("after the baseline flush")
        samples["flush"].append(ms)

    baseline_round({"apply": [], "flush": []})  # warm-up
    tool_s = {"apply": [], "reapply": [], "flush": [], "dry_run": []}
    base_s = {"apply": [], "flush": []}
    for _ in range(repeat):
        ms, out = timed(base)
        expect_prefix(out, applied, "apply")
        tool_s["apply"].append(ms)
        ms, out = timed(base)
        expect_prefix(out, in_sync, "re-apply")
        tool_s["reapply"].append(ms)
        ms, out = timed(base + ["-f"])
        expect_prefix(out, flushed, "flush")
        tool_s["flush"].append(ms)
        ms, _ = timed(base + ["-n"])  # discover + plan + diff only, from clean
        tool_s["dry_run"].append(ms)
        baseline_round(base_s)
    clean_check("at the end")

    counts = {
        "rules": sum(1 for l in apply_lines if re.match(r"^ip -[46] rule add ", l)),
        "routes": sum(1 for l in apply_lines if re.match(r"^ip -[46] route (add|replace) ", l)),
        "addresses_added": sum(1 for l in apply_lines if re.match(r"^ip -[46] address add ", l)),
        "iptables": sum(1 for l in apply_lines if re.match(r"^ip6?tables ", l)),
        "sysctls": sum(1 for l in apply_lines if l.startswith("sysctl ")),
        "apply_commands": len(apply_lines),
        "flush_commands": len(flush_lines),
    }
    result = {"counts": counts,
              "tool": {k: summary(v) for k, v in tool_s.items()},
              "baseline": {k: summary(v) for k, v in base_s.items()}}
    if spec.get("profile"):
        result["profile"] = profile(spec, base, work)
        clean_check("after profiling")
    return result


# Runs the tool in-process with timers around its stages; not an edit of the tool:
# it compiles the file as `python file.py` would and wraps module-level functions.
DRIVER = r'''
import json, os, sys, time, types
T0 = time.perf_counter()
sys.dont_write_bytecode = True
tool, out_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(tool) as handle:
    source = handle.read()
t = time.perf_counter(); code = compile(source, tool, "exec"); compile_s = time.perf_counter() - t
mod = types.ModuleType("multi_eni_routing"); mod.__file__ = tool
sys.modules["multi_eni_routing"] = mod
t = time.perf_counter(); exec(code, mod.__dict__); exec_s = time.perf_counter() - t
stats, calls = {}, []
def describe(argv):
    if argv and isinstance(argv[0], (list, tuple)):
        return "parallel: " + "; ".join(" ".join([os.path.basename(a[0])] + list(a[1:])) for a in argv)
    return " ".join([os.path.basename(argv[0])] + list(argv[1:]))
def wrap(owner, name, label):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            took = time.perf_counter() - start
            entry = stats.setdefault(label, [0, 0.0]); entry[0] += 1; entry[1] += took
            if name in ("run", "run_all"):
                calls.append([describe(args[0]), took * 1000])
    setattr(owner, name, wrapper)
for name in NAMES:
    if hasattr(mod, name):
        wrap(mod, name, name)
for name in ("read", "changes", "converge", "roll_back"):
    if hasattr(getattr(mod, "Run", None), name):
        wrap(mod.Run, name, "Run." + name)
t = time.perf_counter()
sys.stdout.flush()
rc = mod.main(argv)
main_s = time.perf_counter() - t
with open(out_path, "w") as handle:
    json.dump({"compile_ms": compile_s * 1000, "exec_ms": exec_s * 1000, "main_ms": main_s * 1000,
               "inside_ms": (time.perf_counter() - T0) * 1000, "rc": rc,
               "functions": {k: {"calls": v[0], "ms": v[1] * 1000} for k, v in stats.items()},
               "commands": calls}, handle)
sys.exit(rc)
'''
DRIVER_NAMES = ["parse_args", "find_programs", "take_lock", "read_system", "run_all", "run", "load_json",
                "parse_links", "parse_rules", "parse_routes", "parse_mangle", "read_sysfs", "netns_id",
                "load_record", "save_record", "owned_state", "desired_state", "select_enis", "plan",
                "diff", "read_sysctls", "render", "apply_changes", "restore", "write_sysctls",
                "summarize"]


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
    driver = DRIVER.replace("NAMES", repr(DRIVER_NAMES))
    runs = {"apply": [], "reapply": [], "flush": []}
    for _ in range(3):  # three cycles; the run with the median wall time is kept
        for label, extra, prefix in (("apply", [], "applied"), ("reapply", [], "in sync"),
                                     ("flush", ["-f"], "flushed")):
            out_path = os.path.join(work, "stages-%s.json" % label)
            wall, out = timed([py, "-c", driver, tool, out_path] + args + extra)
            expect_prefix(out, prefix if len(spec["interfaces"]) > 1 or label == "flush" else "in sync",
                          "profiled " + label)
            with open(out_path) as handle:
                data = json.load(handle)
            data["wall_ms"] = wall
            data["startup_and_exit_ms"] = wall - data["inside_ms"]
            runs[label].append(data)
    found["stages"] = {label: sorted(data, key=lambda d: d["wall_ms"])[len(data) // 2]
                       for label, data in runs.items()}
    # 3. Each read command alone, on the applied system (the tool runs them in parallel).
    timed(base)
    reads = [["ip", "-j", "-d", "address", "show"], ["ip", "-j", "-4", "rule", "show"],
             ["ip", "-j", "-6", "rule", "show"], ["ip", "-j", "-4", "route", "show", "table", "all"],
             ["ip", "-j", "-6", "route", "show", "table", "all"], ["iptables-save", "-t", "mangle"],
             ["ip6tables-save", "-t", "mangle"]]
    found["reads_applied"] = {" ".join(r): statistics.median([timed(r)[0] for _ in range(5)]) for r in reads}
    timed(base + ["-f"])
    # 4. cProfile of apply (from clean), re-apply and flush.
    cprof = {}
    for label, extra in (("apply", []), ("reapply", []), ("flush", ["-f"])):
        path = os.path.join(work, "cprofile-%s.prof" % label)
        timed([py, "-m", "cProfile", "-o", path, tool] + args + extra)
        report = {}
        printer = ("import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats(sys.argv[2])"
                   ".print_stats(*sys.argv[3:-1], int(sys.argv[-1]))")
        for name, key, restrict in (("tottime", "tottime", []), ("cumulative", "cumulative", []),
                                    ("tool_cumulative", "cumulative", [os.path.basename(tool)])):
            _, text = timed([py, "-c", printer, path, key] + restrict + ["18"])
            report[name] = trim_pstats(text)
        cprof[label] = report
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


def run_size(size, args, python, profile_it):
    lab = Lab(size)
    work = tempfile.mkdtemp(prefix="%s-%d-%s." % (PREFIX, os.getpid(), size_name(size)))
    try:
        lab.build()
        spec = {"netns": lab.name, "python": python, "tool": TOOL, "interfaces": lab.interfaces,
                "repeat": args.repeat, "workdir": work, "profile": profile_it,
                "outer_netns": netns_inode("/proc/self/ns/net")}
        proc = subprocess.run(["ip", "netns", "exec", lab.name, sys.executable, os.path.abspath(__file__),
                               "--worker"], input=json.dumps(spec), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, env=ENV)
        if proc.returncode != 0:
            raise BenchError("size %s failed:\n%s" % (size_name(size), proc.stderr.strip()[-4000:]))
        return json.loads(proc.stdout)
    finally:
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


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
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    print("times in ms, median (min); apply/re-apply/flush = the tool; base = one process per command")
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
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


def check_targets(results, fixed):
    by_size = {tuple(r["dims"]): r for r in results}
    big, ref = by_size.get(TARGET_SIZE), by_size.get(LINEAR_REFERENCE)
    targets = []

    def add(name, value, limit, ok, unit):
        targets.append({"target": name, "value": value, "limit": limit, "unit": unit,
                        "result": "SKIP" if ok is None else ("PASS" if ok else "FAIL")})

    where = size_name(TARGET_SIZE)
    for key, label in (("apply", "apply"), ("reapply", "re-apply"), ("flush", "flush")):
        value = big["tool"][key]["median"] if big else None
        add("%s %s < %.0f ms" % (where, label, TARGETS_MS[key]), value, TARGETS_MS[key],
            None if value is None else value < TARGETS_MS[key], "ms")
    for key in ("apply", "flush"):
        value = big["speedup_%s" % key] if big else None
        add("%s %s >= %.0fx faster than the baseline" % (where, key, TARGET_SPEEDUP), value, TARGET_SPEEDUP,
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
    print("read commands alone on the applied system (median of 5):")
    for cmd, ms in sorted(prof["reads_applied"].items(), key=lambda kv: -kv[1]):
        print("  %6.1f ms  %s" % (ms, cmd))
    for label in ("apply", "reapply"):
        print("cProfile of %s, by own time (profiling inflates Python-heavy parts):" % label)
        print("\n".join("  " + l for l in prof["cprofile"][label]["tottime"].splitlines()[:16]))
        print("cProfile of %s, the tool's functions by cumulative time:" % label)
        print("\n".join("  " + l for l in prof["cprofile"][label]["tool_cumulative"].splitlines()[:16]))


def main(argv=None):
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
        work = r["counts"]["apply_commands"]
        r["speedup_apply"] = b["apply"]["median"] / t["apply"]["median"] if work else None
        r["speedup_flush"] = b["flush"]["median"] / t["flush"]["median"] if work else None
        r["per_address_ms"] = ((t["apply"]["median"] - fixed) / r["addresses"]
                               if r["addresses"] > 1 else None)
    print()
    print("floors (median of %d, ms): %s" % (
        len(floor["python -c pass"]["samples"]),
        ", ".join("%s %s" % (k, fmt(v["median"])) for k, v in floor.items())))
    report(results, fixed, fixed_label)
    targets = check_targets(results, fixed)
    print()
    for t in targets:
        value = "-" if t["value"] is None else ("%.1f %s" % (t["value"], t["unit"]) if t["unit"] != "ratio"
                                                 else "%.2f" % t["value"])
        print("%-4s  %-48s  %s" % (t["result"], t["target"], value))
    for r in results:
        if "profile" in r:
            print_profile(r["profile"], r["size"])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "tool": identity, "repeat": args.repeat, "floors": floor,
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
