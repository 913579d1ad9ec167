"""The options file, as the tool reads it (--options-file) for the systemd unit
and the init script alike: shell-like words with no expansion of any kind,
the command line after it, one-line usage errors with exit code 2, and a
flush that never depends on the file being valid."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recorded import mer

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "multi_eni_routing.py"


def options(tmp_path, text):
    path = tmp_path / "options"
    path.write_text(text)
    return str(path)


def test_words_quotes_and_comments(tmp_path):
    path = options(tmp_path, "# a comment\n-x docker0   # trailing comment\n-x 'two words' -v\n\n")
    assert mer.read_options_file(path) == ["-x", "docker0", "-x", "two words", "-v"]
    args = mer.parse_args(["--options-file", path])
    assert args.exclude == ("docker0", "two words") and args.verbose == 1


def test_no_globbing_and_no_variables(tmp_path, monkeypatch):
    """`-x veth*` once became `-x vethfoo` through the shell: never again."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vethfoo").write_text("")
    path = options(tmp_path, '-x veth* -x "$HOME" -x `id`\n')
    assert mer.parse_args(["--options-file", path]).exclude == ("veth*", "$HOME", "`id`")


def test_command_line_comes_after_the_file(tmp_path):
    path = options(tmp_path, "-x a --state-dir /from/file -v\n")
    args = mer.parse_args(["--options-file", path, "-x", "b", "--state-dir", "/from/command/line", "-v"])
    assert args.exclude == ("a", "b")
    assert args.state_dir == "/from/command/line"
    assert args.verbose == 2


def test_the_old_format_is_read(tmp_path):
    """An options file of an earlier version, kept by install.sh because it was changed."""
    path = options(tmp_path, 'MULTI_ENI_ROUTING_OPTS="-x docker0 --no-imds-addresses"\n'
                             'MULTI_ENI_ROUTING_HOTPLUG="yes"\nMULTI_ENI_ROUTING_DEBOUNCE="2"\n')
    args = mer.parse_args(["--options-file", path])
    assert args.exclude == ("docker0",) and args.no_imds_addresses


def run_tool(*args, timeout=60):
    """The tool as a program; as root inside a scratch network namespace (it
    only parses its arguments in these tests, but never in the host's)."""
    prefix = []
    name = "mer-opt-%d" % os.getpid()
    if os.geteuid() == 0:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        prefix = ["ip", "netns", "exec", name]
    try:
        return subprocess.run([*prefix, sys.executable, str(TOOL), *args], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        if prefix:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("file_text, args, message", [
    ("--bogus\n", [], "unrecognized arguments: --bogus"),
    ("--mark-mask 0x101\n", [], "is not one run of set bits"),
    ("-x 'unbalanced\n", [], "No closing quotation"),
    ("MULTI_ENI_ROUTING_OPTS=\"-x 'unbalanced\"\n", [], "No closing quotation"),
    ("--mark-mask 0xffffffff\n", [], "fewer than all 32 bits"),
    (None, [], "No such file or directory"),
    ("", ["--json"], "--json goes with --status"),
    ("", ["--daemon"], "--daemon goes with --watch"),
])
def test_a_bad_option_is_one_line_and_exit_2(tmp_path, file_text, args, message):
    path = options(tmp_path, file_text) if file_text is not None else str(tmp_path / "missing")
    result = run_tool("--options-file", path, *args)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr and "error" in result.stderr
    assert result.stdout == ""


def test_usage_errors_on_the_command_line_are_one_line_too():
    result = run_tool("--interface")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "multi-eni-routing.py: error: argument -i/--interface: expected one argument (see --help)"]


@pytest.mark.root
def test_flush_removes_the_routing_despite_a_bad_options_file(make_lab, tmp_path):
    lab = make_lab(ipv6=False)
    before = lab.snapshot()
    path = options(tmp_path, "-i eth0 -i eth1 --no-imds\n")
    applied = lab.run_tool("--options-file", path)
    assert applied.rc == 0, applied.stderr
    assert lab.snapshot() != before
    Path(path).write_text("-i eth0 -i eth1 --no-imds --bogus\n")
    refused = lab.run_tool("--options-file", path)
    assert refused.rc == 2 and len(refused.stderr.splitlines()) == 1
    flushed = lab.run_tool("--flush", "--options-file", path)
    assert flushed.rc == 0, flushed.stderr
    assert flushed.stderr.splitlines() == [
        "multi-eni-routing: warning: flushing despite the options file %s: unrecognized arguments: --bogus"
        % path]
    assert lab.snapshot() == before  # rules, routes, mangle and the sysctls given back


@pytest.mark.root
def test_flush_with_a_missing_options_file_and_q_is_silent(make_lab, tmp_path):
    lab = make_lab(ipv6=False)
    before = lab.snapshot()
    assert lab.run_tool("-i", "eth0", "-i", "eth1", "--no-imds").rc == 0
    flushed = lab.run_tool("--flush", "-q", "--options-file", str(tmp_path / "missing"))
    assert (flushed.rc, flushed.stdout, flushed.stderr) == (0, "", "")
    assert lab.snapshot() == before


def test_the_options_record_has_a_field_per_option_and_nothing_changes_it():
    parser = mer.build_parser()
    dests = {action.dest for action in parser._actions if action.dest not in ("help", "version")}
    assert dests == set(mer.Options._fields)
    options = mer.parse_args(["-x", "a", "-i", "eth0"])
    with pytest.raises(AttributeError):
        options.exclude = ("b",)
    assert options.exclude == ("a",) and isinstance(options.interface, tuple)


def test_usage_errors_are_raised_once_as_usage_error_never_exit():
    with pytest.raises(mer.UsageError, match="unrecognized arguments: --bogus"):
        mer.parse_args(["--bogus"])
    with pytest.raises(mer.UsageError, match="--json goes with --status"):
        mer.parse_args(["--json"])
