"""Integration tests: the tool on an instance that runs real Docker.

Debian's docker.io runs in the lab's instance namespace (tests/docker_lab.py);
its containers publish ports with Docker's own DNAT and filter rules. Each
test first shows the failure without the tool where there is one, then runs
the tool and checks what a client on the internet sees. Needs root; skipped
with the reason where dockerd cannot start.
"""

import os
import re
import subprocess
import threading

import pytest

from docker_lab import Dockerd, DockerError, build_busybox_tar, docker_usable
from lab import CLIENT4, ECHO_PORT, PEER4, applied, tcp_answer, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="runs dockerd in network namespaces: run as root")

PUBLISHED = 8080  # the port containers are published on
TABLES = ["filter", "nat", "mangle", "raw"]
# what dockerd and containerd would create in the host's /run (not "mount": other
# software on the host creates it with any mount(8) call)
RUN_ENTRIES = {"docker", "docker.sock", "docker.pid", "containerd", "runc"}


# -- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory):
    """The image's root file system, built once per session."""
    usable, reason = docker_usable()
    if not usable:
        pytest.skip(reason)
    return build_busybox_tar(tmp_path_factory.mktemp("busybox-image"))


@pytest.fixture
def docker(lab, busybox_tar):
    """dockerd in the default lab's instance (eth0 198.51.100.10-11, eth1
    203.0.113.10-11), with the image imported; stopped and removed after
    the test, and the host checked for anything it left behind."""
    host_before = host_state()
    dockerd = Dockerd(lab, busybox_tar)
    try:
        dockerd.__enter__()
    except DockerError as e:
        pytest.skip("dockerd cannot start here: %s" % e)
    try:
        yield dockerd
    finally:
        dockerd.cleanup()
        leftovers = host_leftovers(host_before, dockerd)
        assert not leftovers, "dockerd left this on the host: %s" % leftovers


def host_state():
    """What of the host a leaking dockerd would change. (Only what Docker would
    leave: other software may change the host meanwhile.)"""
    with open("/proc/self/mounts") as f:
        mounts = {line.split()[1] for line in f}
    return {
        "iptables": _host_output("iptables-save") + _host_output("ip6tables-save"),
        "run": {name for name in os.listdir("/run") if name in RUN_ENTRIES},
        "etc/docker": sorted(os.listdir("/etc/docker")) if os.path.isdir("/etc/docker") else None,
        "mounts under /tmp": {m for m in mounts if m.startswith("/tmp/")},
    }


