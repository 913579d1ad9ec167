"""Real Docker (Debian's docker.io) inside a lab's instance namespace.

    with Dockerd(lab, image_tar) as docker:
        docker.run_server("web", "-p", "203.0.113.11:8080:80")
        tcp_answer(lab.client, "203.0.113.11", 8080)  # "web"

dockerd runs in the lab's instance namespace with its own data root, exec
root, pid file and socket under one temporary directory, its bridge and
address pools inside 198.18.0.0/15, and the vfs storage driver (the image is
two megabytes; vfs needs no overlay mounts). It runs in the private mount
namespace that `ip netns exec` creates, where it first gets:

- the cgroup hierarchies (`ip netns exec` mounts a fresh /sys, so
  /sys/fs/cgroup is empty there): the same ones the host has mounted;
- a tmpfs on /run (containerd's shims put their sockets in /run/containerd),
  so that nothing of it lands in the host's files. (dockerd 20.10 would also
  write /etc/docker/key.json before version 23: its daemon.json puts that in
  its directory.)

Those mounts vanish with the namespace's last process. Containers go into
the cgroup parent mer-<lab id>-docker, removed on stop. The image is built
with `docker import` from the static busybox (no registry).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

from lab import wait_for

# Inside 198.18.0.0/15 and clear of the lab's own ranges (client 198.18.0.0/24,
# admin link 198.18.100.0/24 and 198.18.200.0/24, fake container 198.19.0.0/24).
DOCKER_BIP = "198.18.16.1/24"
DOCKER_POOL = "base=198.18.32.0/19,size=24"
IMAGE = "mer-busybox"
BUSYBOX = "/bin/busybox"
# Debian's client; another docker CLI earlier in PATH may be of another version.
DOCKER_CLI = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
START_TIMEOUT = 30  # seconds until dockerd answers on its socket
STOP_TIMEOUT = 20
CGROUP_ROOT = "/sys/fs/cgroup"
# mount options that are not a v1 controller or a name=
MOUNT_FLAGS = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "seclabel",
               "nsdelegate", "memory_recursiveprot", "xattr", "clone_children"}


class DockerError(RuntimeError):
    pass


def docker_usable():
    """(True, "") if dockerd can run here, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "needs root"
    missing = [name for name in ["dockerd", "containerd", "runc"] if not shutil.which(name)]
    if not DOCKER_CLI:
        missing.append("docker")
    if not os.path.exists(BUSYBOX) or not statically_linked(BUSYBOX):
        missing.append("busybox-static")
    if missing:
        return False, "not installed: %s (apt-get install docker.io busybox-static)" % ", ".join(missing)
    if not cgroup_mounts():
        return False, "no cgroup hierarchy mounted under %s" % CGROUP_ROOT
    return True, ""


def statically_linked(path):
    """True if PATH is an ELF file without a program interpreter (PT_INTERP):
    it runs in an image that has no C library."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return False
        order = "<" if header[5] == 1 else ">"
        # where e_phoff, e_phentsize and e_phnum are in a 64-bit or 32-bit ELF header
        phoff_format, phoff_at, sizes_at = ("Q", 0x20, 0x36) if header[4] == 2 else ("I", 0x1C, 0x2A)
        (phoff,) = struct.unpack_from(order + phoff_format, header, phoff_at)
        phentsize, phnum = struct.unpack_from(order + "HH", header, sizes_at)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            if struct.unpack(order + "I", f.read(4)) == (3,):  # PT_INTERP
                return False
    return True


def cgroup_mounts():
    """[(fstype, target, options)] of the host's cgroup mounts, outermost first."""
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, target, fstype, options = line.split()[:4]
            if fstype in ("cgroup", "cgroup2") and target.startswith(CGROUP_ROOT):
                kept = [o for o in options.split(",") if o not in MOUNT_FLAGS]
                mounts.append((fstype, target, ",".join(kept)))
    return sorted(mounts, key=lambda m: len(m[1]))


def cgroup_setup_script():
    """Shell lines that mount the host's cgroup hierarchies under a fresh /sys."""
    mounts = cgroup_mounts()
    if mounts and mounts[0][1] == CGROUP_ROOT:  # cgroup2 only
        return ["mount -n -t cgroup2 cgroup2 %s" % CGROUP_ROOT]
    lines = ["mount -n -t tmpfs -o mode=755 cgroup %s" % CGROUP_ROOT]
    for fstype, target, options in mounts:
        lines.append("mkdir -p %s" % target)
        lines.append("mount -n -t %s %s %s %s" % (fstype, "-o " + options if options else "",
                                             fstype, target))
    return lines


def dockerd_major_version():
    """20 for "Docker version 20.10.24+dfsg1, build 5d6db84"."""
    out = subprocess.run(["dockerd", "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\d+)\.", out)
    return int(match.group(1)) if match else 0


def build_busybox_tar(directory):
    """A root file system with the static busybox and its applet links, as a tar
    for `docker import`; its path."""
    root = Path(directory, "rootfs")
    (root / "bin").mkdir(parents=True)
    for empty in ["etc", "proc", "sys", "dev", "tmp"]:
        (root / empty).mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet != "busybox" and "/" not in applet:
            (root / "bin" / applet).symlink_to("busybox")
    tar_path = Path(directory, "busybox.tar")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname=".")
    shutil.rmtree(root)
    return tar_path


