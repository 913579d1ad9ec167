"""setup.cfg and pyproject.toml: `pip install .` gives a `multi-eni-routing`
command running the tool's main(), which names itself so, and the man page. The build test uses a throwaway venv and
fetches setuptools from the package index like any `pip install .`; it is
skipped when the index cannot be reached."""

import configparser
import contextlib
import importlib.util
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def setup_cfg():
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO / "setup.cfg")
    return config


def load_tool():
    spec = importlib.util.spec_from_file_location("multi_eni_routing", REPO / "multi_eni_routing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metadata():
    config = setup_cfg()
    assert config["metadata"]["name"] == "multi-eni-routing"
    assert config["metadata"]["version"] == "attr: multi_eni_routing.VERSION"
    assert config["options"]["py_modules"].split() == ["multi_eni_routing"]
    assert config["options"]["python_requires"] == ">=3.8"
    assert "install_requires" not in config["options"]
    assert "setuptools.build_meta" in (REPO / "pyproject.toml").read_text()


def test_entry_point_names_a_function_of_the_tool():
    scripts = [line.strip() for line in setup_cfg()["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()]
    assert scripts == ["multi-eni-routing = multi_eni_routing:console_main"]
    tool = load_tool()
    assert callable(tool.console_main)
    assert isinstance(tool.VERSION, str) and tool.VERSION


def test_man_page_is_a_data_file():
    files = setup_cfg()["options.data_files"]
    assert files["share/man/man8"].split() == ["docs/multi-eni-routing.8"]


def test_pytest_settings_live_in_setup_cfg():
    assert setup_cfg()["tool:pytest"]["testpaths"].strip() == "tests"


def test_pip_install_gives_the_command(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "docs").mkdir()
    for name in ("setup.cfg", "pyproject.toml", "multi_eni_routing.py", "README.md", "docs/multi-eni-routing.8"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    result = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                             "--timeout", "20", str(src)], capture_output=True, text=True,
                            env=env, timeout=300)
    if result.returncode != 0 and any(word in result.stdout + result.stderr for word in (
            "NewConnectionError", "Could not find a version", "No matching distribution",
            "Temporary failure in name resolution", "Network is unreachable")):
        pytest.skip("the package index is not reachable: cannot fetch setuptools")
    assert result.returncode == 0, result.stdout + result.stderr
    command = env_dir / "bin" / "multi-eni-routing"
    assert command.exists()
    page = env_dir / "share" / "man" / "man8" / "multi-eni-routing.8"
    assert page.read_bytes() == (REPO / "docs" / "multi-eni-routing.8").read_bytes()
    with isolated() as prefix:
        version = subprocess.run([*prefix, str(command), "--version"], capture_output=True, text=True,
                                 timeout=60)
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == "multi-eni-routing %s" % load_tool().VERSION
        usage = subprocess.run([*prefix, str(command), "--bogus"], capture_output=True, text=True,
                               timeout=60)
        assert usage.returncode == 2
        assert usage.stderr.splitlines() == ["multi-eni-routing: error: unrecognized arguments: --bogus "
                                             "(see --help)"]
        helped = subprocess.run([*prefix, str(command), "--help"], capture_output=True, text=True, timeout=60)
        assert helped.stdout.startswith("usage: multi-eni-routing ")


@contextlib.contextmanager
def isolated():
    """As root, a scratch network namespace to run the command in (it only
    parses its arguments here, but it is never run in the host's own network
    namespace as root); the command prefix."""
    if os.geteuid() != 0:
        yield []
        return
    name = "mer-pkg-%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# -- The Debian package and the RPM (built by tests/packages.py). -------------

import re  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import packages  # noqa: E402

# Files that only a package has, as its format asks: its documentation and
# copyright (install.sh installs none), the lintian overrides, dh_python3's hook that recompiles the
# module when Debian's default Python changes, and the RPM's bytecode
# (compiled at build time as Fedora does; the .deb and install.sh compile at
# install time).
PACKAGE_ONLY = re.compile(r"^(/usr/share/doc/|/usr/share/lintian/overrides/|/usr/share/python3/runtime\.d/multi-eni-routing\.rtupdate$"
                          r"|/usr/lib/multi-eni-routing/__pycache__/)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{"deb": path, "rpm": path}, built once from the working tree."""
    absent = packages.missing(packages.DEB_TOOLS + packages.RPM_TOOLS)
    if absent:
        pytest.skip("cannot build the packages here: %s missing (sh tests/install-deps.sh)" % ", ".join(absent))
    out = tmp_path_factory.mktemp("packages")
    return {"deb": packages.build_deb(out), "rpm": packages.build_rpm(out)}


def install_sh_files(root, rhel=False):
    """{path: mode} of the files install.sh stages under ROOT."""
    if rhel:
        (root / "etc/sysconfig").mkdir(parents=True)
    result = subprocess.run(["sh", str(REPO / "install.sh"), "--destdir", str(root), "-q"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            found["/" + str(path.relative_to(root))] = path.stat().st_mode & 0o7777
    return found


def deb_files(deb):
    """{path: mode} of the regular files in DEB (owned by root:root)."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in listing.splitlines():
        perms, owner, _, _, _, path = line.split(None, 5)
        assert owner == "root/root", line
        if perms.startswith("-"):
            mode = sum(bit for bit, char in zip((0o400, 0o200, 0o100, 0o40, 0o20, 0o10, 4, 2, 1), perms[1:])
                       if char != "-")
            found[path[1:]] = mode
    return found


def rpm_files(rpm):
    """{path: (mode, config flags)} of the regular files in RPM."""
    dump = subprocess.run(["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEMODES:octal} %{FILEUSERNAME}:"
                           "%{FILEGROUPNAME} %{FILEFLAGS:fflags}\n]", str(rpm)],
                          capture_output=True, text=True, check=True).stdout
    found = {}
    for line in dump.splitlines():
        path, mode, owner, *flags = line.split()
        assert owner == "root:root", line
        mode = int(mode, 8)
        if stat.S_ISREG(mode):
            found[path] = (mode & 0o7777, flags[0] if flags else "")
    return found


def test_the_versions_agree():
    version = packages.tool_version()
    assert (REPO / "debian/changelog").read_text().startswith("multi-eni-routing (%s) " % version)
    assert re.search(r"^Version:\s*%s$" % re.escape(version), packages.SPEC.read_text(), re.M)


def test_lintian_finds_no_error_and_no_warning(built):
    ok, output = packages.lintian(built["deb"])
    assert ok, output


def test_rpmlint_finds_no_error(built):
    ok, output = packages.rpmlint(built["rpm"])
    assert ok, output


def test_install_sh_the_deb_and_the_rpm_install_the_same_files_with_the_same_modes(built, tmp_path):
    debian = install_sh_files(tmp_path / "debian")
    rhel = install_sh_files(tmp_path / "rhel", rhel=True)
    deb = {path: mode for path, mode in deb_files(built["deb"]).items() if not PACKAGE_ONLY.match(path)}
    rpm = {path: mode for path, (mode, _) in rpm_files(built["rpm"]).items() if not PACKAGE_ONLY.match(path)}
    assert deb == debian
    assert rpm == rhel
    # the same but for where the options file lives
    assert {p.replace("/etc/sysconfig/", "/etc/default/"): m for p, m in rhel.items()} == debian
    assert "/usr/lib/multi-eni-routing/multi_eni_routing.py" in debian
    assert debian["/usr/bin/multi-eni-routing.py"] == 0o755


def test_the_deb_compiles_at_install_restarts_on_upgrade_and_keeps_the_options_as_a_conffile(built, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(built["deb"]), str(tmp_path / "control")], check=True)
    control = tmp_path / "control"
    conffiles = (control / "conffiles").read_text().split()
    assert "/etc/default/multi-eni-routing" in conffiles
    postinst, prerm = (control / "postinst").read_text(), (control / "prerm").read_text()
    assert "py3compile -p multi-eni-routing /usr/lib/multi-eni-routing" in postinst
    assert "deb-systemd-helper enable 'multi-eni-routing.service'" in postinst
    # an upgrade ($2: the old version) restarts, which keeps the routing; a first install starts
    assert re.search(r'if \[ -n "\$2" \]; then\s+_dh_action=restart\s+else\s+_dh_action=start', postinst)
    assert "deb-systemd-invoke $_dh_action 'multi-eni-routing.service'" in postinst
    # only a removal stops it (and so removes the routing), not an upgrade
    assert re.search(r'\[ "\$1" = remove \] && \[ -d /run/systemd/system \] ; then\s+'
                     r"deb-systemd-invoke stop 'multi-eni-routing.service'", prerm)
    assert "rm -rf /run/multi-eni-routing /run/multi-eni-routing.pid" in (control / "postrm").read_text()
    fields = subprocess.run(["dpkg-deb", "-f", str(built["deb"]), "Architecture", "Depends"],
                            capture_output=True, text=True, check=True).stdout
    assert "Architecture: all" in fields
    for dependency in ("python3 (>= 3.8)", "iproute2", "iptables"):
        assert dependency in fields


def test_the_rpm_files_and_scriptlets(built):
    files = rpm_files(built["rpm"])
    assert files["/etc/sysconfig/multi-eni-routing"][1] == "cn"  # %config(noreplace)
    assert files["/usr/lib/systemd/system/multi-eni-routing.service"][0] == 0o644
    assert any(path.startswith("/usr/share/doc/multi-eni-routing") for path in files)
    assert any(re.match(r"/usr/lib/multi-eni-routing/__pycache__/multi_eni_routing\.cpython-\d+\.pyc$", path)
               for path in files)
    unit = subprocess.run(["rpm2cpio", str(built["rpm"])], capture_output=True, check=True).stdout
    assert b"--options-file /etc/sysconfig/multi-eni-routing" in unit
    info = subprocess.run(["rpm", "-qp", "--qf", "%{ARCH}\n", "--scripts", str(built["rpm"])],
                          capture_output=True, text=True, check=True).stdout
    assert info.startswith("noarch\n")
    post = info.split("postinstall scriptlet")[1].split("preuninstall scriptlet")[0]
    preun = info.split("preuninstall scriptlet")[1].split("postuninstall scriptlet")[0]
    postun = info.split("postuninstall scriptlet")[1]
    helper = "/usr/lib/systemd/systemd-update-helper"
    assert "$1 -eq 1" in post and helper + " install-system-units multi-eni-routing.service" in post
    assert "$1 -eq 0" in preun and helper + " remove-system-units multi-eni-routing.service" in preun
    # an upgrade marks the unit: restarted (or reloaded) at the end of the transaction
    assert "$1 -ge 1" in postun and helper + " mark-restart-system-units multi-eni-routing.service" in postun
    requires = subprocess.run(["rpm", "-qp", "--requires", str(built["rpm"])], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    for dependency in ("python3 >= 3.8", "iproute", "(iptables-nft or iptables)"):
        assert dependency in requires
