"""Static checks of the shell and init files: shellcheck on every shell file,
POSIX syntax of the /bin/sh ones, `systemd-analyze verify` on the unit,
systemd's SysV generator on the init script, and `udevadm verify` (where
this udevadm has it) plus a syntax check of the udev rule. Each check is
skipped, with the reason, when its program is missing."""

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
RULES = REPO / "udev" / "90-multi-eni-routing.rules"
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
    assert {"install.sh", "init.d/multi-eni-routing", "libexec/multi-eni-routing-hotplug",
            "hooks/networkmanager-dispatcher", "hooks/ifupdown", "hooks/networkd-dispatcher",
            "etc/multi-eni-routing.options"} <= names


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
    for rel in ["install.sh", "init.d/multi-eni-routing", "libexec/multi-eni-routing-hotplug",
                "hooks/networkmanager-dispatcher", "hooks/ifupdown", "hooks/networkd-dispatcher"]:
        assert os.access(REPO / rel, os.X_OK), rel


# -- systemd -------------------------------------------------------------------------

def unit_with_tool(tmp_path):
    """A copy of the unit whose ExecStart= names an existing program (verify
    checks that it exists)."""
    text = UNIT.read_text()
    for program in ("/usr/bin/multi-eni-routing.py", "/usr/libexec/multi-eni-routing-hotplug"):
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


def test_unit_settings():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    # repeated keys (Before=, EnvironmentFile=) are read as the last one by
    # configparser: read them by hand
    text = UNIT.read_text()
    unit.read_string(re.sub(r"^(Before|EnvironmentFile)=.*$", "", text, flags=re.M))
    service = unit["Service"]
    assert service["Type"] == "oneshot"
    assert service["RemainAfterExit"] == "yes"
    assert service["ExecStart"] == "/usr/bin/multi-eni-routing.py $MULTI_ENI_ROUTING_OPTS"
    assert service["ExecReload"] == "/usr/bin/multi-eni-routing.py $MULTI_ENI_ROUTING_OPTS"
    assert service["ExecStop"] == "/usr/bin/multi-eni-routing.py --flush $MULTI_ENI_ROUTING_OPTS"
    assert service["ExecStartPost"] == "-/usr/libexec/multi-eni-routing-hotplug --started"
    assert service["ExecStopPost"] == "-/usr/libexec/multi-eni-routing-hotplug --stopped"
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Unit"]["Wants"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    env_files = re.findall(r"^EnvironmentFile=(.*)$", text, re.M)
    assert env_files == ["-/etc/default/multi-eni-routing", "-/etc/sysconfig/multi-eni-routing"]
    before = " ".join(re.findall(r"^Before=(.*)$", text, re.M)).split()
    assert {"multi-user.target", "sshd.service", "ssh.service", "docker.service"} <= set(before)


def test_options_file_is_valid_for_systemd_and_sh(tmp_path):
    """Plain VAR="value" lines: what systemd's EnvironmentFile= and sh agree on."""
    lines = [line for line in (REPO / "etc/multi-eni-routing.options").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines
    for line in lines:
        assert re.fullmatch(r'[A-Z_]+="[^"$`\\]*"', line), line


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
    assert "After=network-online.target" in generated
    assert "Wants=network-online.target" in generated
    for unit in ("sshd.service", "ssh.service", "docker.service"):
        assert "Before=%s" % unit in generated
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


# -- udev ------------------------------------------------------------------------------

def udevadm_verify_supported():
    if not shutil.which("udevadm"):
        return False, "udevadm is not installed (apt-get install udev)"
    probe = subprocess.run(["udevadm", "verify", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, "this udevadm has no 'verify' (it came with systemd 253)"
    return True, ""


def test_udevadm_verify():
    supported, reason = udevadm_verify_supported()
    if not supported:
        pytest.skip(reason)
    result = subprocess.run(["udevadm", "verify", "--resolve-names=never", str(RULES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


UDEV_KEY = re.compile(r'\s*([A-Z]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(?:,|$)')
MATCH_KEYS = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "NAME", "SUBSYSTEM", "SUBSYSTEMS",
              "DRIVER", "DRIVERS", "ATTR", "ATTRS", "ENV", "TAG", "TAGS", "TEST", "PROGRAM", "RESULT"}
ASSIGN_KEYS = {"NAME", "ENV", "RUN", "GOTO", "LABEL", "TAG", "IMPORT", "OPTIONS", "ATTR"}


def test_udev_rule_syntax():
    """What `udevadm verify` would say about key names, operators, quoting and
    labels, for udevadm versions without it."""
    labels, gotos = set(), set()
    for number, line in enumerate(RULES.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rest, pairs = line, []
        while rest.strip():
            match = UDEV_KEY.match(rest)
            assert match, "line %d: cannot parse %r" % (number, rest)
            pairs.append(match.groups())
            rest = rest[match.end():]
        for key, attr, op, value in pairs:
            if op in ("==", "!="):
                assert key in MATCH_KEYS, "line %d: %s is no match key" % (number, key)
            else:
                assert key in ASSIGN_KEYS, "line %d: %s cannot be assigned" % (number, key)
            if key in ("ENV", "ATTR", "ATTRS"):
                assert attr, "line %d: %s needs {name}" % (number, key)
            if key == "LABEL":
                labels.add(value)
            if key == "GOTO":
                gotos.add(value)
            if key == "RUN":
                assert value.startswith("/"), "line %d: RUN needs an absolute path" % number
        assert any(op in ("==", "!=") for _, _, op, _ in pairs) or pairs[0][0] == "LABEL", \
            "line %d: a rule without a match applies to every event" % number
    assert gotos <= labels


def test_systemd_analyze_verify_the_refresh_timer(tmp_path):
    """The timer that re-applies now and then (addresses assigned in EC2 at run
    time raise no link event) goes through the hotplug trigger."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    trigger = tmp_path / "multi-eni-routing-hotplug"
    trigger.write_text("#!/bin/sh\nexit 0\n")
    trigger.chmod(0o755)
    units = []
    for name in ("multi-eni-routing-refresh.service", "multi-eni-routing-refresh.timer"):
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/libexec/multi-eni-routing-hotplug", str(trigger)))
        units.append(str(tmp_path / name))
    assert "ExecStart=/usr/libexec/multi-eni-routing-hotplug timer" in (
        REPO / "systemd" / "multi-eni-routing-refresh.service").read_text()
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "multi-eni-routing" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr
