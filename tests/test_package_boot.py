"""The Debian package on a real boot, and restarts without a routing gap.

A fresh Debian 12 root (fresh_root.py, flavour "systemd") booted with
systemd-nspawn in the lab's instance namespace, as test_boot.py boots it (its
machinery is imported). Two builds of this tree, an older and a newer
version, are installed with apt. Every address answering is watched with
gapless.Watch: ping at 20 per second from the lab's client to each address,
and one established TCP session on a secondary address. The tests run in
file order on one machine:

- first the failure: the version before this work (OLD_COMMIT), installed
  with its install.sh, loses pings on `systemctl restart` (it flushed first);
- `install.sh --now` of this tree over it loses none, then --uninstall;
- `apt install ./older.deb` enables and starts the service; `apt install
  ./newer.deb` upgrades it without a lost ping or a broken session;
- `systemctl restart`, `try-restart` (the RPM's upgrade on older systemd),
  the marked reload-or-restart of systemd-update-helper (its upgrade on
  systemd 248 and later), `systemctl reload` (which reads a changed options
  file), the SysV script's restart and a crash of the watcher that systemd
  restarts (kill -9) lose none; `systemctl stop` removes the routing;
- `apt remove` stops it (routing removed) and keeps a changed options file;
  `apt purge` leaves no file behind.
"""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fresh_root  # noqa: E402
import packages  # noqa: E402
from gapless import Watch  # noqa: E402
from lab import Lab  # noqa: E402
from test_boot import (NSPAWN_STATE, REPO, SRC, SUITE, UNIT, boot_machine, cannot_boot, file_list,  # noqa: E402
                       prepare, wait_for)

pytestmark = pytest.mark.root

DEB_OPTIONS = "/etc/default/multi-eni-routing"
# The last commit before restarts kept the routing (its unit flushed in
# ExecStopPost on every stop, restarts included): the "older version".
OLD_COMMIT = "40bd9e2"
OLD_SRC = "/root/multi-eni-routing-old"
# The package manager's own records, which an install and a purge update.
PACKAGE_STATE = ("/var/lib/dpkg/", "/var/lib/apt/", "/var/lib/ucf/")


def cannot_build():
    absent = packages.missing(packages.DEB_TOOLS)
    return "cannot build the .deb here: %s missing (sh tests/install-deps.sh)" % ", ".join(absent) \
        if absent else ""


@pytest.fixture(scope="module")
def booted():
    """(machine, lab, routing state before any install, file list before, {older, newer}: .deb paths
    inside the machine)."""
    reason = cannot_boot() or cannot_build()
    if reason:
        pytest.skip(reason)
    stack = contextlib.ExitStack()
    with stack:
        if not os.path.exists(NSPAWN_STATE):  # nspawn makes it in the host's /run: ours to remove
            stack.callback(shutil.rmtree, NSPAWN_STATE, ignore_errors=True)
        lab = stack.enter_context(Lab(enis=2, addresses=2, ipv6=False))
        root = stack.enter_context(fresh_root.extracted(SUITE, "systemd"))
        prepare(root, lab)
        old = root / OLD_SRC.lstrip("/")
        subprocess.run(["git", "clone", "-q", str(REPO), str(old)], check=True, capture_output=True)
        subprocess.run(["git", "-C", str(old), "checkout", "-q", OLD_COMMIT], check=True, capture_output=True)
        version = packages.tool_version()
        debs = {"older": packages.build_deb(root / "root", version + "~older1"),
                "newer": packages.build_deb(root / "root", version)}
        debs = {key: "/root/" + path.name for key, path in debs.items()}
        machine = boot_machine(stack, root, lab)
        wait_for(lambda: machine.sh("systemctl is-active network-online.target", check=False)
                 .stdout.strip() == "active", 60, "network-online.target")
        wait_for(lambda: all(r.icmp for r in lab.reachability(lab.addresses(lab.enis[0])).values()),
                 30, "eth0 answering before the install")
        yield machine, lab, lab.snapshot(), file_list(machine), debs


def all_answer(lab):
    return all(r.icmp and r.tcp for r in lab.reachability(lab.addresses()).values())


def active(machine):
    return machine.sh("systemctl is-active %s" % UNIT, check=False).stdout.strip()


def main_pid(machine):
    return machine.sh("systemctl show -p MainPID --value %s" % UNIT).stdout.strip()


def watched(lab):
    """A Watch of every address, the TCP session on eth1's first address."""
    wait_for(lambda: all_answer(lab), 15, "every address answering before the watch")
    return Watch(lab, lab.addresses(), lab.enis[1].addresses4[0])


