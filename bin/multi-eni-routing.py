#!/usr/bin/python3 -SE
"""multi-eni-routing.py: the installed command. It runs the tool from its
module, /usr/lib/multi-eni-routing/multi_eni_routing.py, so that Python starts
from the bytecode compiled at install time (a script's bytecode is never
cached; a module's is). -S: the tool uses the standard library only, so the
site module (site-packages, .pth files: a third of the interpreter's start)
is skipped; -E: PYTHON* variables do not change how it runs as root."""

import _signal  # the built-in half of `signal`, as the module's own first line

_signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # SIGINT while starting: ended, nothing changed

import sys  # noqa: E402

# Only the tool's directory: never modules that happen to lie beside this launcher.
sys.path[0] = "/usr/lib/multi-eni-routing"

from multi_eni_routing import run_as_program  # noqa: E402

run_as_program()