def _host_output(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def host_leftovers(before, dockerd):
    """Docker's traces in the host's own namespaces and files, [] if none."""
    after = host_state()
    new_lines = set(after["iptables"].splitlines()) - set(before["iptables"].splitlines())
    found = ["host iptables: " + line for line in sorted(new_lines)
             if re.search(r"docker|198\.18\.", line, re.IGNORECASE)]
    found += ["/run/" + name for name in sorted(after["run"] - before["run"])]
    if after["etc/docker"] != before["etc/docker"]:
        found.append("/etc/docker now holds %s" % after["etc/docker"])
    found += ["mount " + m for m in sorted(after["mounts under /tmp"] - before["mounts under /tmp"])]
    if dockerd.dir.exists():
        found.append(str(dockerd.dir))
    found += ["cgroup " + path for path in dockerd.leftover_cgroups()]
    return found


# -- helpers ------------------------------------------------------------------------

def wait_until_serving(lab, docker, name, network="bridge"):
    """Until container NAME answers on its own address, from the instance
    itself (no ENI on that path): its server is up, whatever the routing."""
    def serving():
        address = docker.container_address(name, network)
        return bool(address) and tcp_answer(lab.instance, address, 80, timeout=0.5) == name
    wait_for(serving, 15, "container %s to serve" % name)


def answers(lab, addresses, port=PUBLISHED):
    """{address: the greeting the client got at ADDRESS:PORT, or None}."""
    return {a: tcp_answer(lab.client, a, port, timeout=1) for a in addresses}


def iptables_tables(lab, save="iptables-save"):
    """{table: iptables-save -t TABLE of the instance}, without packet counters
    and the generated/completed comment lines."""
    tables = {}
    for table in TABLES:
        text = lab.run(lab.instance, save, "-t", table).stdout
        tables[table] = "".join(re.sub(r" \[\d+:\d+\]$", "", line) + "\n"
                                for line in text.splitlines() if not line.startswith("#"))
    return tables


# -- published ports -----------------------------------------------------------------

def test_port_published_on_a_secondary_eni_address_answers_through_its_eni(lab, docker):
    eth0, eth1 = lab.enis
    address = eth1.addresses4[1]  # 203.0.113.11
    docker.run_server("web", "-p", "%s:%d:80" % (address, PUBLISHED))
    wait_until_serving(lab, docker, "web")

    drops = lab.dropped(eth0)
    assert answers(lab, [address]) == {address: None}
    assert lab.dropped(eth0) > drops, "the reply should have left through eth0 (and been dropped)"

    applied(lab)
    drops = [lab.dropped(eni) for eni in lab.enis]
    assert answers(lab, [address]) == {address: "web"}
    assert [lab.dropped(eni) for eni in lab.enis] == drops, "a packet left through the wrong ENI"


def test_port_published_on_all_addresses_answers_on_every_eni_address(lab, docker):
    eth0, eth1 = lab.enis
    docker.run_server("web", "-p", "%d:80" % PUBLISHED)
    wait_until_serving(lab, docker, "web")
    everywhere = lab.addresses(v6=False)  # Docker publishes IPv4 only unless told --ipv6

    def outbound():  # the container's own connections, masqueraded by Docker
        return {"internet": docker.greeting_from("web", CLIENT4, ECHO_PORT),
                "VPC peer behind eth1": docker.greeting_from("web", PEER4, ECHO_PORT)}

    reached = {"internet": CLIENT4, "VPC peer behind eth1": PEER4}
    assert answers(lab, everywhere) == {**{a: "web" for a in eth0.addresses4},
                                        **{a: None for a in eth1.addresses4}}
    assert outbound() == reached

    applied(lab)
    drops = [lab.dropped(eni) for eni in lab.enis]
    assert answers(lab, everywhere) == {a: "web" for a in everywhere}
    assert [lab.dropped(eni) for eni in lab.enis] == drops, "a packet left through the wrong ENI"
    assert outbound() == reached


def test_published_ports_keep_answering_after_dockerd_restarts(lab, docker):
    eth1 = lab.enis[1]
    everywhere = lab.addresses(v6=False)
    docker.run_server("one", "--restart", "always", "-p", "%s:%d:80" % (eth1.addresses4[1], PUBLISHED))
    docker.run_server("all", "--restart", "always", "-p", "%d:80" % (PUBLISHED + 1))
    for name in ["one", "all"]:
        wait_until_serving(lab, docker, name)
    assert answers(lab, eth1.addresses4[1:]) == {eth1.addresses4[1]: None}

    applied(lab)
    expected_one = {eth1.addresses4[1]: "one"}
    expected_all = {a: "all" for a in everywhere}
    assert answers(lab, eth1.addresses4[1:]) == expected_one
    assert answers(lab, everywhere, PUBLISHED + 1) == expected_all

    docker.restart()  # rewrites its iptables rules, restarts both containers
    for name in ["one", "all"]:
        wait_until_serving(lab, docker, name)
    assert answers(lab, eth1.addresses4[1:]) == expected_one
    assert answers(lab, everywhere, PUBLISHED + 1) == expected_all
    assert "in sync" in applied(lab).stdout


def test_a_network_created_after_apply_answers_without_running_the_tool_again(lab, docker):
    eth1 = lab.enis[1]
    everywhere = lab.addresses(v6=False)
    docker.docker("network", "create", "early")
    docker.run_server("early", "--network", "early", "-p", "%d:80" % PUBLISHED)
    wait_until_serving(lab, docker, "early", "early")
    assert answers(lab, eth1.addresses4) == {a: None for a in eth1.addresses4}

    applied(lab)
    assert answers(lab, everywhere) == {a: "early" for a in everywhere}

    docker.docker("network", "create", "late")
    docker.run_server("late", "--network", "late", "-p", "%d:80" % (PUBLISHED + 1))
    wait_until_serving(lab, docker, "late", "late")
    assert answers(lab, everywhere, PUBLISHED + 1) == {a: "late" for a in everywhere}
    assert "in sync" in applied(lab).stdout


def test_sessions_through_published_ports_survive_apply_reapply_and_flush(lab, docker):
    eth0, eth1 = lab.enis
    docker.run_server("web", "-p", "%d:80" % PUBLISHED)
    wait_until_serving(lab, docker, "web")
    older = lab.session(lab.client, eth0.addresses4[0], PUBLISHED)  # works without the tool
    assert older.greeting == "web" and older.exchange("before")

    applied(lab)
    newer = lab.session(lab.client, eth1.addresses4[0], PUBLISHED)
    assert newer.greeting == "web"
    assert [older.exchange("after apply"), newer.exchange("after apply")] == [True, True]
    applied(lab)
    assert [older.exchange("after re-apply"), newer.exchange("after re-apply")] == [True, True]
    applied(lab, "--flush")
    assert older.exchange("after flush")


# -- flows older than the tool (issue 7, defect 4) --------------------------------------

def test_a_connect_in_flight_before_the_first_apply_completes_after_it(lab, docker):
    """The client's SYN reached the container before the tool ran: the
    connection is tracked already (its SYN-ACK left through eth0 and was
    dropped), so the retransmitted SYN is not NEW. It must be marked anyway."""
    eth1 = lab.enis[1]
    address = eth1.addresses4[1]
    docker.run_server("web", "-p", "%s:%d:80" % (address, PUBLISHED))
    wait_until_serving(lab, docker, "web")

    result = {}
    # the client retransmits its SYN after about 1 and 3 s: the tool runs before
    connect = threading.Thread(target=lambda: result.update(
        greeting=tcp_answer(lab.client, address, PUBLISHED, timeout=6)))
    drops = lab.dropped(lab.enis[0])
    connect.start()
    wait_for(lambda: lab.dropped(lab.enis[0]) > drops, 3, "the first SYN-ACK to be dropped")

    applied(lab)
    connect.join()
    assert result["greeting"] == "web"


# -- flush ------------------------------------------------------------------------------

def test_flush_leaves_dockers_tables_byte_identical(lab, docker):
    eth1 = lab.enis[1]
    docker.docker("network", "create", "other")
    docker.run_server("one", "-p", "%s:%d:80" % (eth1.addresses4[1], PUBLISHED))
    docker.run_server("other", "--network", "other", "-p", "%d:80" % (PUBLISHED + 1))
    for name, network in [("one", "bridge"), ("other", "other")]:
        wait_until_serving(lab, docker, name, network)
    before = {save: iptables_tables(lab, save) for save in ["iptables-save", "ip6tables-save"]}

    applied(lab)
    # connections the tool marked, so that conntrack holds its marks at flush
    assert answers(lab, eth1.addresses4[1:]) == {eth1.addresses4[1]: "one"}
    assert answers(lab, lab.addresses(v6=False), PUBLISHED + 1) == {
        a: "other" for a in lab.addresses(v6=False)}
    applied_tables = {save: iptables_tables(lab, save) for save in before}
    assert applied_tables["iptables-save"]["mangle"] != before["iptables-save"]["mangle"], \
        "the tool should have added its mangle chains"

    applied(lab, "--flush")
    after = {save: iptables_tables(lab, save) for save in before}
    for save in before:
        for table in TABLES:
            assert after[save][table] == before[save][table], "%s -t %s after flush" % (save, table)
