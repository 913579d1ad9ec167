"""Integration tests: the tool against a simulated VPC (tests/lab.py).

Each test first shows the failure without the tool where there is one, then
runs the tool (no arguments = apply) and checks what a user would see: which
addresses answer, which path packets take, what state is left behind.
Needs root; builds namespaces named mer-<id>-*.
"""

import itertools
import json
import os
import time

import pytest

from lab import (BOTH, CLIENT4, CLIENT6, CONTAINER4, DNAT_PORT, NEITHER, PEER4, TOOL_MARKERS, VPN_HOST,
                 applied, snapshot_diff, tcp_answer, tool_lines)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="builds network namespaces, veths and iptables rules: run as root")

def foreign_only(snapshot, enis):
    """The snapshot without what the tool owns: its marked lines and the
    rp_filter of the ENIs."""
    own_sysctls = tuple("net.ipv4.conf.%s.rp_filter" % eni.name for eni in enis)
    return {key: "\n".join(line.replace(" group 231 ", " group default ") for line in text.splitlines()
                           if not any(m in line for m in TOOL_MARKERS)
                           and not line.startswith(own_sysctls))
            for key, text in snapshot.items()}


def without(snapshot, word):
    """The snapshot without the lines that mention WORD (e.g. a detached ENI)."""
    return {key: "\n".join(line for line in text.splitlines() if word not in line)
            for key, text in snapshot.items()}


def assert_same(before, after, what):
    diff = snapshot_diff(before, after)
    assert not diff, "%s changed:\n%s" % (what, diff)


# -- 1. every address answers from outside the VPC ---------------------------------

@pytest.mark.parametrize("rp_filter", [0, 1], ids=["rp_filter=0", "rp_filter=1"])
def test_every_address_answers_icmp_and_tcp_from_the_internet(make_lab, rp_filter):
    lab = make_lab(enis=2, addresses=2, rp_filter=rp_filter)
    eth0, eth1 = lab.enis

    before = lab.reachability(lab.addresses())
    assert {a: before[a] for a in lab.addresses(eth0)} == {a: BOTH for a in lab.addresses(eth0)}
    # replies from eth1's addresses leave via eth0 (main's default) and the VPC drops them
    assert {a: before[a] for a in lab.addresses(eth1)} == {a: NEITHER for a in lab.addresses(eth1)}
    if not rp_filter:  # (strict rp_filter drops the requests already, in the instance)
        assert lab.dropped(eth0) > 0

    applied(lab)
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}


# -- 2. a bound socket leaves through its own ENI -----------------------------------

def test_socket_bound_to_an_eni_address_leaves_through_that_eni(make_lab):
    lab = make_lab(enis=2)
    eth0, eth1 = lab.enis
    routes = {  # (source, destination): why it goes wrong without the tool
        (eth0.addresses4[0], PEER4): "main's connected route sends it out eth1",
        (eth1.addresses4[0], CLIENT4): "main's default sends it out eth0",
        (eth1.addresses6[0], CLIENT6): "main's IPv6 default (lowest metric) is eth0's",
    }
    assert lab.paths(list(routes)) == {route: NEITHER for route in routes}, routes

    applied(lab)
    drops = [lab.dropped(eni) for eni in lab.enis]
    assert lab.paths(list(routes)) == {route: BOTH for route in routes}
    assert [lab.dropped(eni) for eni in lab.enis] == drops, "a packet left through the wrong ENI"


# -- 3. a DNAT-published service on a secondary address ----------------------------

def test_dnat_service_on_a_secondary_address_answers(make_lab):
    lab = make_lab(enis=2, addresses=2, container=True)
    assert lab.dnat_address == "203.0.113.11"  # eth1's secondary

    assert tcp_answer(lab.client, lab.dnat_address, DNAT_PORT, timeout=1) is None
    applied(lab)
    # the container greets with its own address: the connection went all the way
    assert tcp_answer(lab.client, lab.dnat_address, DNAT_PORT) == CONTAINER4


# -- 4. local networks that are not ENIs keep working -----------------------------

