"""cProfile of one run of the tool: python3 cprofile_run.py TOOL OUT_JSON ARGS...

Not `python -m cProfile`: the tool ends with os._exit, before cProfile would
write its file; here main(ARGS) returns into the profiler. Writes to OUT_JSON
three pstats reports of 18 lines each: by own time ("tottime"), by cumulative
time ("cumulative") and the tool's own functions by cumulative time
("tool_cumulative"). bench.py --profile uses it at the largest size.
"""

import cProfile
import io
import json
import os
import pstats
import sys
import types

LINES = 18
tool, out_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
mod = types.ModuleType("multi_eni_routing")
mod.__file__ = tool
sys.modules["multi_eni_routing"] = mod
profiler = cProfile.Profile()
profiler.enable()
with open(tool) as handle:
    exec(compile(handle.read(), tool, "exec"), mod.__dict__)
rc = mod.main(argv)
profiler.disable()
reports = {}
for name, key, restrict in (("tottime", "tottime", []), ("cumulative", "cumulative", []),
                            ("tool_cumulative", "cumulative", [os.path.basename(tool)])):
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(*restrict, LINES)
    reports[name] = text.getvalue()
with open(out_path, "w") as handle:
    json.dump(reports, handle)
sys.exit(rc)
