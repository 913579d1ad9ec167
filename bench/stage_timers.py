"""Run the tool once with timers around its stages:
python3 stage_timers.py TOOL OUT_JSON ARGS...

Not an edit of the tool: it compiles TOOL as `python TOOL` would, then wraps
the module-level functions named in STAGES (and Run's methods) with timers,
calls main(ARGS) and writes to OUT_JSON the compile, module-body and main
times, each stage's calls and milliseconds, and every command run_together()
ran, with the time of the group it ran in (the programs of a group run at once).
bench.py --profile uses it at the largest size.
"""

import json
import os
import sys
import time
import types

T0 = time.perf_counter()
sys.dont_write_bytecode = True

# The tool's stages, in the order a run goes through them (a name the tool no
# longer has is skipped).
STAGES = ["parse_args", "find_programs", "take_lock", "read_outputs", "read_kernel", "netlink_dump", "address_entries",
          "run_together", "run", "start", "serve", "load_json",
          "parse_links", "parse_rules", "parse_routes", "parse_mangle", "read_sysfs", "netns_id",
          "load_record", "live_record", "save_record", "owned_state", "desired_state", "discover_imds",
          "select_enis", "plan", "diff", "read_sysctls", "render", "apply_changes", "write_sysctls",
          "summary", "make_context", "converge", "read_system", "read_record", "changes_between",
          "apply_verified", "verify", "roll_back"]
RUN_METHODS = ("read", "changes", "converge", "roll_back")  # of the tool's Run class, before converge()

tool, out_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(tool) as handle:
    source = handle.read()
t = time.perf_counter()
code = compile(source, tool, "exec")
compile_s = time.perf_counter() - t
mod = types.ModuleType("multi_eni_routing")
mod.__file__ = tool
sys.modules["multi_eni_routing"] = mod
t = time.perf_counter()
exec(code, mod.__dict__)
exec_s = time.perf_counter() - t
stats, calls = {}, []


def describe(argv):
    """A command as one line, its program without the directory."""
    return " ".join([os.path.basename(argv[0])] + list(argv[1:]))


def wrap(owner, name, label):
    """Replace owner.name with a timer around it; run_together() also logs its commands."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            took = time.perf_counter() - start
            entry = stats.setdefault(label, [0, 0.0])
            entry[0] += 1
            entry[1] += took
            if name == "run_together":  # each command with the time of its whole group
                calls.extend([describe(argv), took * 1000] for argv, _ in args[0])
    setattr(owner, name, wrapper)


for name in STAGES:
    if hasattr(mod, name):
        wrap(mod, name, name)
for name in RUN_METHODS:
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