def test_container_and_admin_routes_keep_working(make_lab):
    lab = make_lab(enis=2, container=True, admin_link=True)
    secondary = lab.enis[1].addresses4[1]
    eth1_primary = lab.enis[1].addresses4[0]

    def local_paths():
        return {
            "container -> host's secondary address": lab.tcp_ok(lab.container, secondary),
            "container -> internet (masqueraded)": lab.tcp_ok(lab.container, CLIENT4),
            "admin route in main": lab.tcp_ok(lab.instance, VPN_HOST),
            "admin route in main, from eth1's address": lab.tcp_ok(lab.instance, VPN_HOST,
                                                                   bind=eth1_primary),
        }

    before = local_paths()
    assert all(before.values()), before
    applied(lab)
    after = local_paths()
    assert all(after.values()), after
    route = lab.run(lab.instance, "ip", "route", "get", VPN_HOST, "from", eth1_primary).stdout
    assert " dev vpn0 " in route, route


# -- 5. two ENIs in one subnet --------------------------------------------------------

def test_two_enis_in_one_subnet_answer_through_their_own_eni(make_lab):
    lab = make_lab(enis=2, same_subnet=True)
    eth0, eth1 = lab.enis
    assert eth0.subnet4 == eth1.subnet4 and eth0.subnet6 == eth1.subnet6

    before = lab.reachability(lab.addresses())
    assert {a: before[a] for a in lab.addresses(eth1)} == {a: NEITHER for a in lab.addresses(eth1)}
    assert not lab.tcp_ok(lab.instance, PEER4, bind=eth1.addresses4[0], timeout=1)

    applied(lab)
    drops = [lab.dropped(eni) for eni in lab.enis]
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}
    assert lab.tcp_ok(lab.instance, PEER4, bind=eth1.addresses4[0])
    assert lab.tcp_ok(lab.instance, PEER4, bind=eth0.addresses4[0])
    assert [lab.dropped(eni) for eni in lab.enis] == drops, "a packet left through the wrong ENI"


# -- 6. established sessions, the main table and IMDS survive -------------------------

def test_established_session_survives_apply_reapply_and_flush(make_lab):
    lab = make_lab(enis=2)
    eth0 = lab.enis[0]
    sessions = [lab.session(lab.client, eth0.addresses4[0]),
                lab.session(lab.client, eth0.addresses6[0])]
    assert all(s.exchange("before") for s in sessions)
    main_before = lab.main_tables()

    for step in ["apply", "re-apply", "flush"]:
        applied(lab, *(["--flush"] if step == "flush" else []))
        assert [s.exchange("after " + step) for s in sessions] == [True, True], step
        assert lab.main_tables() == main_before, "main table changed by " + step
        assert lab.imds_reachable(), "IMDS unreachable after " + step


# -- 7. gateways of the per-ENI tables ------------------------------------------------

@pytest.mark.parametrize("ra_router", ["fe80::1", "fe80::a:1"])
def test_per_eni_tables_route_via_the_subnet_router_and_the_ra_router(make_lab, ra_router):
    lab = make_lab(enis=2, ra_router=ra_router)
    applied(lab)
    for eni in lab.enis:
        table = str(22000 + eni.device_number)
        for family, gateway in [("-4", eni.gateway4), ("-6", ra_router)]:
            routes = json.loads(lab.run(lab.instance, "ip", "-j", family, "route", "show",
                                        "table", table).stdout)
            defaults = [(r.get("gateway"), r.get("dev")) for r in routes if r["dst"] == "default"]
            assert defaults == [(gateway, eni.name)], (family, table, routes)


# -- 8. foreign state is untouched ------------------------------------------------------

