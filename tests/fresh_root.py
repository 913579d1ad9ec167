#!/usr/bin/env python3
"""Fresh Debian roots, as a newcomer's machine or a cloud image has them.

A root is built once with debootstrap (minbase plus a few packages) and kept as
a tarball in CACHE (outside the source tree); every use extracts a fresh copy
and deletes it afterwards. Two ways to use one:

- chroot(): run a shell command in it as root, inside a private mount namespace
  (`unshare --mount`) whose root it becomes (pivot_root), so that its /proc,
  /sys, /dev and /run mounts vanish with the command, also when it is killed. /run is a tmpfs of its own (`ip netns`
  works inside and never touches the host's /run); a policy-rc.d keeps package
  installs from starting services; the machine's CA bundle and PIP_* settings
  are copied in, as a cloud image has its own.
- extracted(): only the directory, e.g. for systemd-nspawn to boot.

As a program (what .ci/run uses):
    python3 tests/fresh_root.py readme-tests [SUITE]
runs the README's test command, as written, in a fresh SUITE root (default
bookworm) from a fresh `git clone` of this checkout; exit code: the command's.
    python3 tests/fresh_root.py install-deb SUITE DEB
installs DEB with apt in a fresh SUITE root (its dependencies downloaded
first; the install itself, whose maintainer scripts run, and the purge in a
scratch network namespace, with nothing started: policy-rc.d), checks the
command and its bytecode, purges it and checks that no file of it is left.

The tests find out themselves where they run (whereabouts(): a chroot, a
container, a virtual machine or bare metal; no variable needs to be set):
in a chroot or a container, those that would nest (booting with nspawn,
building another root) skip, saying where they are.
"""

import contextlib
import fcntl
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MER_ROOT_CACHE", "/var/cache/multi-eni-routing-ci"))
WORK = Path(os.environ.get("MER_ROOT_WORK", "/var/tmp"))

# What a cloud image has (minbase, python3, git, CA certificates); "systemd"
# adds what booting it needs and what the installed tool runs.
# The other flavours are the network stacks of the distribution families, as
# their cloud images install them (the boot tests run one per stack): netplan
# (Ubuntu) renders to networkd; NetworkManager (RHEL) needs libpam-systemd, or
# debootstrap stops on polkitd's logind dependency; ifupdown with ISC dhclient
# (Debian 12 cloud images).
BOOTABLE = ["python3", "git", "ca-certificates", "systemd", "systemd-sysv", "udev", "dbus",
            "iproute2", "iptables", "procps"]
FLAVOURS = {
    "minbase": ["python3", "git", "ca-certificates"],
    "systemd": BOOTABLE,
    "netplan": BOOTABLE + ["netplan.io"],
    "networkmanager": BOOTABLE + ["network-manager", "libpam-systemd"],
    "ifupdown": BOOTABLE + ["ifupdown", "isc-dhcp-client"],
}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 1200
# amazon-ec2-net-utils (tests/test_netutils.py): Debian's package of it, or only
# what Amazon's source (installed into the root at test time) needs besides.
FLAVOURS["netutils-debian"] = FLAVOURS["systemd"] + ["amazon-ec2-net-utils", "curl"]
FLAVOURS["netutils-source"] = FLAVOURS["systemd"] + ["curl"]


def in_chroot():
    """True when / is not the root directory of PID 1 or of an ancestor of
    this process (systemd-detect-virt --chroot asks PID 1 only, whose root
    may be unreadable, as on these machines: the ancestor outside the chroot,
    such as the shell that ran chroot, tells then)."""
    if not os.path.exists("/proc/self"):
        return True  # a machine always has /proc; a bare chroot lacks it
    here = os.stat("/")
    pid = os.getpid()
    for _ in range(64):
        pid = parent_of(pid)
        if pid is None:
            break
        with contextlib.suppress(OSError):
            if not os.path.samestat(here, os.stat("/proc/%d/root" % pid)):
                return True
    with contextlib.suppress(OSError):
        return not os.path.samestat(here, os.stat("/proc/1/root"))
    return False


def parent_of(pid):
    """The parent's pid, or None at the top (or if PID is gone)."""
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    parent = int(stat[stat.rindex(")") + 2:].split()[1])
    return parent if parent > 0 else None


