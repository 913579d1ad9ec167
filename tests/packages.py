#!/usr/bin/env python3
"""Builds the Debian package and the RPM from this checkout (the working tree
as it is, uncommitted changes too), and lints them.

    python3 tests/packages.py build OUTDIR   (what .ci/run uses)

builds both into OUTDIR, runs lintian and rpmlint, and exits non-zero when a
build fails or a linter finds an error (lintian: a warning too). The tests
(test_packages.py, test_package_boot.py) use the functions, with a VERSION
to build an older and a newer package of the same tree for upgrades.

The RPM is built with Debian's rpmbuild, which lacks the macros of
systemd-rpm-macros and python3-rpm-macros: rpm/macros.systemd defines them
(--load), and --nodeps skips the BuildRequires that no RPM database here has.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = "multi-eni-routing"
DEB_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "fakeroot", "lintian")
RPM_TOOLS = ("rpmbuild", "rpmlint", "rpm")
SPEC = REPO / "rpm" / (NAME + ".spec")
RPM_MACROS = REPO / "rpm" / "macros.systemd"
RPMLINTRC = REPO / "rpm" / (NAME + ".rpmlintrc")


def missing(tools):
    """The programs of TOOLS not installed here."""
    return [tool for tool in tools if not shutil.which(tool)]


def tool_version():
    """The tool's VERSION, read from its source."""
    text = (REPO / "multi_eni_routing.py").read_text()
    return re.search(r'^VERSION = "([^"]+)"', text, re.M).group(1)


def tree_files():
    """The files of the working tree (tracked and untracked, not ignored)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [name for name in listed if name and (REPO / name).is_file()]


def copy_tree(target):
    """The working tree copied to TARGET (created)."""
    for name in tree_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)
    return target


def run(argv, cwd=None, timeout=600):
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, LC_ALL="C.UTF-8"))
    if result.returncode != 0:
        raise RuntimeError("%s exited %d:\n%s%s" % (" ".join(argv), result.returncode,
                                                   result.stdout[-3000:], result.stderr[-3000:]))
    return result.stdout + result.stderr


def build_deb(out_dir, version=None):
    """Build the .deb (its changelog's version, or VERSION) into OUT_DIR; its path."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="mer-deb-") as work:
        src = copy_tree(Path(work) / "src")
        if version:
            changelog = src / "debian" / "changelog"
            text = changelog.read_text()
            changelog.write_text(re.sub(r"^%s \([^)]*\)" % NAME, "%s (%s)" % (NAME, version), text, count=1))
        run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
        debs = list(Path(work).glob("%s_*_all.deb" % NAME))
        assert len(debs) == 1, debs
        target = out_dir / debs[0].name
        shutil.move(str(debs[0]), str(target))
    return target


def build_rpm(out_dir, version=None):
    """Build the .rpm (the spec's version, or VERSION) into OUT_DIR; its path."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="mer-rpm-") as work:
        top = Path(work)
        spec = SPEC.read_text()
        if version:
            spec = re.sub(r"^(Version:\s*).*$", r"\g<1>" + version, spec, count=1, flags=re.M)
        version = re.search(r"^Version:\s*(\S+)", spec, re.M).group(1)
        for sub in ("SOURCES", "SPECS", "BUILD", "RPMS", "SRPMS"):
            (top / sub).mkdir()
        (top / "SPECS" / SPEC.name).write_text(spec)
        stage = top / "stage"
        copy_tree(stage / ("%s-%s" % (NAME, version)))
        run(["tar", "-C", str(stage), "--owner=0", "--group=0", "-czf",
             str(top / "SOURCES" / ("%s-%s.tar.gz" % (NAME, version))), "%s-%s" % (NAME, version)])
        run(["rpmbuild", "--define", "_topdir %s" % top, "--load", str(RPM_MACROS), "--nodeps",
             "-bb", str(top / "SPECS" / SPEC.name)])
        rpms = list((top / "RPMS" / "noarch").glob("%s-*.noarch.rpm" % NAME))
        assert len(rpms) == 1, rpms
        target = out_dir / rpms[0].name
        shutil.move(str(rpms[0]), str(target))
    return target


def lintian(deb):
    """(ok, output): ok when lintian reports no error and no warning."""
    result = subprocess.run(["lintian", "--pedantic", "--info", str(deb)], capture_output=True, text=True,
                            timeout=600)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    return result.returncode == 0 and not tags, result.stdout + result.stderr


def rpmlint(rpm):
    """(ok, output): ok when rpmlint (with the project's rpmlintrc) reports no
    error for the spec and the package."""
    result = subprocess.run(["rpmlint", "-r", str(RPMLINTRC), str(SPEC), str(rpm)], capture_output=True,
                            text=True, timeout=600)
    return result.returncode == 0 and " 0 errors" in result.stdout, result.stdout + result.stderr


def main(argv):
    if len(argv) != 2 or argv[0] != "build":
        sys.stderr.write("usage: packages.py build OUTDIR\n")
        return 2
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    absent = missing(DEB_TOOLS + RPM_TOOLS)
    if absent:
        sys.stderr.write("packages.py: missing %s (sh tests/install-deps.sh)\n" % ", ".join(absent))
        return 1
    failed = False
    deb = build_deb(out_dir)
    ok, output = lintian(deb)
    print("%s: lintian %s\n%s" % (deb, "clean" if ok else "FAILED", output.strip()), flush=True)
    failed |= not ok
    rpm = build_rpm(out_dir)
    ok, output = rpmlint(rpm)
    print("%s: rpmlint %s\n%s" % (rpm, "clean" if ok else "FAILED", output.strip()), flush=True)
    failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
