"""Static checks of the shell, init and documentation files: shellcheck on
every shell file, POSIX syntax of the /bin/sh ones, `systemd-analyze verify`
on the unit, systemd's SysV generator on the init script, the options file
as the tool reads it, and the man page through groff's warnings. Each check
is skipped, with the reason, when its program is missing."""

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "multi-eni-routing.service"
INITD = REPO / "init.d" / "multi-eni-routing"
MAN_PAGE = REPO / "docs" / "multi-eni-routing.8"
OPTIONS = REPO / "etc" / "multi-eni-routing.options"
NETWORKD_CONF = REPO / "systemd" / "networkd.conf.d" / "multi-eni-routing.conf"
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist", ".venv", "node_modules"}


def repo_files():
    """The files of the source tree (tracked and new ones, without ignored ones)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        return sorted({REPO / name for name in out.decode().split("\0") if name})
    found = []
    for dirpath, dirnames, names in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found += [Path(dirpath) / name for name in names]
    return sorted(found)


def shell_of(path):
    """'sh' or 'bash' for a shell file (by #! line, .sh suffix or a shellcheck
    shell= directive), else None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(256).decode("utf-8", "replace")
    except (OSError, IsADirectoryError):
        return None
    first = head.splitlines()[0] if head else ""
    match = re.match(r"#!\s*\S*?(?:/env\s+)?\b(sh|bash|dash)\b", first)
    if match:
        return "bash" if match.group(1) == "bash" else "sh"
    match = re.search(r"^# shellcheck shell=(sh|bash|dash)\b", head, re.M)
    if match:
        return "bash" if match.group(1) == "bash" else "sh"
    if path.suffix == ".sh":
        return "sh"
    return None


SHELL_FILES = [p for p in repo_files() if p.is_file() and shell_of(p)]