def container_kind():
    """The container this runs in ('docker', 'systemd-nspawn', ...), or ''."""
    with contextlib.suppress(OSError):
        kind = Path("/run/systemd/container").read_text().strip()
        if kind:
            return kind
    with contextlib.suppress(OSError):
        for entry in Path("/proc/1/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"container="):
                return entry.split(b"=", 1)[1].decode(errors="replace") or "container"
    if os.path.exists("/run/.containerenv"):
        return "podman"
    # (not /.dockerenv: these VMs' images, made from Docker images, still have it)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            for kind in ("docker", "lxc", "kubepods", "containerd"):
                if "/%s" % kind in line.split(":", 2)[-1]:
                    return kind
    return ""


def virtual_machine():
    """The hypervisor's vendor when this is a virtual machine, else ''."""
    with contextlib.suppress(OSError):
        if " hypervisor" in Path("/proc/cpuinfo").read_text():
            with contextlib.suppress(OSError):
                return Path("/sys/class/dmi/id/sys_vendor").read_text().strip() or "unknown"
            return "unknown"
    return ""


def whereabouts():
    """Where the tests run, in words: 'a chroot', 'a container (docker)', 'a
    virtual machine (QEMU)' or 'a machine'."""
    if in_chroot():
        return "a chroot"
    kind = container_kind()
    if kind:
        return "a container (%s)" % kind
    vendor = virtual_machine()
    return "a virtual machine (%s)" % vendor if vendor else "a machine"


def nested_reason():
    """Why a test that needs another root or a boot cannot run here, or ''."""
    where = whereabouts()
    if where.startswith(("a chroot", "a container")):
        return "running in %s: no nested roots or boots" % where
    return ""


def usable():
    """(True, '') if roots can be built and used here, else (False, why)."""
    reason = nested_reason()
    if reason:
        return False, reason
    if os.geteuid() != 0:
        return False, "needs root (debootstrap, chroot, mounts)"
    for program in ("debootstrap", "unshare", "tar"):
        if not shutil.which(program):
            return False, "%s is not installed (sh tests/install-deps.sh)" % program
    return True, ""


def mirror():
    """The first `URIs:` of the machine's apt sources (deb822), else Debian's."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with contextlib.suppress(OSError):
            match = re.search(r"^URIs:\s*(\S+)", Path(path).read_text(), re.M)
            if match:
                return match.group(1)
    return DEFAULT_MIRROR


def tarball(suite, flavour="minbase"):
    """The cached root of SUITE and FLAVOUR, built first when missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / ("%s.tar.gz" % suite if flavour == "minbase" else "%s-%s.tar.gz" % (suite, flavour))
    with open(CACHE / (".lock-" + target.name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait for it
        if not target.exists():
            build(suite, flavour, target)
    return target


def build(suite, flavour, target):
    build_dir = Path(tempfile.mkdtemp(prefix="mer-debootstrap-", dir=str(WORK)))
    partial = target.with_name(target.name + ".partial")
    try:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(FLAVOURS[flavour]),
                        suite, str(build_dir / "root"), mirror()],
                       check=True, capture_output=True, timeout=BUILD_TIMEOUT)
        subprocess.run(["tar", "-C", str(build_dir / "root"), "--numeric-owner", "-czf", str(partial), "."],
                       check=True, capture_output=True, timeout=600)
        partial.rename(target)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError("building the %s root failed: %s" % (suite, (exc.stderr or b"")[-2000:].decode()))
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
        shutil.rmtree(build_dir, ignore_errors=True)


@contextlib.contextmanager
def extracted(suite, flavour="minbase"):
    """A fresh copy of the cached root, deleted afterwards; its path."""
    source = tarball(suite, flavour)
    work = Path(tempfile.mkdtemp(prefix="mer-root-%s-" % suite, dir=str(WORK)))
    root = work / "root"
    try:
        root.mkdir()
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xzf", str(source)],
                       check=True, capture_output=True, timeout=600)
        prepare(root)
        yield root
    finally:
        remove_tree(work)


def prepare(root):
    """What a cloud image has that debootstrap leaves out: DNS, the CA bundle
    (the machine's: it may need its own CA), and no service starts on install."""
    with contextlib.suppress(OSError):
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle, root / "etc/ssl/certs/ca-certificates.crt")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)


def remove_tree(path):
    """rm -rf that refuses to descend into a mount left behind (never the host's)."""
    mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
               if line.split()[1].startswith(str(path) + "/")]
    for point in sorted(mounted, reverse=True):
        subprocess.run(["umount", "-n", "-l", point], capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)


# The mounts of a chroot, made in a private mount namespace: gone with it.
CHROOT_SCRIPT = r"""
set -e
root=$1; shift
# -n everywhere: mount(8) would otherwise make /run/mount (its utab) in the host's /run
mount -n --make-rprivate /
mount -n --bind "$root" "$root"
mount -n -t proc proc "$root/proc"
mount -n -t sysfs sysfs "$root/sys"
# the machine's cgroups, as a booted machine has them mounted (dockerd needs them)
mount -n --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
mount -n --rbind /dev "$root/dev"
mount -n -t tmpfs -o mode=0755 tmpfs "$root/run"
mkdir -p "$root/run/netns" "$root/run/lock"
mount -n -t tmpfs -o mode=1777 tmpfs "$root/tmp"
# pivot_root, not only chroot: the root is then the root of this mount
# namespace, as on a machine (paths in /proc read as they would there, also
# from processes in other mount namespaces, such as `ip netns exec` makes)
mkdir "$root/.old-root"
cd "$root"
pivot_root . .old-root
exec chroot . /bin/sh -c 'umount -n -l /.old-root && rmdir /.old-root && cd / && exec /bin/sh -c "$1"' sh "$1"
"""


