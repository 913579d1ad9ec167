"""The README's commands on fresh Debian 12 and 13 roots (debootstrap minbase
with python3, git and ca-certificates, what a cloud image has), as root, from a
fresh clone, as written: the demo command, which must not need pytest, and
install.sh, which names the packages it lacks or installs them with --deps and
uninstalls to the file list it started from. The README's test command runs in
such a root in CI (.ci/run), not here: it would run this very suite."""

import subprocess

import pytest

import fresh_root

pytestmark = pytest.mark.root

SUITES = ["bookworm", "trixie"]
SRC = "/root/multi-eni-routing"
# Paths that change by themselves or belong to the test (the clone).
VOLATILE = ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache", SRC]


@pytest.fixture
def fresh(request):
    ok, why = fresh_root.usable()
    if not ok:
        pytest.skip(why)
    with fresh_root.extracted(request.param) as root:
        fresh_root.clone_into(root, SRC.lstrip("/"))
        yield root


@pytest.fixture
def scratch_netns():
    """A network namespace for whatever may run the tool (never the machine's)."""
    name = "mer-fresh-%s" % id(object())
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_root(root, command, **options):
    return fresh_root.chroot(root, "cd %s && %s" % (SRC, command), timeout=900, **options)


@pytest.mark.parametrize("fresh", SUITES, indirect=True)
def test_demo_command_as_written(fresh):
    command = fresh_root.readme_commands()["demo"]
    assert "pytest" not in command
    before = in_root(fresh, "command -v ip sysctl iptables-restore; python3 -c 'import pytest'")
    assert before.returncode != 0  # a fresh root has none of it
    result = in_root(fresh, command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with the tool every address and the published service answer: yes" in result.stdout
    assert in_root(fresh, "python3 -c 'import pytest'").returncode != 0  # no pytest needed


@pytest.mark.parametrize("fresh", SUITES, indirect=True)
def test_install_names_or_installs_the_packages_and_uninstalls_to_the_start(fresh, scratch_netns):
    lacking = in_root(fresh, "sh install.sh", netns=scratch_netns)
    assert lacking.returncode == 1
    assert "apt-get install iproute2 iptables" in lacking.stderr and "--deps" in lacking.stderr
    assert in_root(fresh, "test -e /usr/bin/multi-eni-routing.py").returncode != 0  # nothing installed
    # --deps needs the package archive: the machine's network, where nothing runs the tool
    deps = in_root(fresh, "sh install.sh --deps")
    assert deps.returncode == 0, deps.stdout + deps.stderr
    assert in_root(fresh, "command -v ip && command -v iptables-restore").returncode == 0
    assert in_root(fresh, "sh install.sh --uninstall", netns=scratch_netns).returncode == 0
    files_before = file_list(fresh)
    installed = in_root(fresh, "sh install.sh", netns=scratch_netns)
    assert installed.returncode == 0, installed.stderr
    assert "/etc/init.d/multi-eni-routing start" in installed.stdout
    assert file_list(fresh) - files_before >= {"/usr/bin/multi-eni-routing.py", "/etc/init.d/multi-eni-routing"}
    uninstalled = in_root(fresh, "sh install.sh --uninstall", netns=scratch_netns)
    assert uninstalled.returncode == 0, uninstalled.stderr
    assert file_list(fresh) == files_before


def file_list(root):
    prune = " -o ".join("-path %s" % path for path in VOLATILE)
    result = fresh_root.chroot(root, "find / -xdev \\( %s \\) -prune -o -print" % prune)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.splitlines())
