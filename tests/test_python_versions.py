"""The tool on every Python from 3.8 to 3.13 found on this machine: the golden
plans come out the same, and --help works. (The lab suite runs the tool under
another interpreter with MER_TOOL_PYTHON.)"""

import glob
import os
import shutil
import subprocess
import sys

import pytest

import recorded

SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import recorded
for name in recorded.NAMES:
    print("== " + name)
    print("\\n".join(recorded.plan_commands(name)))
"""


def interpreters():
    """python3.8 ... python3.13 on PATH or under pyenv, one per minor version."""
    found = {}
    candidates = [shutil.which("python3.%d" % minor) for minor in range(8, 14)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for path in filter(None, candidates):
        version = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        if version in ["3.%d" % minor for minor in range(8, 14)]:
            found.setdefault(version, path)
    return sorted(found.items())


FOUND = interpreters()


@pytest.mark.parametrize("version, python", FOUND, ids=[v for v, _ in FOUND])
def test_golden_plans_are_the_same_on(version, python):
    mine = subprocess.run([sys.executable, "-c", SCRIPT, recorded.HERE],
                          stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    theirs = subprocess.run([python, "-c", SCRIPT, recorded.HERE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == mine


@pytest.mark.parametrize("version, python", FOUND, ids=[v for v, _ in FOUND])
def test_help_works_on(version, python):
    tool = os.path.join(os.path.dirname(recorded.HERE), "multi_eni_routing.py")
    out = subprocess.run([python, tool, "--help"], stdout=subprocess.PIPE, universal_newlines=True)
    assert out.returncode == 0 and "--flush" in out.stdout
