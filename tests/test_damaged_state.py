"""A damaged, hostile or unwritable state record never blocks apply, --status
or a flush, and is never trusted (issue 18, items 2-4). Each lab test fails
with the tool of before the typed record (it trusted the record, or stopped
on it, or left a temporary file)."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from lab import TOOL, TOOL_PYTHON, ToolResult, snapshot_diff
from recorded import mer

ARGS = ("-i", "eth0", "-i", "eth1", "--no-imds")


def state_file(lab):
    """The lab's one state record."""
    files = sorted(Path(lab.state_dir).glob("state-netns-*.json"))
    assert len(files) == 1, files
    return files[0]


def without_sysctls(snapshot):
    """A snapshot but for the sysctls: their originals are what only the record knew."""
    return {key: value for key, value in snapshot.items() if key != "sysctls"}


# -- Unit: the record is validated field by field. ------------------------------

VALID = {"version": 1,
         "sysctls": {"net/ipv4/conf/eth1/rp_filter": {"original": "1", "set": "2", "ifindex": 3}},
         "addresses": [["eth1", "2001:db8::5/128", None], ["eth1", "203.0.113.11/32", 3]],
         "slots": {"0:0": 0, "0:1": 1}}


def test_a_record_of_the_tool_reads_back_as_it_was_written(tmp_path):
    path = str(tmp_path / "state.json")
    record = mer.record_of(VALID)
    mer.save_record(path, record)
    assert mer.load_record(path) == record
    assert json.loads(Path(path).read_text()) == VALID
    assert os.listdir(str(tmp_path)) == ["state.json"]  # no temporary file left
    old = dict(VALID)
    del old["version"]  # written by the tool's first versions
    assert mer.record_of(old) == record


@pytest.mark.parametrize("change, why", [
    (lambda r: r.update(sysctls={"net/ipv4/conf/eth1/../../../../../../tmp/x": VALID["sysctls"][
        "net/ipv4/conf/eth1/rp_filter"]}), "is not one the tool writes"),
    (lambda r: r.update(sysctls={"net/ipv4/conf/../rp_filter": {"original": "1", "set": "2"}}),
     "is not one the tool writes"),
    (lambda r: r.update(sysctls={"net/ipv4/conf/eth1/forwarding": {"original": "1", "set": "2"}}),
     "is not one the tool writes"),
    (lambda r: r["sysctls"]["net/ipv4/conf/eth1/rp_filter"].update(original="7\n"), "not a value of rp_filter"),
    (lambda r: r["sysctls"]["net/ipv4/conf/eth1/rp_filter"].update(set=2), "not a value of rp_filter"),
    (lambda r: r["sysctls"]["net/ipv4/conf/eth1/rp_filter"].update(ifindex=True), "not an interface index"),
    (lambda r: r["sysctls"]["net/ipv4/conf/eth1/rp_filter"].update(ifindex=-1), "not an interface index"),
    (lambda r: r.update(addresses=[["eth1", "203.0.113.0/24", 3]]), "not one address"),
    (lambda r: r.update(addresses=[["eth1", "203.0.113.011/32", 3]]), "not one address"),
    (lambda r: r.update(addresses=[["e 1", "203.0.113.1/32", 3]]), "not an interface name"),
    (lambda r: r.update(addresses=[["eth1"]]), r"not \[dev, cidr, ifindex\]"),
    (lambda r: r.update(slots={"0:0": 100}), "out of range"),
    (lambda r: r.update(slots={"0:0": "0"}), "out of range"),
    (lambda r: r.update(slots={"../0": 0}), "not card:device"),
    (lambda r: r.update(sysctls=[]), "sysctls is not a JSON object"),
    (lambda r: r.update(addresses={}), "addresses is not a JSON array"),
    (lambda r: r.update(version=2), "version"),
    (lambda r: r.update(extra=1), "unknown field"),
])
def test_a_record_field_the_tool_would_not_write_makes_the_record_invalid(change, why):
    data = json.loads(json.dumps(VALID))
    change(data)
    with pytest.raises(mer.InvalidRecord, match=why):
        mer.record_of(data)


