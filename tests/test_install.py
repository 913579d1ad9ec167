"""install.sh into a DESTDIR: the file list, modes, substituted paths, a second
run that changes nothing, an admin's options file that survives, and an
uninstall that leaves nothing behind. No root needed: with DESTDIR the script
registers nothing and checks no host programs."""

import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "install.sh"
TOOL_SOURCE = REPO / "multi_eni_routing.py"
LAUNCHER = "usr/bin/multi-eni-routing.py"
MODULE = "usr/lib/multi-eni-routing/multi_eni_routing.py"

PROGRAMS = 0o755
DATA = 0o644
# What a default install (PREFIX=/usr, Debian-style options file) puts down.
EXPECTED = {
    "usr/bin/multi-eni-routing.py": PROGRAMS,
    "usr/lib/multi-eni-routing/multi_eni_routing.py": DATA,
    "usr/share/man/man8/multi-eni-routing.8.gz": DATA,
    "etc/init.d/multi-eni-routing": PROGRAMS,
    "etc/default/multi-eni-routing": DATA,
    "usr/lib/systemd/system/multi-eni-routing.service": DATA,
    "usr/lib/systemd/networkd.conf.d/multi-eni-routing.conf": DATA,
}
# Files that name the tool by path.
REFERRING = [
    "etc/init.d/multi-eni-routing",
    "usr/lib/systemd/system/multi-eni-routing.service",
]
# What earlier versions installed and the watcher replaces.
OBSOLETE = [
    "usr/libexec/multi-eni-routing-hotplug",
    "usr/share/man/man8/multi-eni-routing.8",  # uncompressed, before the packages
    "usr/lib/systemd/system/multi-eni-routing-refresh.service",
    "usr/lib/systemd/system/multi-eni-routing-refresh.timer",
    "usr/lib/udev/rules.d/90-multi-eni-routing.rules",
    "etc/NetworkManager/dispatcher.d/90-multi-eni-routing",
    "etc/network/if-up.d/multi-eni-routing",
    "etc/network/if-post-down.d/multi-eni-routing",
    "etc/networkd-dispatcher/routable.d/50-multi-eni-routing",
]


