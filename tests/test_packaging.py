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