def add_foreign_state(lab):
    """What other software leaves behind: rules, tables and chains without the
    tool's markers, some inside its priority and table ranges."""
    eth0 = lab.enis[0]
    lab.ip(lab.instance,
           "rule add pref 100 from 198.51.100.99 lookup 100",
           "rule add pref 20150 from 198.51.100.98 lookup 150 protocol static",
           "-6 rule add pref 100 from 2001:db8:a::99 lookup 100",
           "route add 198.18.50.0/24 via %s dev eth0 table 100" % eth0.gateway4,
           "route add 198.18.51.0/24 via %s dev eth0 table 22500 proto static" % eth0.gateway4,
           "route add 198.18.52.0/24 via %s dev eth0 table 22000 proto static" % eth0.gateway4)
    lab.iptables_restore(lab.instance, flush=False, rules="\n".join([
        "*mangle",
        ":KUBE-KUBELET-CANARY -",
        "-A PREROUTING -i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype "
        "--dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80",
        "-A PREROUTING -i eth0 -m comment --comment \"AWS, primary ENI\" "
        "-j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80",
        "COMMIT",
        "*nat",
        ":KUBE-MARK-MASQ -", ":KUBE-POSTROUTING -",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
        "COMMIT",
        "*filter",
        ":KUBE-FIREWALL -",
        "-A INPUT -j KUBE-FIREWALL",
        "-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP",
        "COMMIT", ""]))
    lab.iptables_restore(lab.instance, v6=True, flush=False, rules="\n".join([
        "*mangle", ":KUBE-KUBELET-CANARY -",
        "-A PREROUTING -m comment --comment foreign -j MARK --set-xmark 0x80000/0x80000",
        "COMMIT", ""]))


def test_foreign_rules_tables_and_chains_are_untouched(make_lab):
    lab = make_lab(enis=2, container=True)  # the container brings Docker's chains
    add_foreign_state(lab)
    before = lab.snapshot()

    applied(lab)
    assert_same(foreign_only(before, lab.enis), foreign_only(lab.snapshot(), lab.enis),
                "foreign state after apply")
    applied(lab, "--flush")
    assert_same(before, lab.snapshot(), "the instance after apply + flush")


def test_flush_after_an_eni_was_detached_removes_all_tool_state(make_lab):
    lab = make_lab(enis=3)
    before = lab.snapshot()
    applied(lab)
    eth2 = lab.enis[2]
    lab.detach_eni(eth2)

    applied(lab, "--flush")
    after = lab.snapshot()
    assert tool_lines(after) == []
    assert_same(without(before, eth2.name), after, "the instance (but eth2) after flush")


# -- 9. idempotent, and converging on changes ----------------------------------------

def test_second_apply_changes_nothing(lab):
    applied(lab)
    first = lab.snapshot()
    second = applied(lab)
    assert "in sync" in second.stdout
    assert_same(first, lab.snapshot(), "the instance after a second apply")


def test_an_address_added_while_applied_sends_through_its_eni_before_the_tool_runs_again(lab):
    eth1 = lab.enis[1]
    new = ["203.0.113.12", "2001:db8:b::12"]

    def outgoing_from_new():
        return [lab.tcp_ok(lab.instance, client, bind=address, timeout=1)
                for address, client in zip(new, [CLIENT4, CLIENT6])]

    for address in new:  # without the tool: they leave through eth0 and are dropped
        lab.add_address(eth1, address)
    assert outgoing_from_new() == [False, False]
    for address in new:
        lab.remove_address(eth1, address)

    applied(lab)
    baseline = lab.snapshot()
    for address in new:
        lab.add_address(eth1, address)
    # eth1's subnet rule covers them already: no run of the tool, no new rule
    assert outgoing_from_new() == [True, True]
    assert lab.reachability(new) == {a: BOTH for a in new}
    assert "in sync" in applied(lab).stdout

    for address in new:
        lab.remove_address(eth1, address)
    applied(lab)
    assert_same(baseline, lab.snapshot(), "the instance after removing the addresses again")


def test_hotplugged_eni_converges_and_leaves_no_trace_when_gone(lab):
    applied(lab)
    baseline = lab.snapshot()

    eth2 = lab.attach_eni(addresses=2)
    assert lab.reachability(lab.addresses(eth2)) == {a: NEITHER for a in lab.addresses(eth2)}
    applied(lab)
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}

    lab.detach_eni(eth2)
    applied(lab)
    assert_same(baseline, lab.snapshot(), "the instance after the ENI left again")


# -- 10. fail-safe ----------------------------------------------------------------------

def test_concurrent_runs_are_serialized(lab):
    runs = [lab.popen_tool(), lab.popen_tool()]
    results = [run.communicate_result() for run in runs]
    assert [r.rc for r in results] == [0, 0], results
    assert "in sync" in applied(lab).stdout
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}