class Dockerd:
    """dockerd in LAB's instance namespace; a context manager that always
    cleans up (containers, processes, cgroups, directories)."""

    def __init__(self, lab, image_tar):
        self.lab = lab
        self.image_tar = image_tar
        self.dir = Path(tempfile.mkdtemp(prefix="mer-%s-docker-" % lab.id))
        self.socket = self.dir / "docker.sock"
        self.pidfile = self.dir / "docker.pid"
        self.log_path = self.dir / "dockerd.log"
        self.cgroup_parent = "mer-%s-docker" % lab.id
        self.process = None
        self.log = None

    # -- lifecycle --

    def __enter__(self):
        try:
            self.start()
            self.docker("import", str(self.image_tar), IMAGE)
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def argv(self):
        """dockerd's command line."""
        return [
            "dockerd",
            "--data-root", str(self.dir / "data"),
            "--exec-root", str(self.dir / "exec"),
            "--pidfile", str(self.pidfile),
            "--host", "unix://%s" % self.socket,
            "--config-file", str(self.dir / "daemon.json"),
            "--bip", DOCKER_BIP,
            "--default-address-pool", DOCKER_POOL,
            "--iptables=true",
            "--storage-driver", "vfs",
            "--cgroup-parent", self.cgroup_parent,
            "--shutdown-timeout", "2",
        ]

    def start(self):
        """Start dockerd and wait until it answers on its socket."""
        config = {}
        if dockerd_major_version() < 23:  # it writes /etc/docker/key.json unless told otherwise
            config["deprecated-key-path"] = str(self.dir / "key.json")
        (self.dir / "daemon.json").write_text(json.dumps(config))
        # /run first: mount(8) keeps notes in /run/mount, which must not land on the host
        script = "\n".join(["set -e", "mount -n -t tmpfs -o mode=755 tmpfs /run",
                            *cgroup_setup_script(),
                            'exec "$@"'])
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.instance, "sh", "-c", script, "sh", *self.argv()],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def answering():
            if self.process.poll() is not None:
                raise DockerError("dockerd exited with %s:\n%s" % (self.process.returncode, self.log_tail()))
            return self.socket.exists() and self.docker("version", check=False).returncode == 0
        try:
            wait_for(answering, START_TIMEOUT, "dockerd answering")
        except AssertionError:
            raise DockerError("dockerd did not answer within %ss:\n%s" % (START_TIMEOUT, self.log_tail())) from None

    def stop(self):
        """Stop dockerd (it stops its containers and containerd) and wait for
        it; if it hangs, kill it and whatever it left in the namespace."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self._kill_leftovers()
        self.process = None
        if self.log:
            self.log.close()
            self.log = None

    def restart(self):
        """Stop dockerd and start it again with the same options: containers
        started with --restart come back."""
        self.stop()
        self.start()

    def cleanup(self):
        """Remove every container, stop dockerd, remove its cgroups and files.
        Never raises."""
        with contextlib.suppress(Exception):
            if self.process and self.process.poll() is None:
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=STOP_TIMEOUT)
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self._kill_leftovers()
        with contextlib.suppress(Exception):
            self._remove_cgroups()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftovers(self):
        """containerd, shims, container processes still in the lab's instance
        namespace (they hold the private mount namespace and its mounts)."""
        pids = subprocess.run(["ip", "netns", "pids", self.lab.instance],
                              capture_output=True, text=True, check=False).stdout.split()
        for pid in pids:
            if pid == str(os.getpid()):
                continue
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def leftover_cgroups(self):
        """The cgroup parent's directories that still exist."""
        return [str(Path(target, self.cgroup_parent)) for _, target, _ in cgroup_mounts()
                if Path(target, self.cgroup_parent).exists()]

    def _remove_cgroups(self, timeout=5):
        """The cgroup parent the containers ran in, in every hierarchy, deepest
        first (a cgroup is busy until its killed processes are gone)."""
        def removed():
            for parent in self.leftover_cgroups():
                tree = [p for p in Path(parent).rglob("*") if p.is_dir()] + [Path(parent)]
                for cgroup in sorted(tree, key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        cgroup.rmdir()
            return not self.leftover_cgroups()
        with contextlib.suppress(AssertionError):  # what is left, leftover_cgroups() reports
            wait_for(removed, timeout, "the containers' cgroups removed")

    def log_tail(self, lines=30):
        """The end of dockerd's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- the client --

    def docker(self, *args, check=True, timeout=60):
        """Run the docker client against this dockerd (from the host: it only
        talks to the socket)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_CONFIG": str(self.dir / "cli"),
               "HOME": str(self.dir)}
        proc = subprocess.run([DOCKER_CLI, "--host", "unix://%s" % self.socket, *args],
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and proc.returncode != 0:
            raise DockerError("docker %s failed (%d): %s\n%s" % (
                " ".join(args), proc.returncode, proc.stderr.strip(), self.log_tail(10)))
        return proc

    def run_server(self, name, *options, port=80):
        """A detached container NAME with a TCP server on PORT that, like the
        lab's LineServer, greets each connection with one line (its name) and
        then echoes every line as "echo LINE". OPTIONS go before the image
        (-p ..., --network ..., --restart ...)."""
        serve = 'echo %s; while read -r line; do echo "echo $line"; done' % name
        self.docker("run", "-d", "--name", name, "--stop-signal", "KILL", *options, IMAGE,
                    "nc", "-ll", "-p", str(port), "-e", "sh", "-c", serve)
        return name

    def greeting_from(self, name, address, port):
        """The first line container NAME got from a TCP server at ADDRESS:PORT
        (a lab LineServer greets with its address), or None."""
        proc = self.docker("exec", name, "timeout", "3", "nc", address, str(port), check=False)
        return proc.stdout.split("\n")[0] or None

    def container_address(self, name, network="bridge"):
        return self.docker("inspect", "-f", "{{(index .NetworkSettings.Networks \"%s\").IPAddress}}"
                           % network, name).stdout.strip()