def test_the_shipped_shell_files_are_found():
    names = {str(p.relative_to(REPO)) for p in SHELL_FILES}
    assert {"install.sh", "init.d/multi-eni-routing", "tests/install-deps.sh",
            "demo/install-deps.sh"} <= names


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(path):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "--format=gcc", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [p for p in SHELL_FILES if shell_of(p) == "sh"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_posix_sh_syntax(path):
    shell = shutil.which("dash") or shutil.which("sh")
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_programs_are_executable_in_the_tree():
    for rel in ["install.sh", "init.d/multi-eni-routing"]:
        assert os.access(REPO / rel, os.X_OK), rel


# -- systemd -------------------------------------------------------------------------

def unit_with_tool(tmp_path):
    """A copy of the unit whose ExecStart= names an existing program (verify
    checks that it exists)."""
    text = UNIT.read_text()
    for program in ("/usr/bin/multi-eni-routing.py",):
        stand_in = tmp_path / os.path.basename(program)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
        text = text.replace(program, str(stand_in))
    unit = tmp_path / "multi-eni-routing.service"
    unit.write_text(text)
    return unit


def test_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = unit_with_tool(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "multi-eni-routing" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def unit_settings():
    """{section: {key: [values]}} of the unit (keys may repeat)."""
    sections, section = {}, None
    for line in UNIT.read_text().splitlines():
        if re.match(r"\[\w+\]$", line):
            section = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            section.setdefault(key, []).append(value)
    return sections


def test_unit_runs_the_watcher_and_flushes_after_it_ended():
    unit = unit_settings()
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [
        "/usr/bin/multi-eni-routing.py --watch --options-file /etc/default/multi-eni-routing"]
    # after the watcher exited (ExecStop would race it), and never failing on the options
    assert "ExecStop" not in service
    # ... except while systemd restarts it: the next watcher takes the routing over
    assert service["ExecStopPost"] == [
        "/usr/bin/multi-eni-routing.py --flush -q --unless-restarting multi-eni-routing.service "
        "--options-file /etc/default/multi-eni-routing"]
    # a reload restarts the watcher in place (SIGHUP), which reads the options again
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "EnvironmentFile" not in service
    assert service["Restart"] == ["on-failure"]
    assert set(service["RestartPreventExitStatus"][0].split()) == {"2", "4", "5"}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_is_ready_before_network_online_and_holds_back_only_what_follows_it():
    """Services after network-online find the routing (the unit is ordered
    before it, after the stacks' wait-online services); sshd and the rest of
    multi-user.target do not wait for it; container runtimes and kubelet
    start after it."""
    unit = unit_settings()["Unit"]
    waits = " ".join(unit.get("After", []) + unit.get("Wants", []) + unit.get("Requires", []))
    assert "network-online" not in waits
    after = set(" ".join(unit["After"]).split())
    assert {"network.target", "systemd-networkd-wait-online.service", "NetworkManager-wait-online.service",
            "ifupdown-wait-online.service"} <= after
    before = " ".join(unit["Before"]).split()
    assert {"network-online.target", "docker.service", "containerd.service", "kubelet.service"} <= set(before)
    assert not {"multi-user.target", "ssh.service", "sshd.service"} & set(before)
    assert int(unit_settings()["Service"]["TimeoutStartSec"][0]) <= 30  # the backstop of that wait


SECURITY_MAX = 2.0  # systemd-analyze's "OK" ends at 4.9; networkd.service itself scores 2.8


def test_systemd_analyze_security_rates_the_unit_ok():
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= SECURITY_MAX, result.stdout


def test_unit_sandbox_keeps_what_the_tool_needs():
    """Capabilities, socket families and writable paths: what ip, iptables
    (legacy too) and IMDS need, and no more (the boot tests run under it)."""
    service = unit_settings()["Service"]
    assert set(service["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_NETLINK", "AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["ProtectSystem"] == ["strict"]
    assert set(service["ReadWritePaths"][0].split()) == {"/run", "/proc/sys/net"}
    assert set(service["IPAddressAllow"][0].split()) == {"169.254.169.254", "fd00:ec2::254"}


def test_shipped_options_file_gives_no_options():
    from recorded import mer
    assert mer.read_options_file(str(OPTIONS)) == []
    text = OPTIONS.read_text()
    assert all(line.startswith("#") for line in text.splitlines() if line.strip())


def sysv_generator():
    for path in ("/usr/lib/systemd/system-generators/systemd-sysv-generator",
                 "/lib/systemd/system-generators/systemd-sysv-generator"):
        if os.access(path, os.X_OK):
            return path
    pytest.skip("systemd-sysv-generator is not installed (it comes with systemd)")


def run_sysv_generator(tmp_path, native_unit=False):
    """Run systemd's SysV generator on our init script, linked into rc2-5.d,
    in scratch directories; the directory it wrote to."""
    initd, units, out = tmp_path / "init.d", tmp_path / "units", tmp_path / "out"
    for d in (initd, units, out):
        d.mkdir()
    shutil.copy(INITD, initd / "multi-eni-routing")
    for level in "2345":
        rc = tmp_path / ("rc%s.d" % level)
        rc.mkdir()
        (rc / "S01multi-eni-routing").symlink_to("../init.d/multi-eni-routing")
    if native_unit:
        shutil.copy(UNIT, units / "multi-eni-routing.service")
    env = dict(os.environ, SYSTEMD_UNIT_PATH=str(units), SYSTEMD_SYSVINIT_PATH=str(initd),
               SYSTEMD_SYSVRCND_PATH=str(tmp_path), SYSTEMD_LOG_LEVEL="warning")
    result = subprocess.run([sysv_generator(), str(out), str(out), str(out)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


def test_sysv_generator_orders_the_init_script_like_the_unit(tmp_path):
    out = run_sysv_generator(tmp_path)
    generated = (out / "multi-eni-routing.service").read_text()
    # ($network gives After=network-online.target here; on a systemd host the
    # native unit is used instead, see the next test)
    for unit in ("docker.service", "kubelet.service"):
        assert "Before=%s" % unit in generated
    assert "Before=ssh.service" not in generated
    assert "ExecStart=%s start" % (tmp_path / "init.d/multi-eni-routing") in generated
    assert "ExecStop=%s stop" % (tmp_path / "init.d/multi-eni-routing") in generated
    assert "ExecReload=%s reload" % (tmp_path / "init.d/multi-eni-routing") in generated
    assert (out / "multi-user.target.wants" / "multi-eni-routing.service").exists()


def test_sysv_generator_leaves_it_to_the_native_unit(tmp_path):
    out = run_sysv_generator(tmp_path, native_unit=True)
    assert not (out / "multi-eni-routing.service").exists()


# -- systemd-networkd drop-in ------------------------------------------------------------

def test_networkd_drop_in():
    conf = configparser.ConfigParser(interpolation=None)
    conf.optionxform = str
    conf.read_string(NETWORKD_CONF.read_text())
    assert dict(conf["Network"]) == {"ManageForeignRoutingPolicyRules": "no", "ManageForeignRoutes": "no"}


# -- the man page ------------------------------------------------------------------------

def test_man_page_renders_without_warnings():
    if not shutil.which("groff"):
        pytest.skip("groff is not installed (apt-get install groff-base)")
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN_PAGE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_man_page_has_the_sections_and_every_option():
    text = MAN_PAGE.read_text()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES",
                    "OWNED OBJECTS", "EXAMPLES", "SEE ALSO"):
        assert re.search(r"^\.SH \"?%s\"?$" % section, text, re.M), section
    from recorded import mer
    plain = text.replace("\\-", "-")
    for action in mer.build_parser()._actions:
        for option in action.option_strings:
            assert option in plain, option