def test_failure_in_any_batch_rolls_back_to_the_state_before(make_lab):
    lab = make_lab(enis=2, container=True)
    before = lab.snapshot()
    failed = 0
    for n in itertools.count(1):
        result = lab.run_tool(env={"MULTI_ENI_ROUTING_FAIL_AFTER": str(n)})
        if result.rc == 0:
            break  # N is past the last batch: a normal apply
        assert result.rc == 1, result
        assert_same(before, lab.snapshot(), "the instance after batch %d failed" % n)
        failed += 1
        assert n < 20, "the failure hook never stops failing"
    # docs/DESIGN.md: ip -4, ip -6, iptables-restore, ip6tables-restore, sysctls
    assert failed == 5, "expected a failure after each of the 5 batches, got %d" % failed
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}
    applied(lab, "--flush")
    assert_same(before, lab.snapshot(), "the instance after the final flush")


def test_a_flush_that_fails_half_way_removes_the_rest_instead_of_rolling_back(make_lab):
    """A stop must remove the routing: a flush that fails after a batch (here
    the failure hook; on a machine, a network manager deleting one of the
    tool's routes at the same moment) was rolled back, so the routing stayed."""
    lab = make_lab(enis=2)
    before = lab.snapshot()
    for n in range(1, 6):  # after each of the batches, and after the sysctls
        applied(lab)
        result = lab.run_tool("--flush", env={"MULTI_ENI_ROUTING_FAIL_AFTER": str(n)})
        assert result.rc == 0, result
        assert "flushed on a second attempt" in result.stderr or n == 5, result
        assert_same(before, lab.snapshot(), "the instance after a flush that failed after step %d" % n)


def test_status_exit_codes_not_applied_in_sync_stale(lab):
    assert lab.run_tool("--status").rc == 3
    applied(lab)
    assert lab.run_tool("--status").rc == 0
    # someone (a network manager, say) removes one of the tool's rules
    lab.ip(lab.instance, "rule del pref 20000 table 22000")
    stale = lab.run_tool("--status", "--json")
    assert stale.rc == 1, stale
    report = json.loads(stale.stdout)
    assert report["applied"] and not report["in_sync"]
    applied(lab)
    assert lab.run_tool("--status").rc == 0


def test_dry_run_changes_nothing(lab):
    before = lab.snapshot()
    result = lab.run_tool("--dry-run")
    assert result.rc == 0, result
    assert "rule add" in result.stdout
    assert_same(before, lab.snapshot(), "the instance after --dry-run")
    assert lab.run_tool("--status").rc == 3


# -- without IMDS -----------------------------------------------------------------------

def test_without_imds_named_interfaces_work_and_imds_is_given_up_quickly(make_lab):
    lab = make_lab(enis=2, imds="absent")
    assert not lab.imds_reachable(timeout=0.5)

    started = time.monotonic()
    result = lab.run_tool("-i", "eth0", "-i", "eth1")
    elapsed = time.monotonic() - started
    assert result.rc == 0, result
    assert elapsed < 3, "the run took %.1f s with IMDS unreachable" % elapsed
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}


# -- IMDS answering badly -------------------------------------------------------------------

def found_by(lab):
    """{ENI name: how the tool found it} from --status --json."""
    status = lab.run_tool("--status", "--json")
    return {eni["name"]: eni["found_by"] for eni in json.loads(status.stdout)["enis"]}


# In these labs only the primary addresses are configured: the secondaries
# answer only if the tool got them from IMDS.

def test_imdsv1_is_used_when_the_token_call_is_unknown(make_lab):
    lab = make_lab(enis=2, imds="v1", configure_secondaries=False)
    applied(lab)
    assert found_by(lab) == {"eth0": "imds", "eth1": "imds"}
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}


def test_imds_over_ipv6_when_the_ipv4_endpoint_is_silent(make_lab):
    lab = make_lab(enis=2, imds="v6-only", configure_secondaries=False)
    applied(lab)
    assert found_by(lab) == {"eth0": "imds", "eth1": "imds"}
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}