def apt(machine, *args):
    result = machine.sh("DEBIAN_FRONTEND=noninteractive apt-get -y -q %s 2>&1" % " ".join(args),
                        check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_before_the_fix_a_restart_loses_pings(booted):
    """The older version's unit flushes on every stop: a restart leaves a gap."""
    machine, lab, before, _, _ = booted
    machine.sh("cd %s && sh install.sh --now -q" % OLD_SRC)
    assert active(machine) == "active"
    with watched(lab) as watch:
        machine.sh("systemctl restart %s" % UNIT)
        wait_for(lambda: all_answer(lab), 15, "every address answering after the restart")
    print("older version, systemctl restart: %s" % watch.summary())
    assert watch.lost() or watch.report["tcp failed"], "the older version's restart lost nothing: %s" \
        % watch.report


def test_install_sh_now_over_an_older_install_loses_no_ping(booted):
    machine, lab, before, _, _ = booted
    with watched(lab) as watch:
        result = machine.sh("cd %s && sh install.sh --now" % SRC)
        wait_for(lambda: all_answer(lab), 15, "every address answering after install.sh --now")
    assert "installed /usr/lib/multi-eni-routing/multi_eni_routing.py" in result.stdout, result.stdout
    watch.check("install.sh --now over the older install")
    assert machine.sh("ls /usr/lib/multi-eni-routing/__pycache__").stdout.strip().startswith(
        "multi_eni_routing.cpython-"), "install.sh compiled no bytecode"
    machine.sh("cd %s && sh install.sh --uninstall -q" % SRC)
    assert lab.snapshot() == before
    assert machine.sh("ls /usr/lib/multi-eni-routing 2>&1", check=False).returncode != 0
    # install.sh keeps an options file that differs from the one it ships (the
    # older version's default may): not the package's to find
    machine.sh("rm -f %s %s.dist" % (DEB_OPTIONS, DEB_OPTIONS))


def test_apt_install_enables_and_starts_the_service(booted):
    machine, lab, before, _, debs = booted
    apt(machine, "install", debs["older"])
    wait_for(lambda: active(machine) == "active", 30, "the service after apt install")
    assert machine.sh("systemctl is-enabled %s" % UNIT).stdout.strip() == "enabled"
    wait_for(lambda: all_answer(lab), 15, "every address answering after apt install")
    # compiled at install time (py3compile): the command starts from bytecode
    assert machine.sh("ls /usr/lib/multi-eni-routing/__pycache__").stdout.strip().startswith(
        "multi_eni_routing.cpython-")
    version = machine.sh("multi-eni-routing.py --version").stdout.strip()
    assert version == "multi-eni-routing.py %s" % packages.tool_version()


def test_apt_upgrade_keeps_every_address_answering(booted):
    machine, lab, _, _, debs = booted
    pid = main_pid(machine)
    with watched(lab) as watch:
        apt(machine, "install", debs["newer"])
        wait_for(lambda: active(machine) == "active" and all_answer(lab), 15,
                 "every address answering after the upgrade")
    assert machine.sh("dpkg-query -W -f '${Version}' multi-eni-routing").stdout == packages.tool_version()
    assert main_pid(machine) != pid, "the upgrade did not restart the watcher"
    watch.check("apt upgrade")


# What restarts the service: an admin, install.sh --now (restart), the RPM's
# %systemd_postun_with_restart on older systemd (try-restart), and on systemd
# 248 and later (Fedora, RHEL 9, Amazon Linux 2023) systemd-update-helper,
# which marks the unit (needs-restart) and has systemd reload-or-restart the
# marked units at the end of the transaction (systemd 252 restarts it).
RESTARTS = {
    "systemctl restart": "systemctl restart %s" % UNIT,
    "systemctl try-restart": "systemctl try-restart %s" % UNIT,
    "the RPM's upgrade (systemd-update-helper)": "systemctl set-property %s Markers=+needs-restart && "
                                                 "systemctl reload-or-restart --marked" % UNIT,
}


@pytest.mark.parametrize("what", sorted(RESTARTS))
def test_a_restart_keeps_every_address_answering(booted, what):
    machine, lab, _, _, _ = booted
    pid = main_pid(machine)
    since = machine.sh("sleep 1; date +%s").stdout.strip()  # journalctl --since: whole seconds
    with watched(lab) as watch:
        machine.sh(RESTARTS[what])
        wait_for(lambda: active(machine) == "active" and all_answer(lab), 15,
                 "every address answering after %s" % what)
    watch.check(what)
    journal = machine.sh("journalctl -q -o cat -u %s --since @%s" % (UNIT, since)).stdout
    assert "flushed:" not in journal
    # a new watcher, or the same one started again in place (a reload)
    assert main_pid(machine) != pid or "reloading" in journal, "%s did not restart the watcher" % what


def test_a_crashed_watcher_restarted_by_systemd_keeps_every_address_answering(booted):
    """kill -9 of the watcher (the OOM killer, a bug): systemd runs
    ExecStopPost=, then starts it again after RestartSec=5. Before, that
    flush took every secondary address away for those 5 s."""
    machine, lab, _, _, _ = booted
    pid = main_pid(machine)
    since = machine.sh("sleep 1; date +%s").stdout.strip()
    with watched(lab) as watch:
        machine.sh("systemctl kill -s KILL --kill-who=main %s" % UNIT)
        wait_for(lambda: main_pid(machine) not in (pid, "0") and active(machine) == "active"
                 and all_answer(lab), 30, "the watcher started again by systemd")
    watch.check("kill -9 of the watcher")
    journal = machine.sh("journalctl -q -o cat -u %s --since @%s" % (UNIT, since)).stdout
    assert "flushed:" not in journal, journal


def test_systemctl_reload_reads_the_options_and_keeps_every_address_answering(booted):
    """Reload: the watcher starts again in place with the options file read
    again (here: eth1 excluded, so its routing goes, then comes back)."""
    machine, lab, _, _, _ = booted
    pid = main_pid(machine)
    good = machine.sh("cat %s" % DEB_OPTIONS).stdout
    with watched(lab) as watch:
        machine.sh("systemctl reload %s" % UNIT)
        wait_for(lambda: "reloading" in machine.sh("journalctl -q -o cat -u %s -n 20" % UNIT).stdout, 10,
                 "the watcher to say it reloads")
        wait_for(lambda: all_answer(lab), 15, "every address answering after the reload")
    assert main_pid(machine) == pid, "a reload keeps the watcher's pid"
    watch.check("systemctl reload")
    # the options are read again: with eth1 excluded, its secondary stops answering
    secondary = lab.enis[1].addresses4[0]
    try:
        machine.sh("printf '%%s\\n' '-x %s' >>%s" % (lab.enis[1].name, DEB_OPTIONS))
        machine.sh("systemctl reload %s" % UNIT)
        wait_for(lambda: not lab.tcp_ok(lab.client, secondary, timeout=0.5), 15,
                 "eth1's routing to go once the reload excluded it")
        # a bad options file is refused: the watcher goes on as it was
        machine.sh("printf '%%s\\n' '--bogus' >>%s" % DEB_OPTIONS)
        machine.sh("systemctl reload %s" % UNIT)
        wait_for(lambda: "reload refused" in machine.sh("journalctl -q -o cat -u %s -n 20" % UNIT).stdout, 10,
                 "the watcher to refuse the bad options")
        assert active(machine) == "active" and main_pid(machine) == pid
    finally:
        machine.sh("cat >%s <<'EOF'\n%sEOF" % (DEB_OPTIONS, good))
    machine.sh("systemctl reload %s" % UNIT)
    wait_for(lambda: all_answer(lab), 15, "every address answering with the options restored")


def test_sysv_restart_keeps_every_address_answering(booted):
    machine, lab, _, _, _ = booted
    pid = main_pid(machine)
    with watched(lab) as watch:
        result = machine.sh("/etc/init.d/multi-eni-routing restart")
        wait_for(lambda: all_answer(lab), 15, "every address answering after the SysV restart")
    assert "systemctl restart" in result.stdout
    assert main_pid(machine) != pid
    watch.check("/etc/init.d/multi-eni-routing restart")


def test_systemctl_stop_still_removes_the_routing(booted):
    machine, lab, before, _, _ = booted
    machine.sh("systemctl stop %s" % UNIT)
    assert lab.snapshot() == before
    machine.sh("systemctl start %s" % UNIT)
    wait_for(lambda: all_answer(lab), 15, "every address answering after the start")


def test_apt_remove_stops_it_and_keeps_a_changed_options_file(booted):
    machine, lab, before, _, _ = booted
    machine.sh("printf '%%s\\n' '# changed by the admin' >>%s" % DEB_OPTIONS)
    apt(machine, "remove", "multi-eni-routing")
    assert active(machine) in ("inactive", "unknown")
    assert lab.snapshot() == before
    assert machine.sh("tail -n 1 %s" % DEB_OPTIONS).stdout == "# changed by the admin\n"
    assert machine.sh("test -e /usr/bin/multi-eni-routing.py", check=False).returncode != 0


def test_apt_purge_leaves_nothing_behind(booted):
    machine, lab, before, files_before, _ = booted
    apt(machine, "purge", "multi-eni-routing")
    assert lab.snapshot() == before
    changed = {path for path in file_list(machine) ^ files_before
               if not path.startswith(PACKAGE_STATE) and path not in ("/root/" + p for p in ())}
    ours = {path for path in changed if not path.startswith("/root/")}  # the clones and the .debs are the test's
    assert ours == set(), sorted(ours)
    leftovers = set(machine.sh("find /run /etc /usr /var -name '*multi-eni-routing*' "
                               "-not -path '/run/systemd/*' -not -path '/var/lib/dpkg/*'").stdout.splitlines())
    assert leftovers - files_before == set()  # the lab's drop-in (lab_nics_dropin) was there before