@pytest.mark.parametrize("text", [b"", b"\0" * 64, b"\xff\xfe garbage", b"[" * 100000 + b"]" * 100000,
                                  json.dumps(VALID).encode()[:40], b"[]", b"null"])
def test_a_record_that_is_not_json_of_one_is_invalid(tmp_path, text):
    path = tmp_path / "state.json"
    path.write_bytes(text)
    with pytest.raises(mer.InvalidRecord):
        mer.load_record(str(path))


def test_a_record_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "state.json")
    real_replace = os.replace

    def full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mer.os, "replace", full)
    with pytest.raises(mer.ToolError, match="cannot write the state record .*No space left"):
        mer.save_record(path, mer.record_of(VALID))
    monkeypatch.setattr(mer.os, "replace", real_replace)
    assert os.listdir(str(tmp_path)) == []


# -- Lab: damaged records in the instance. ----------------------------------------

DAMAGES = {
    "garbage": lambda text: b"\x8b\x1f\x08 not a record \xff",
    "empty": lambda text: b"",
    "nul-bytes": lambda text: b"\0" * len(text),
    "truncated": lambda text: text[:len(text) // 2],
    "deeply-nested": lambda text: b"[" * 200000 + b"]" * 200000,
    "wrong-types": lambda text: json.dumps({"sysctls": [], "addresses": {"a": 1}, "slots": "0:0"}).encode(),
    "refused-value": lambda text: text.replace(b'"original": "', b'"original": "9\\n'),
}


@pytest.mark.root
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_record_is_set_aside_and_status_apply_and_flush_go_on(make_lab, damage):
    lab = make_lab(ipv6=False)
    before = lab.snapshot()
    assert lab.run_tool(*ARGS).rc == 0
    applied = lab.snapshot()
    path = state_file(lab)
    path.write_bytes(DAMAGES[damage](path.read_bytes()))

    status = lab.run_tool("--status", *ARGS)
    assert status.rc == 0, status.stderr  # in sync: every rule, route and chain carries the marker
    assert status.stderr.startswith("multi-eni-routing: warning: state record %s is not valid (" % path)
    assert len(status.stderr.splitlines()) == 1, status.stderr

    again = lab.run_tool(*ARGS)
    assert again.rc == 0, again.stderr
    assert again.stderr.splitlines() == [line for line in again.stderr.splitlines()
                                         if "set aside as %s.invalid" % path in line]
    assert len(again.stderr.splitlines()) == 1, again.stderr
    assert os.path.exists("%s.invalid" % path)
    assert lab.snapshot() == applied

    path.write_bytes(DAMAGES[damage](path.read_bytes() if path.exists() else b"{}"))
    flushed = lab.run_tool("-f", *ARGS)
    assert flushed.rc == 0, flushed.stderr
    assert snapshot_diff(without_sysctls(before), without_sysctls(lab.snapshot())) == ""


@pytest.mark.root
def test_a_record_with_a_traversal_key_makes_a_flush_write_nothing_outside_the_tools_sysctls(make_lab, tmp_path):
    """The record's "original" was written to any file a `..` key named, as root."""
    lab = make_lab(ipv6=False)
    before = lab.snapshot()
    assert lab.run_tool(*ARGS).rc == 0
    target = tmp_path / "target"
    target.write_text("untouched\n")
    path = state_file(lab)
    record = json.loads(path.read_text())
    key = "net/ipv4/conf/eth1/" + "../" * 6 + str(target).lstrip("/")
    record["sysctls"][key] = {"original": "written by the tool", "set": "untouched", "ifindex": None}
    path.write_text(json.dumps(record))

    flushed = lab.run_tool("-f", *ARGS)
    assert target.read_text() == "untouched\n"
    assert flushed.rc == 0, flushed.stderr
    assert "is not one the tool writes" in flushed.stderr and "set aside" in flushed.stderr
    assert snapshot_diff(without_sysctls(before), without_sysctls(lab.snapshot())) == ""


# -- Lab: a full state directory (a 4 KiB tmpfs in a private mount namespace). ----

class PrivateMounts:
    """A mount namespace of its own (a sleeping `unshare -m`), to run the tool
    in with a tmpfs over the lab's state dir; gone with the process, mounts and all."""

    def __init__(self):
        self.process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
        self.pid = str(self.process.pid)
        deadline = 50
        while os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/%s/ns/mnt" % self.pid) and deadline:
            subprocess.run(["sleep", "0.02"])
            deadline -= 1

    def run(self, *argv):
        return subprocess.run(["nsenter", "-t", self.pid, "-m", *argv], capture_output=True, text=True,
                              timeout=60)

    def run_tool(self, lab, *args):
        result = self.run("ip", "netns", "exec", lab.instance, TOOL_PYTHON, str(TOOL), *args,
                          "--state-dir", lab.state_dir)
        return ToolResult(result.returncode, result.stdout, result.stderr)

    def close(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def private_mounts():
    """private_mounts() -> PrivateMounts, made after the lab (whose netns it must see)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -m)")
    made = []
    yield lambda: made.append(PrivateMounts()) or made[-1]
    for mounts in made:
        mounts.close()


@pytest.mark.root
def test_a_full_state_directory_changes_nothing_and_a_flush_still_runs(make_lab, private_mounts):
    """Before: apply failed with an `unexpected OSError` leaving a .tmp file,
    and a flush on the full directory failed the same way."""
    lab = make_lab(ipv6=False)
    before = lab.snapshot()
    private_mounts = private_mounts()
    os.makedirs(lab.state_dir, exist_ok=True)
    assert private_mounts.run("mount", "-t", "tmpfs", "-o", "size=4k,mode=755", "tmpfs",
                              lab.state_dir).returncode == 0
    fill = os.path.join(lab.state_dir, "fill")
    private_mounts.run("dd", "if=/dev/zero", "of=" + fill, "bs=4096", "count=1")

    refused = private_mounts.run_tool(lab, *ARGS)
    assert refused.rc == 1
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("multi-eni-routing: error: cannot write the state record %s/state-netns-"
                                     % lab.state_dir)
    assert refused.stderr.endswith(": No space left on device: nothing was changed\n")
    assert sorted(private_mounts.run("ls", lab.state_dir).stdout.split()) == ["fill", "lock"]
    assert lab.snapshot() == before

    private_mounts.run("rm", fill)
    applied = private_mounts.run_tool(lab, *ARGS)
    assert applied.rc == 0, applied.stderr
    private_mounts.run("dd", "if=/dev/zero", "of=" + fill, "bs=4096", "count=1")  # full: no page left
    assert private_mounts.run("sh", "-c", "echo x > %s/probe" % lab.state_dir).returncode != 0

    flushed = private_mounts.run_tool(lab, "-f", *ARGS)
    assert flushed.rc == 0, flushed.stderr
    assert lab.snapshot() == before  # the sysctls given back too: the record was read
    assert sorted(private_mounts.run("ls", lab.state_dir).stdout.split()) == ["fill", "lock", "probe"]


def test_on_a_read_only_state_directory_the_directory_itself_is_locked(tmp_path, monkeypatch):
    """A flush must run where the lock file cannot be made (EROFS, ENOSPC)."""
    real_open = os.open

    def read_only(path, flags, *mode):
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *mode)

    monkeypatch.setattr(mer.os, "open", read_only)
    with mer.Lock(str(tmp_path)) as lock:
        assert os.path.samefile("/proc/self/fd/%d" % lock.handle, str(tmp_path))
        with pytest.raises(mer.ToolError, match="another run holds"):
            mer.take_lock(str(tmp_path), timeout=0.1)
    assert lock.handle is None