def chroot_env(extra=None):
    """A clean environment as root has it, with the machine's pip settings
    (those naming files of this machine left out, but for the CA bundle)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
           "DEBIAN_FRONTEND": "noninteractive"}
    for key, value in os.environ.items():
        if key.startswith("PIP_") and not value.startswith("/"):
            env[key] = value
    if os.environ.get("PIP_CERT"):
        env["PIP_CERT"] = "/etc/ssl/certs/ca-certificates.crt"
    env.update(extra or {})
    return env


def chroot(root, command, env=None, timeout=3600, output=None, netns=None):
    """Run COMMAND (sh) in ROOT; a CompletedProcess (text). OUTPUT: a file to
    stream stdout and stderr to instead of capturing them. NETNS: a network
    namespace to run it in (a chroot shares the machine's network: anything
    that may run the tool itself needs one)."""
    argv = ["unshare", "--mount", "--", "/bin/sh", "-c", CHROOT_SCRIPT, "chroot-sh", str(root), command]
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    kwargs = dict(stdout=output, stderr=subprocess.STDOUT) if output else dict(
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process = subprocess.Popen(argv, env=chroot_env(env), text=True, start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise
    finally:
        kill_group(process)  # anything it left running in the background
    return subprocess.CompletedProcess(argv, process.returncode, out or "", err or "")


def kill_group(process):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=10)


def clone_into(root, where="root/multi-eni-routing"):
    """A fresh `git clone` of this checkout in ROOT; its path inside ROOT."""
    target = root / where
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True, capture_output=True,
                   timeout=120)
    return "/" + where


def readme_commands():
    """{'main': ..., 'demo': ..., 'tests': ...}: the README's commands as written."""
    text = (REPO / "README.md").read_text()
    two = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", two, re.S)
    lines = [line for block in blocks for line in block.splitlines()
             if line.strip() and not line.startswith("#")]
    return {"main": lines[0], "demo": lines[1], "tests": lines[2]}


def readme_tests(suite="bookworm"):
    """Run the README's test command in a fresh SUITE root from a fresh clone."""
    ok, why = usable()
    if not ok:
        sys.stderr.write("fresh_root: cannot run here: %s\n" % why)
        return 1
    command = readme_commands()["tests"]
    started = time.monotonic()
    with extracted(suite) as root:
        src = clone_into(root)
        print("fresh %s root: cd %s && %s" % (suite, src, command), flush=True)
        result = chroot(root, "cd %s && %s" % (shlex.quote(src), command), output=sys.stdout)
    print("fresh %s root: exit %d after %.0f s" % (suite, result.returncode, time.monotonic() - started),
          flush=True)
    return result.returncode


@contextlib.contextmanager
def scratch_netns():
    """A network namespace of our own, deleted afterwards; its name."""
    name = "mer-root-%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def install_deb(suite, deb):
    """apt install DEB in a fresh SUITE root, check it, purge it; exit code."""
    ok, why = usable()
    if not ok:
        sys.stderr.write("fresh_root: cannot run here: %s\n" % why)
        return 1
    name = Path(deb).name
    steps = [
        # the machine's network: only apt's downloads, no maintainer script runs
        (None, "apt-get update -qq && apt-get install -y -q --download-only /root/%s" % name),
        # a scratch namespace (no network: the archives downloaded above) for
        # everything that runs the package's scripts
        ("netns", "apt-get install -y -q /root/%s" % name),
        ("netns", "multi-eni-routing.py --version | grep -qx 'multi-eni-routing.py [0-9].*'"),
        ("netns", "ls /usr/lib/multi-eni-routing/__pycache__/multi_eni_routing.cpython-*.pyc"),
        ("netns", "test -L /etc/systemd/system/multi-user.target.wants/multi-eni-routing.service"),
        ("netns", "apt-get purge -y -q multi-eni-routing"),
        ("netns", "! find / -xdev -name '*multi-eni-routing*' -not -path '/root/*' | grep ."),
    ]
    with extracted(suite) as root, scratch_netns() as netns:
        shutil.copy(deb, root / "root" / name)
        for where, command in steps:
            result = chroot(root, "cd /root && " + command, netns=netns if where else None, timeout=900)
            print("fresh %s root: %s: exit %d\n%s%s" % (suite, command, result.returncode,
                                                        result.stdout[-1500:], result.stderr[-1500:]), flush=True)
            if result.returncode != 0:
                return 1
    return 0


def main(argv):
    if len(argv) >= 1 and argv[0] == "readme-tests":
        return readme_tests(*argv[1:2])
    if len(argv) == 3 and argv[0] == "install-deb":
        return install_deb(argv[1], argv[2])
    if len(argv) >= 2 and argv[0] == "build":
        print(tarball(argv[1], *argv[2:3]))
        return 0
    sys.stderr.write("usage: fresh_root.py readme-tests [SUITE] | install-deb SUITE DEB"
                     " | build SUITE [%s]\n" % "|".join(FLAVOURS))
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
