"""Checks of the simulated VPC itself (tests/lab.py), without the tool: it must
fail the way EC2 fails, for the reasons EC2 fails, and its IMDS emulator must
answer (and misbehave) as documented. Needs root."""

import os
import subprocess
import time

import pytest

from lab import CLIENT4, IMDS4, Lab

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="builds network namespaces, veths and iptables rules: run as root")

TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
MACS = "/latest/meta-data/network/interfaces/macs/"


def token(lab):
    status, body = lab.imds_request("PUT", "/latest/api/token", TTL)
    assert status == 200, (status, body)
    return {"X-aws-ec2-metadata-token": body.decode()}


# -- the VPC ------------------------------------------------------------------------------

def test_vpc_drops_replies_that_leave_through_the_wrong_eni(lab):
    eth0, eth1 = lab.enis
    reach = lab.reachability([eth0.addresses4[0], eth1.addresses4[0]])
    assert [r.tcp for r in reach.values()] == [True, False]
    assert lab.dropped(eth0) > 0, "eth1's replies should have been dropped on eth0's port"


def test_hand_made_policy_routing_fixes_it(lab):
    """A control: the failure above is the routing problem, not a lab defect."""
    eth1 = lab.enis[1]
    lab.ip(lab.instance, "route add default via %s dev eth1 table 100" % eth1.gateway4,
           "rule add from %s lookup 100" % eth1.addresses4[0])
    assert lab.tcp_ok(lab.client, eth1.addresses4[0])
    assert lab.ping_ok(lab.client, eth1.addresses4[0])


def test_lab_build_is_fast_and_leaves_nothing_behind(lab_support):
    if not lab_support[0]:
        pytest.skip(lab_support[1])
    started = time.monotonic()
    with pytest.raises(ZeroDivisionError):
        with Lab(enis=3, container=True, admin_link=True) as lab:
            assert time.monotonic() - started < 2
            names = list(lab.namespaces)
            1 / 0  # a failing test body must still clean up
    remaining = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in remaining for name in names)
    assert not os.path.exists(lab.tmpdir)


# -- the IMDS emulator ----------------------------------------------------------------------

def test_imds_v2_serves_the_network_tree_with_a_token_only(lab):
    eth0, eth1 = lab.enis
    assert lab.imds_request("GET", "/latest/meta-data/mac")[0] == 401
    headers = token(lab)
    assert lab.imds_request("GET", "/latest/meta-data/mac", headers) == (200, eth0.mac.encode())
    assert lab.imds_request("GET", MACS, headers) == (200, b"02:00:00:00:00:01/\n02:00:00:00:00:02/")
    eth1_dir = MACS + eth1.mac + "/"
    assert lab.imds_request("GET", eth1_dir + "local-ipv4s", headers) == (200, b"203.0.113.10\n203.0.113.11")
    assert lab.imds_request("GET", eth1_dir + "device-number", headers) == (200, b"1")
    assert lab.imds_request("GET", eth1_dir + "ipv4-prefix", headers)[0] == 404  # empty, like AWS
    assert lab.imds_request("GET", "/latest/meta-data/mac", headers, v6=True)[0] == 200


@pytest.mark.parametrize("mode, put, get_without_token", [
    ("v2", 200, 401), ("optional", 200, 200), ("v1", 405, 200), ("refused", 403, 401)])
def test_imds_token_modes(make_lab, mode, put, get_without_token):
    lab = make_lab(enis=1, imds=mode)
    assert lab.imds_request("PUT", "/latest/api/token", TTL)[0] == put
    assert lab.imds_request("GET", "/latest/meta-data/mac")[0] == get_without_token


def test_imds_misbehaves_on_request(make_lab):
    lab = make_lab(enis=2, ipv6=False)
    headers = token(lab)
    eth1_numbers = MACS + lab.enis[1].mac + "/device-number"

    lab.imds.misbehave(throttle_first=2)
    assert [lab.imds_request("GET", eth1_numbers, headers)[0] for _ in range(3)] == [429, 429, 200]

    lab.imds.misbehave(throttle_first=0, mac_404_first={lab.enis[1].mac: 1})
    assert [lab.imds_request("GET", eth1_numbers, headers)[0] for _ in range(2)] == [404, 200]

    lab.imds.misbehave(mac_404_first={}, delay=0.3)  # counters restart on each change
    started = time.monotonic()
    assert lab.imds_request("GET", eth1_numbers, headers)[0] == 200
    assert time.monotonic() - started >= 0.3

    lab.imds.misbehave(delay=0)
    lab.imds.override(MACS[len("/latest/meta-data/"):] + lab.enis[1].mac + "/local-ipv4s", {"huge": 1 << 20})
    status, body = lab.imds_request("GET", MACS + lab.enis[1].mac + "/local-ipv4s", headers)
    assert status == 200 and len(body) == 1 << 20
    assert sum(r["path"] == eth1_numbers for r in lab.imds.requests()) == 6


def test_absent_imds_times_out_instead_of_refusing(make_lab):
    lab = make_lab(enis=1, imds="absent")
    started = time.monotonic()
    status, error = lab.imds_request("GET", "/latest/meta-data/mac", timeout=0.5)
    assert status is None and "timed out" in error
    assert time.monotonic() - started >= 0.5


def test_runtime_changes_reach_imds_and_the_vpc(lab):
    eth1 = lab.enis[1]
    lab.add_address(eth1, "203.0.113.12")
    headers = token(lab)
    body = lab.imds_request("GET", MACS + eth1.mac + "/local-ipv4s", headers)[1]
    assert body.decode().splitlines()[-1] == "203.0.113.12"
    # the VPC now lets eth1 send from the new address
    lab.ip(lab.instance, "route add %s via %s dev eth1 src 203.0.113.12" % (CLIENT4, eth1.gateway4))
    assert lab.tcp_ok(lab.instance, CLIENT4, bind="203.0.113.12")

    eth2 = lab.attach_eni()
    assert eth2.name == "eth2" and eth2.mac.encode() in lab.imds_request("GET", MACS, headers)[1]
    lab.detach_eni(eth2)
    assert eth2.mac.encode() not in lab.imds_request("GET", MACS, headers)[1]
    assert "eth2" not in lab.run(lab.instance, "ip", "link").stdout


def test_imds_is_reached_through_the_default_route(lab):
    route = lab.run(lab.instance, "ip", "route", "get", IMDS4).stdout
    assert "via 198.51.100.1 dev eth0" in route
    assert lab.imds_reachable()