def test_throttling_and_a_not_yet_propagated_eni_are_retried(make_lab):
    lab = make_lab(enis=2, configure_secondaries=False)
    eth1 = lab.enis[1]
    lab.imds.misbehave(throttle_first=3, mac_404_first={eth1.mac: 2})
    applied(lab)
    assert len(lab.imds.requests()) < 60, "a retry storm"
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}


def test_an_ipv6_only_eni_is_routed_without_waiting_for_its_ipv4(make_lab):
    """IMDS lists no local-ipv4s for eth1 (an IPv6-only ENI): that is the answer,
    not a delay to wait out under the lock (it took 4.6 of the 5 s)."""
    lab = make_lab(enis=2, configure_secondaries=False)
    eth1 = lab.enis[1]
    for key in ("local-ipv4s", "subnet-ipv4-cidr-block"):
        lab.imds.override("network/interfaces/macs/%s/%s" % (eth1.mac, key), "")
    started = time.monotonic()
    applied(lab, "--imds-timeout", "5")
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, "the run took %.1f s" % elapsed
    assert found_by(lab)["eth1"] == "imds"
    assert lab.reachability(eth1.addresses6) == {a: BOTH for a in eth1.addresses6}
    assert not [r for r in lab.imds.requests() if r["status"] == 404]


def break_imds(lab, how):
    eth1 = lab.enis[1]
    local_ipv4s = "network/interfaces/macs/%s/local-ipv4s" % eth1.mac
    if how == "silent":
        lab.imds.go_silent()
    elif how == "404 forever":
        lab.imds.misbehave(mac_404_first={eth1.mac: 10 ** 9})
    else:
        lab.imds.override(local_ipv4s, {"junk": "not an address\n\x01\x02",
                                        "wrong family": eth1.addresses6[0],
                                        "huge": {"huge": 5 * 1024 * 1024}}[how])


@pytest.mark.parametrize("how, configured", [
    ("silent", True),  # every address configured on the interfaces
    # only the primaries configured: the tool added the rest from IMDS
    ("silent", False), ("404 forever", False), ("junk", False), ("wrong family", False),
    ("huge", False)])
def test_a_broken_imds_answer_changes_nothing_already_routed(make_lab, how, configured):
    lab = make_lab(enis=2, configure_secondaries=configured)
    applied(lab)
    routed = lab.snapshot()

    break_imds(lab, how)
    result = lab.run_tool("--imds-timeout", "1")
    assert result.rc == 0, result
    assert "Traceback" not in result.stderr
    assert_same(routed, lab.snapshot(), "the instance after IMDS answered badly (%s)" % how)
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}


def test_addresses_only_imds_knows_are_added_routed_and_given_back(make_lab):
    lab = make_lab(enis=2, configure_secondaries=False)
    eth1 = lab.enis[1]
    before = lab.snapshot()
    secondaries = [eth1.addresses4[1], eth1.addresses6[1]]
    assert lab.reachability(secondaries) == {a: NEITHER for a in secondaries}

    applied(lab)
    addresses = lab.run(lab.instance, "ip", "-o", "addr", "show", "dev", "eth1").stdout
    assert " %s/32 " % secondaries[0] in addresses and " %s/128 " % secondaries[1] in addresses
    assert lab.reachability(secondaries) == {a: BOTH for a in secondaries}

    lab.remove_address(eth1, secondaries[0], on_instance=False)  # unassigned in the VPC
    applied(lab)
    assert secondaries[0] not in lab.run(lab.instance, "ip", "-o", "addr").stdout
    applied(lab, "--flush")
    assert_same(before, lab.snapshot(), "the instance after flush")


