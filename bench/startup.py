#!/usr/bin/env python3
"""Start-up of the installed command, as ratios to the interpreter's own start.

Run as root from anywhere:  python3 bench/startup.py [--rounds 20] [--check] [--json FILE]
                                                     [--compare OTHER/multi_eni_routing.py]

The command is installed as install.sh installs it (the module beside a small
launcher, compiled to bytecode: `install.sh --destdir` into a temporary
directory, the launcher pointed at it, then compiled as install.sh compiles
it) and timed, wall clock of the whole process, in paired rounds that
alternate the arms (the medians are compared; single runs on a shared 2-core
VM vary by 5-10%):

  --version        launcher --version            against  python3 -c pass
  script           python3 multi_eni_routing.py --version (how it ran before:
                   a script's bytecode is never cached), for comparison
  apply 15x50      ip netns exec NS launcher -i eth0 .. -i eth14 --no-imds
                   from clean (flushed between rounds, untimed)
                                                 against  ip netns exec NS python3 -c pass
  apply 15x50 (compared)   with --compare FILE: the same apply by FILE (another
                   version of the tool), installed the same way, in the same
                   paired rounds: before and after a change, from one run

The apply runs in a network namespace the bench creates and deletes
(mer-startup-<pid>): 15 veth interfaces eth0..eth14 (their peers gw0..gw14 in
the same namespace), the k-th with 50
addresses in 198.18.k.0/24 (.10 up), `default via 198.18.0.1 dev eth0`.
Nothing runs in this machine's own namespace but `python3 -c pass` and
`--version`. Targets (issue 15): --version at most 2.5x, apply at most 5x.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PYTHON = "/usr/bin/python3"  # the launcher's #! line
ENIS, ADDRESSES = 15, 50
TARGETS = {"version": 2.5, "apply": 5.0}
# The interpreter as the launcher starts it: no PYTHON* settings of this
# session (PYTHONDONTWRITEBYTECODE, coverage hooks) in either arm.
ENV = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "COV_"))}


def timed(argv):
    """Seconds of wall clock for ARGV, which must exit 0."""
    started = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit("startup: %s exited %d: %s" % (" ".join(argv), result.returncode,
                                                        result.stderr.decode()[-500:]))
    return elapsed


def install(work, module=None):
    """The command as install.sh installs it, under WORK (with MODULE, another
    version of the tool, in place of this checkout's); the launcher's path."""
    subprocess.run(["sh", os.path.join(REPO, "install.sh"), "--destdir", work, "-q"], check=True, env=ENV)
    libdir = os.path.join(work, "usr/lib/multi-eni-routing")
    if module:
        shutil.copyfile(module, os.path.join(libdir, "multi_eni_routing.py"))
    launcher = os.path.join(work, "usr/bin/multi-eni-routing.py")
    with open(launcher) as handle:
        text = handle.read()
    with open(launcher, "w") as handle:
        handle.write(text.replace('"/usr/lib/multi-eni-routing"', '"%s"' % libdir))
    subprocess.run([PYTHON, "-m", "compileall", "-q", libdir], check=True, env=ENV)
    return launcher


class Namespace:
    """The 15x50 instance: veth ENIs in a namespace of our own (no dummy
    links in these kernels)."""

    def __init__(self):
        self.name = "mer-startup-%d" % os.getpid()

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            lines = ["link set lo up"]
            for k in range(ENIS):
                lines.append("link add eth%d type veth peer name gw%d" % (k, k))
                lines.append("link set gw%d up" % k)
                lines += ["address add 198.18.%d.%d/24 dev eth%d" % (k, 10 + i, k) for i in range(ADDRESSES)]
                lines.append("link set eth%d up" % k)
            lines.append("route add default via 198.18.0.1 dev eth0 proto dhcp")
            subprocess.run(["ip", "-n", self.name, "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                           check=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)

    def prefix(self):
        return ["ip", "netns", "exec", self.name]


def rounds(arms, count, between=None):
    """{name: [seconds]}: every arm once per round, in alternating order."""
    samples = {name: [] for name in arms}
    names = list(arms)
    for n in range(count):
        for name in (names if n % 2 == 0 else names[::-1]):
            samples[name].append(timed(arms[name]))
            if between:
                between(name)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="paired rounds per figure (default 20)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", metavar="FILE", help="also write the samples and ratios to FILE")
    parser.add_argument("--compare", metavar="FILE",
                        help="also time the apply of FILE (another multi_eni_routing.py), installed the same way")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("startup: run as root (the apply needs a network namespace)")
    work = tempfile.mkdtemp(prefix="mer-startup-")
    try:
        launcher = install(work)
        other = install(os.path.join(work, "compared"), args.compare) if args.compare else None
        tool = os.path.join(REPO, "multi_eni_routing.py")
        version = rounds({"python -c pass": [PYTHON, "-c", "pass"],
                          "--version": [launcher, "--version"],
                          "script --version": [PYTHON, tool, "--version"]}, args.rounds)
        state = os.path.join(work, "state")
        with Namespace() as ns:
            apply_argv = ns.prefix() + [launcher, "--no-imds", "-q", "--state-dir", state]
            for k in range(ENIS):
                apply_argv += ["-i", "eth%d" % k]
            arms = {"python -c pass (ip netns exec)": ns.prefix() + [PYTHON, "-c", "pass"],
                    "apply 15x50": apply_argv}
            if other:
                arms["apply 15x50 (compared)"] = [other if word == launcher else word for word in apply_argv]

            def flush_after(name):
                if name.startswith("apply"):
                    timed(arms[name] + ["-f"])

            for name in arms:  # one untimed round trip each: the page cache warm for every arm
                if name.startswith("apply"):
                    timed(arms[name])
                    flush_after(name)
            applies = rounds(arms, args.rounds, flush_after)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in {**version, **applies}.items()}
    ratios = {"version": medians["--version"] / medians["python -c pass"],
              "script": medians["script --version"] / medians["python -c pass"],
              "apply": medians["apply 15x50"] / medians["python -c pass (ip netns exec)"]}
    if other:
        ratios["compared"] = medians["apply 15x50 (compared)"] / medians["python -c pass (ip netns exec)"]
    print("start-up, medians of %d paired rounds (%s, %s)" % (args.rounds, PYTHON, sys.platform))
    for name, value in medians.items():
        print("  %-32s %6.1f ms" % (name, value * 1000))
    print("ratios to the interpreter started the same way:")
    missed = []
    for key, label in (("version", "--version (installed)"), ("script", "--version as a script"),
                       ("apply", "apply 15x50, told the ENIs"), ("compared", "apply 15x50 by --compare")):
        if key not in ratios:
            continue
        target = TARGETS.get(key)
        verdict = "" if target is None else ("  target <= %.1fx: %s" % (
            target, "met" if ratios[key] <= target else "MISSED"))
        if target is not None and ratios[key] > target:
            missed.append(key)
        print("  %-32s %5.2fx%s" % (label, ratios[key], verdict))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"samples": {**version, **applies}, "medians": medians, "ratios": ratios,
                       "targets": TARGETS}, handle, indent=1)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