def run_install(*args, destdir=None, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("DESTDIR", "PREFIX")}
    if destdir is not None:
        full_env["DESTDIR"] = str(destdir)
    full_env.update(env or {})
    return subprocess.run(["sh", str(INSTALL), *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def files_under(root):
    """{relative path: mode} of the regular files under ROOT."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = path.stat().st_mode & 0o7777
    return found


def snapshot(root):
    """Everything a re-install could change: paths, types, modes, contents, mtimes."""
    state = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            state[str(path.relative_to(root))] = (st.st_mode, digest, st.st_mtime_ns, st.st_ino)
    return state


@pytest.fixture
def installed(tmp_path):
    """A default install into tmp_path/root; its DESTDIR."""
    root = tmp_path / "root"
    result = run_install(destdir=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(autouse=True)
def _tool_present():
    if not TOOL_SOURCE.exists():
        pytest.skip("multi_eni_routing.py is not in the source tree yet")


def test_installs_exactly_the_expected_files_with_their_modes(installed):
    assert files_under(installed) == EXPECTED


def test_installs_the_tool_unchanged_as_a_module_beside_its_launcher(installed):
    # the same lines, but for the #! line: a module is imported, not run
    module, source = (installed / MODULE).read_text(), TOOL_SOURCE.read_text()
    assert source.startswith("#!") and not module.startswith("#!")
    assert module.split("\n", 1)[1] == source.split("\n", 1)[1]
    launcher = (installed / LAUNCHER).read_text()
    assert launcher.startswith("#!/usr/bin/python3 -SE\n")
    assert 'sys.path[0] = "/usr/lib/multi-eni-routing"' in launcher


def test_the_launcher_runs_the_tool_from_its_module(installed):
    """The command names itself as before; the module is imported, so Python
    caches its bytecode (with DESTDIR nothing is compiled: packages do that)."""
    assert not (installed / "usr/lib/multi-eni-routing/__pycache__").exists()
    launcher = (installed / LAUNCHER).read_text().replace("/usr/lib/multi-eni-routing",
                                                          str(installed / "usr/lib/multi-eni-routing"))
    (installed / LAUNCHER).write_text(launcher)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run([str(installed / LAUNCHER), "--version"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("multi-eni-routing.py ")
    assert list((installed / "usr/lib/multi-eni-routing/__pycache__").glob("multi_eni_routing.*.pyc"))


def test_installs_the_shipped_options_file(installed):
    shipped = (REPO / "etc/multi-eni-routing.options").read_text()
    assert (installed / "etc/default/multi-eni-routing").read_text() == shipped


def test_default_prefix_paths_point_at_usr(installed):
    unit = (installed / "usr/lib/systemd/system/multi-eni-routing.service").read_text()
    assert ("ExecStart=/usr/bin/multi-eni-routing.py --watch --options-file /etc/default/multi-eni-routing"
            in unit)
    assert ("ExecStopPost=/usr/bin/multi-eni-routing.py --flush -q --unless-restarting "
            "multi-eni-routing.service --options-file /etc/default/multi-eni-routing" in unit)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    initd = (installed / "etc/init.d/multi-eni-routing").read_text()
    assert "OPTIONS=${MULTI_ENI_ROUTING_OPTIONS:-/etc/default/multi-eni-routing}" in initd


def test_installs_the_man_page(installed):
    page = installed / "usr/share/man/man8/multi-eni-routing.8.gz"
    assert gzip.decompress(page.read_bytes()).decode().startswith(".TH MULTI-ENI-ROUTING 8")


def test_prefix_is_substituted_in_every_file_that_names_a_path(tmp_path):
    root = tmp_path / "root"
    result = run_install("--prefix", "/opt/mer", destdir=root)
    assert result.returncode == 0, result.stderr
    moved = {path.replace("usr/bin/", "opt/mer/bin/").replace("usr/share/", "opt/mer/share/")
             .replace("usr/lib/multi-eni-routing/", "opt/mer/lib/multi-eni-routing/"): mode
             for path, mode in EXPECTED.items()}
    assert files_under(root) == moved
    for rel in REFERRING:
        text = (root / rel).read_text()
        assert "/usr/bin/multi-eni-routing.py" not in text, rel
        assert "/opt/mer/bin/multi-eni-routing.py" in text, rel
    initd = (root / "etc/init.d/multi-eni-routing").read_text()
    assert "TOOL=${MULTI_ENI_ROUTING:-/opt/mer/bin/multi-eni-routing.py}" in initd
    unit = (root / "usr/lib/systemd/system/multi-eni-routing.service").read_text()
    assert "ExecStart=/opt/mer/bin/multi-eni-routing.py --watch --options-file" in unit
    assert "ExecStopPost=/opt/mer/bin/multi-eni-routing.py --flush" in unit
    launcher = (root / "opt/mer/bin/multi-eni-routing.py").read_text()
    assert 'sys.path[0] = "/opt/mer/lib/multi-eni-routing"' in launcher
    assert "/usr/lib/multi-eni-routing" not in launcher


def test_prefix_from_the_environment(tmp_path):
    root = tmp_path / "root"
    result = run_install(destdir=root, env={"PREFIX": "/usr/local"})
    assert result.returncode == 0, result.stderr
    assert (root / "usr/local/bin/multi-eni-routing.py").exists()
    assert "/usr/local/bin/multi-eni-routing.py" in (root / "etc/init.d/multi-eni-routing").read_text()


def test_destdir_option_equals_destdir_variable(tmp_path):
    root = tmp_path / "root"
    result = run_install("--destdir", str(root))
    assert result.returncode == 0, result.stderr
    assert files_under(root) == EXPECTED


def test_destdir_registers_nothing_and_says_so(tmp_path):
    result = run_install("--now", destdir=tmp_path / "root")
    assert result.returncode == 0, result.stderr
    assert "nothing registered or started" in result.stdout
    assert "--now is ignored" in result.stderr


def test_second_install_changes_nothing(installed):
    before = snapshot(installed)
    result = run_install(destdir=installed)
    assert result.returncode == 0, result.stderr
    assert snapshot(installed) == before
    assert "installed " not in result.stdout
    assert result.stdout.count("unchanged ") == len(EXPECTED)


def test_reinstall_repairs_a_changed_program_and_mode(installed):
    initd = installed / "etc/init.d/multi-eni-routing"
    initd.write_text("broken\n")
    page = installed / "usr/share/man/man8/multi-eni-routing.8.gz"
    page.chmod(0o600)
    result = run_install(destdir=installed)
    assert result.returncode == 0, result.stderr
    assert files_under(installed) == EXPECTED
    assert initd.read_text().startswith("#!/bin/sh")


def test_modified_options_file_survives_reinstall(installed):
    options = installed / "etc/default/multi-eni-routing"
    mine = 'MULTI_ENI_ROUTING_OPTS="-x docker0 -v"\n'
    options.write_text(mine)
    result = run_install(destdir=installed)
    assert result.returncode == 0, result.stderr
    assert options.read_text() == mine
    assert "kept /etc/default/multi-eni-routing" in result.stdout
    dist = installed / "etc/default/multi-eni-routing.dist"
    assert dist.read_text() == (REPO / "etc/multi-eni-routing.options").read_text()
    assert dist.stat().st_mode & 0o7777 == DATA
    # and a third run is as harmless as the second
    before = snapshot(installed)
    assert run_install(destdir=installed).returncode == 0
    assert snapshot(installed) == before


def test_options_file_goes_to_sysconfig_on_the_rhel_family(tmp_path):
    root = tmp_path / "root"
    (root / "etc/sysconfig").mkdir(parents=True)
    result = run_install(destdir=root)
    assert result.returncode == 0, result.stderr
    expected = dict(EXPECTED)
    del expected["etc/default/multi-eni-routing"]
    expected["etc/sysconfig/multi-eni-routing"] = DATA
    assert files_under(root) == expected
    # the unit and the init script read it there
    unit = (root / "usr/lib/systemd/system/multi-eni-routing.service").read_text()
    assert "--options-file /etc/sysconfig/multi-eni-routing" in unit
    assert "/etc/default/" not in unit
    initd = (root / "etc/init.d/multi-eni-routing").read_text()
    assert "OPTIONS=${MULTI_ENI_ROUTING_OPTIONS:-/etc/sysconfig/multi-eni-routing}" in initd


def test_install_removes_what_an_earlier_version_installed(tmp_path):
    """The udev rule, the hooks, the hotplug trigger and the refresh timer: the
    watcher does their work now."""
    root = tmp_path / "root"
    for rel in OBSOLETE:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("old\n")
    result = run_install(destdir=root)
    assert result.returncode == 0, result.stderr
    assert files_under(root) == EXPECTED
    for rel in OBSOLETE:
        assert "removed /%s" % rel in result.stdout


def test_uninstall_leaves_nothing_behind(installed):
    result = run_install("--uninstall", destdir=installed)
    assert result.returncode == 0, result.stderr
    assert list(installed.iterdir()) == []


def test_uninstall_twice_is_harmless(installed):
    assert run_install("--uninstall", destdir=installed).returncode == 0
    result = run_install("--uninstall", destdir=installed)
    assert result.returncode == 0, result.stderr
    assert list(installed.iterdir()) == []


def test_uninstall_keeps_a_modified_options_file(installed):
    options = installed / "etc/default/multi-eni-routing"
    options.write_text('MULTI_ENI_ROUTING_OPTS="-v"\n')
    assert run_install(destdir=installed).returncode == 0  # leaves a .dist
    result = run_install("--uninstall", destdir=installed)
    assert result.returncode == 0, result.stderr
    assert files_under(installed) == {"etc/default/multi-eni-routing": DATA}
    assert "kept /etc/default/multi-eni-routing" in result.stdout


def test_uninstall_with_the_same_prefix(tmp_path):
    root = tmp_path / "root"
    assert run_install("--prefix", "/opt/mer", destdir=root).returncode == 0
    assert run_install("--uninstall", "--prefix", "/opt/mer", destdir=root).returncode == 0
    assert list(root.iterdir()) == []


def test_uninstall_keeps_what_others_put_in_shared_directories(installed):
    other = installed / "etc/init.d/other-service"
    other.write_text("#!/bin/sh\n")
    assert run_install("--uninstall", destdir=installed).returncode == 0
    assert files_under(installed) == {"etc/init.d/other-service": 0o644}


def test_help(tmp_path):
    result = run_install("--help")
    assert result.returncode == 0
    for word in ("--prefix", "--destdir", "--deps", "--now", "--uninstall", "DESTDIR"):
        assert word in result.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["--prefix"], ["--prefix", "relative/dir"],
                                  ["--prefix", "/has space"], ["--force"],
                                  ["--uninstall", "--now"], ["--uninstall", "--deps"]])
def test_usage_errors_exit_2_and_install_nothing(tmp_path, args):
    root = tmp_path / "root"
    result = run_install(*args, destdir=root)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip()
    assert not root.exists() or list(root.iterdir()) == []


def test_deps_is_ignored_with_destdir(tmp_path):
    result = run_install("--deps", destdir=tmp_path / "root")
    assert result.returncode == 0, result.stderr
    assert "--deps is ignored with DESTDIR" in result.stderr
    assert files_under(tmp_path / "root") == EXPECTED


def test_missing_source_file_fails_clearly(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "tests", "multi_eni_routing.py"))
    result = subprocess.run(["sh", str(src / "install.sh")], capture_output=True, text=True,
                            env=dict(os.environ, DESTDIR=str(tmp_path / "root")), timeout=60)
    assert result.returncode == 1
    assert "multi_eni_routing.py is missing" in result.stderr