def test_admin_addresses_are_never_removed_and_flush_gives_back_what_imds_dropped(make_lab):
    lab = make_lab(enis=2, configure_secondaries=False)
    eth1 = lab.enis[1]
    added, listed_and_by_hand = eth1.addresses4[1], "203.0.113.12"
    lab.add_address(eth1, listed_and_by_hand, on_instance=False)
    by_hand_only = "203.0.113.13"
    lab.ip(lab.instance, "address add %s/24 dev eth1" % listed_and_by_hand)  # the admin's own
    lab.ip(lab.instance, "address add %s/32 dev eth1" % by_hand_only)
    before = lab.snapshot()

    applied(lab)
    addresses = lab.run(lab.instance, "ip", "-o", "-4", "addr", "show", "dev", "eth1").stdout
    assert " %s/32 " % added in addresses  # only IMDS knew it: the tool added it
    assert addresses.count(listed_and_by_hand) == 1  # configured already: not added twice

    # Unassigned in the VPC: IMDS stops listing both. The tool's own address goes
    # with the flush although IMDS no longer names it; the admin's stay.
    lab.remove_address(eth1, added, on_instance=False)
    lab.remove_address(eth1, listed_and_by_hand, on_instance=False)
    applied(lab, "--flush")
    addresses = lab.run(lab.instance, "ip", "-o", "-4", "addr", "show", "dev", "eth1").stdout
    assert added not in addresses
    assert " %s/24 " % listed_and_by_hand in addresses and " %s/32 " % by_hand_only in addresses
    assert_same(before, lab.snapshot(), "the instance after flush")


# -- other shapes of instance -----------------------------------------------------------------

def test_three_enis_with_predictable_names(make_lab):
    lab = make_lab(enis=3, names="ens")
    assert [eni.name for eni in lab.enis] == ["ens5", "ens6", "ens7"]
    applied(lab)
    assert lab.reachability(lab.addresses()) == {a: BOTH for a in lab.addresses()}
    tables = lab.run(lab.instance, "ip", "rule").stdout
    assert all("lookup %d" % (22000 + eni.device_number) in tables for eni in lab.enis)


def test_an_eni_that_is_down_does_not_stop_the_others_and_is_routed_once_up(make_lab):
    lab = make_lab(enis=3)
    eth1, eth2 = lab.enis[1], lab.enis[2]
    lab.ip(lab.instance, "link set %s down" % eth2.name)
    applied(lab)
    assert lab.reachability(eth1.addresses4) == {a: BOTH for a in eth1.addresses4}
    assert "22002" not in lab.run(lab.instance, "ip", "rule").stdout

    lab.ip(lab.instance, "link set %s up" % eth2.name)
    assert lab.reachability(eth2.addresses4) == {a: NEITHER for a in eth2.addresses4}
    applied(lab)
    assert lab.reachability(eth2.addresses4) == {a: BOTH for a in eth2.addresses4}


def test_pod_on_a_delegated_prefix_is_answered_through_its_eni(make_lab):
    """A pod using an address of eth1's delegated /28 and /80, routed by the
    instance like a CNI does: its replies must leave through eth1."""
    lab = make_lab(enis=2)
    eth1 = lab.enis[1]
    lab.delegate_prefix(eth1, "203.0.113.48/28")
    lab.delegate_prefix(eth1, "2001:db8:b:0:1234::/80")
    pod4, pod6 = "203.0.113.49", "2001:db8:b:0:1234::5"
    lab.add_pod(pod4, pod6)
    drops = lab.dropped(lab.enis[0])
    assert lab.reachability([pod4, pod6]) == {pod4: NEITHER, pod6: NEITHER}
    assert lab.dropped(lab.enis[0]) > drops  # the replies left through eth0: the VPC dropped them

    applied(lab)
    assert lab.reachability([pod4, pod6]) == {pod4: BOTH, pod6: BOTH}
    rules = lab.run(lab.instance, "ip", "rule").stdout + lab.run(lab.instance, "ip", "-6", "rule").stdout
    assert "from 203.0.113.48/28 lookup 22001" in rules and "from 2001:db8:b:0:1234::/80 lookup 22001" in rules
    addresses = lab.run(lab.instance, "ip", "-o", "addr").stdout
    assert pod4 not in addresses and "2001:db8:b:0:1234" not in addresses  # the host does not take them


def test_a_foreign_route_in_the_tools_table_range_is_not_overwritten(make_lab):
    lab = make_lab(enis=2)
    lab.ip(lab.instance, "route add default via 203.0.113.254 dev eth1 table 22001 proto static")
    before = lab.snapshot()
    result = lab.run_tool()
    assert result.rc == 1 and "File exists" in result.stderr and "rolled back" in result.stderr
    assert_same(before, lab.snapshot(), "the instance after a refused apply")
