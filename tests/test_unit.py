"""Unit tests: discovery parsing, ENI selection, planning and diffing, from the
recorded instances in tests/fixtures. No root, no network, no programs run."""

import os
import signal
import struct
import time

import pytest

import recorded
from recorded import mer

GOLDEN = os.path.join(recorded.HERE, "golden")
EMPTY = mer.NOTHING


def enis_of(name, use_imds=True, **options):
    return mer.select_enis(recorded.system(name), recorded.imds(name) if use_imds else None, **options)


def v4(eni):
    return eni.families[4]


def v6(eni):
    return eni.families[6]


NO_CHANGES = mer.NO_CHANGES


# -- Golden plans: an apply on each recorded instance as it is, command by command:
# a first apply, or on the applied ones the diff against their state (applied-2eni
# is in sync: its golden plan is empty; applied-v1 is upgraded in place). ----------

@pytest.mark.parametrize("name", recorded.NAMES)
def test_an_apply_on_each_recorded_instance_matches_its_golden_plan(name):
    commands = "\n".join(recorded.plan_commands(name)) + "\n"
    path = os.path.join(GOLDEN, name + ".txt")
    if os.environ.get("UPDATE_GOLDEN"):
        with open(path, "w") as handle:
            handle.write(commands)
    with open(path) as handle:
        assert commands == handle.read(), "plan changed: review, then UPDATE_GOLDEN=1"


# -- Discovery parsing. --------------------------------------------------------------

def test_links_carry_mac_and_global_addresses_only():
    links = {link.name: link for link in recorded.system("docker-host").links}
    assert links["eth0"].mac == "02:00:00:00:00:01"
    assert links["eth0"].addresses[4] == (("198.51.100.10", 24), ("198.51.100.99", 24))
    assert not any(a.ip.startswith("fe80:") for link in links.values() for a in link.addresses[6])
    assert links["eth0"].group == 0


def test_only_the_tools_own_rules_routes_and_chains_are_read_as_owned():
    foreign = recorded.system("docker-host")  # has a foreign rule, table 100, KUBE-MARK
    assert foreign.rules == [] and foreign.routes == []
    assert foreign.mangle[4] == mer.NO_MANGLE
    assert mer.ForeignRule(4, 100, "198.51.100.99/32", None) in foreign.foreign_rules
    applied = recorded.system("applied-2eni")
    assert {r.priority for r in applied.rules} == {20000, 20001, 20200, 20300, 20301}
    assert {r.table for r in applied.routes} == {22000, 22001}
    assert dict(applied.mangle[4].chains).keys() == {mer.CHAIN_PREROUTING}
    assert [j.split(" ")[0] for j in applied.mangle[4].jumps] == ["OUTPUT", "PREROUTING", "PREROUTING"]
    old = recorded.system("applied-v2")  # the layout before issue 16: both chains are the tool's
    assert dict(old.mangle[4].chains).keys() == {mer.CHAIN_PREROUTING, mer.CHAIN_OUTPUT}
    assert {link.name for link in applied.links if link.group == mer.ENI_GROUP} == {"eth0", "eth1"}


def test_main_table_gives_gateways_and_connected_subnets():
    routes = recorded.system("nitro-ens5-ens6-ens7").main_routes
    defaults = {(r.family, r.dev): r.gateway for r in routes if r.dst == "default"}
    assert defaults[(4, "ens5")] == "198.51.100.1"
    assert defaults[(6, "ens6")] == "fe80::1"


def test_rule_fields_are_normalised():
    data = [{"priority": 20302, "src": "203.0.113.48", "srclen": 28, "table": "22002", "protocol": "231"},
            {"priority": 20300, "src": "198.51.100.0", "srclen": 24, "iif": "lo", "table": "22000",
             "protocol": "231"},
            {"priority": 20000, "src": "all", "fwmark": "0x100", "fwmask": "0x3f00", "table": "22000",
             "protocol": "231"},
            {"priority": 20200, "src": "all", "table": "main", "suppress_ifgroup": "231", "protocol": "231"},
            {"priority": 20200, "src": "all", "table": "main", "suppress_prefixlen": 0, "protocol": "231"},
            {"priority": 100, "src": "198.51.100.99", "table": "100"},
            {"priority": 512, "src": "all", "dst": "203.0.113.77", "table": "main"}]
    assert mer.parse_rules(data, 4) == [
        mer.rule(4, 20302, 22002, src="203.0.113.48/28"),
        mer.rule(4, 20300, 22000, src="198.51.100.0/24", iif="lo"),
        mer.rule(4, 20000, 22000, fwmark="0x100/0x3f00"),
        mer.rule(4, 20200, mer.TABLE_MAIN, suppress_ifgroup=231),
        mer.Rule(4, 20200, None, None, None, mer.TABLE_MAIN, 0, None),  # version 1's, to be removed
        mer.ForeignRule(4, 100, "198.51.100.99/32", None),
        mer.ForeignRule(4, 512, None, "203.0.113.77/32")]


def test_bad_json_from_ip_is_one_clear_error():
    with pytest.raises(mer.ToolError, match="could not parse the JSON output of ip address"):
        mer.load_json("Error: something", "ip address")


# -- Choosing the ENIs. --------------------------------------------------------------

def test_imds_picks_enis_by_mac_with_stable_numbers():
    enis = enis_of("nitro-ens5-ens6-ens7")
    assert [(e.name, e.device_number, mer.table_of(e)) for e in enis] == [
        ("ens5", 0, 22000), ("ens6", 1, 22001), ("ens7", 2, 22002)]


def test_without_imds_only_nics_with_an_eni_driver_are_enis():
    enis = enis_of("docker-host", use_imds=False)
    assert [e.name for e in enis] == ["eth0", "eth1"]
    assert enis[0].origin == "local"


def test_interface_option_orders_and_exclude_removes():
    system = recorded.system("xen-eth0-eth1")
    assert [e.name for e in mer.select_enis(system, None, include=["eth1", "eth0"])] == ["eth1", "eth0"]
    assert [e.name for e in mer.select_enis(system, None, exclude=["eth1"])] == ["eth0"]


def test_imds_only_secondary_address_is_added_and_routed():
    ens6 = enis_of("nitro-ens5-ens6-ens7")[1]
    assert v4(ens6).added == ("198.51.100.141",)
    assert "198.51.100.141" in v4(ens6).addresses
    assert v4(enis_of("nitro-ens5-ens6-ens7", add_from_imds=False)[1]).added == ()


def with_addresses(meta, family, addresses):
    """META (an ImdsEni) with other addresses of FAMILY."""
    families = dict(meta.families)
    families[family] = families[family]._replace(addresses=addresses)
    return meta._replace(families=families)


def test_address_added_earlier_and_dropped_by_imds_is_neither_kept_nor_routed():
    system = recorded.system("xen-eth0-eth1")  # 198.51.100.11 is configured on eth0
    imds = recorded.imds("xen-eth0-eth1")
    eth0_meta = with_addresses(imds.enis["02:00:00:00:00:01"], 4, ("198.51.100.10",))
    imds = imds._replace(enis=dict(imds.enis, **{"02:00:00:00:00:01": eth0_meta}))
    ours = frozenset([mer.Address("eth0", "198.51.100.11/32")])
    eth0 = mer.select_enis(system, imds, owned_addresses=ours)[0]
    assert "198.51.100.11" not in v4(eth0).addresses
    # ... while one the admin configured stays routed whatever IMDS says.
    eth0 = mer.select_enis(system, imds)[0]
    assert "198.51.100.11" in v4(eth0).addresses


def test_address_added_earlier_is_kept_when_imds_does_not_answer():
    system = recorded.system("xen-eth0-eth1")
    ours = frozenset([mer.Address("eth0", "198.51.100.11/32")])
    eth0 = mer.select_enis(system, None, owned_addresses=ours)[0]
    assert "198.51.100.11" in v4(eth0).addresses and v4(eth0).added == ("198.51.100.11",)


def test_routed_eni_missing_from_imds_keeps_its_table():
    system = recorded.system("applied-2eni")
    imds = recorded.imds("applied-2eni")
    imds = imds._replace(enis={imds.primary_mac: imds.enis[imds.primary_mac]})  # eth1 not listed
    enis = mer.select_enis(system, imds)
    assert [(e.name, mer.table_of(e)) for e in enis] == [("eth0", 22000), ("eth1", 22001)]


# -- Planning. -----------------------------------------------------------------------

def test_single_eni_needs_no_policy_routing():
    desired = mer.plan(enis_of("single-eni"))
    assert not desired.rules and not desired.routes and desired.mangle == mer.NOTHING.mangle


def test_each_eni_table_routes_via_its_own_gateway():
    enis = enis_of("nitro-ens5-ens6-ens7")
    desired = mer.plan(enis)
    defaults = {(r.family, r.dev): r.gateway for r in desired.routes if r.dst == "default"}
    assert defaults == {(4, "ens5"): "198.51.100.1", (4, "ens6"): "198.51.100.129",
                        (4, "ens7"): "203.0.113.1", (6, "ens5"): "fe80::1", (6, "ens6"): "fe80::1"}


def test_same_subnet_enis_each_route_their_subnet_through_themselves():
    desired = mer.plan(enis_of("same-subnet"))
    subnet_routes = {(r.table, r.dev) for r in desired.routes if r.dst == "203.0.113.0/24"}
    assert subnet_routes == {(22000, "enX0"), (22001, "enX1")}
    # the subnet is not one ENI's: its addresses are chosen one by one, from any iif
    sources = {(r.src, r.iif, r.table) for r in desired.rules if r.priority >= mer.PRIO_SOURCE}
    assert sources == {("203.0.113.10/32", None, 22000), ("203.0.113.20/32", None, 22001)}


def test_a_subnet_of_one_eni_is_one_rule_for_what_the_host_sends_whatever_its_addresses():
    desired = mer.plan(enis_of("xen-eth0-eth1"))  # eth0 has two addresses, eth1 one
    sources = sorted((r.priority, r.src, r.iif) for r in desired.rules if r.src)
    assert sources == [(20300, "198.51.100.0/24", "lo"), (20301, "203.0.113.0/24", "lo")]


def test_main_wins_unless_its_route_goes_through_an_eni():
    desired = mer.plan(enis_of("xen-eth0-eth1"))
    main = [r for r in desired.rules if r.table == mer.TABLE_MAIN]
    assert main == [mer.rule(4, mer.PRIO_MAIN, mer.TABLE_MAIN, suppress_ifgroup=mer.ENI_GROUP)]
    assert all(r.priority > mer.PRIO_MAIN for r in desired.rules if r.src)
    assert desired.groups == {"eth0", "eth1"}


def test_a_link_in_someone_elses_group_keeps_it():
    enis = enis_of("xen-eth0-eth1")
    assert mer.plan(enis, groups={"eth0": 7, "eth1": 0}).groups == {"eth1"}


def test_rules_grow_with_enis_not_with_addresses():
    system = recorded.system("xen-eth0-eth1")
    eth1 = next(link for link in system.links if link.name == "eth1")
    many = eth1._replace(addresses={4: eth1.addresses[4] + tuple(
        mer.LinkAddress("203.0.113.%d" % n, 24) for n in range(20, 70)), 6: ()})
    crowded = system._replace(links=[many if link.name == "eth1" else link for link in system.links])
    assert len(mer.plan(mer.select_enis(crowded, None)).rules) == len(mer.plan(enis_of("xen-eth0-eth1")).rules) == 5


def test_an_address_outside_its_enis_subnets_gets_its_own_rule_and_takes_the_subnet_from_no_one():
    system = recorded.system("xen-eth0-eth1")
    eth1 = next(link for link in system.links if link.name == "eth1")
    stray = eth1._replace(addresses={4: eth1.addresses[4] + (mer.LinkAddress("198.51.100.77", 32),), 6: ()})
    mixed = system._replace(links=[stray if link.name == "eth1" else link for link in system.links])
    sources = {(r.src, r.iif, r.table) for r in mer.plan(mer.select_enis(mixed, recorded.imds("xen-eth0-eth1"))).rules
               if r.src}
    # eth0's subnet now holds an address of eth1's: both go address by address
    assert sources == {("198.51.100.10/32", None, 22000), ("198.51.100.11/32", None, 22000),
                       ("203.0.113.0/24", "lo", 22001), ("198.51.100.77/32", None, 22001)}


def test_delegated_prefixes_get_source_rules_but_no_address():
    desired = mer.plan(enis_of("nitro-ens5-ens6-ens7"))
    assert {r.src for r in desired.rules if r.table == 22002} >= {"203.0.113.48/28"}
    assert {r.src for r in desired.rules if r.table == 22001 and r.family == 6} >= {"2001:db8:b:0:1234::/80"}
    assert not any("/28" in a.cidr or "/80" in a.cidr for a in desired.addresses)


def test_marks_stay_inside_the_mask_and_clear_of_other_users():
    desired = mer.plan(enis_of("nitro-ens5-ens6-ens7"))
    for rule in desired.rules:
        if rule.fwmark:
            value, mask = (int(x, 16) for x in rule.fwmark.split("/"))
            assert mask == 0xFFFFFFFF  # exactly the ENI's mark: no foreign mark selects its table
            assert value & ~mer.DEFAULT_MARK_MASK == 0 and value and value != mer.DEFAULT_MARK_MASK
            assert not value & (0x4000 | 0x8000 | 0x80 | 0xFFFF0000)


def test_a_custom_mark_mask_is_used_and_one_too_small_is_refused():
    enis = enis_of("nitro-ens5-ens6-ens7")
    assert {r.fwmark for r in mer.plan(enis, 0xF0000).rules if r.fwmark} == {
        "0x10000/0xffffffff", "0x20000/0xffffffff", "0x30000/0xffffffff"}
    assert "-i ens5 -j CONNMARK --set-xmark 0x10000/0xf0000" in dict(mer.plan(enis, 0xF0000).mangle[4].chains)[
        mer.CHAIN_PREROUTING]
    # the mask's highest value means "seen, not from an ENI"
    assert mer.mark_capacity(0x300) == 2 and mer.mark_capacity(mer.DEFAULT_MARK_MASK) == 62
    with pytest.raises(mer.ToolError, match="3 ENIs, but room for 2"):
        enis_of("nitro-ens5-ens6-ens7", max_slots=mer.mark_capacity(0x300))


def test_mark_mask_option_wants_one_run_of_bits():
    assert mer.parse_args(["--mark-mask", "0xf00"]).mark_mask == 0xF00
    with pytest.raises(mer.UsageError, match="one run of set bits"):
        mer.parse_args(["--mark-mask", "0x101"])


@pytest.mark.parametrize("mask, why", [("0xffffffff", "fewer than all 32 bits"), ("0x100", "two bits or more")])
def test_a_mark_mask_that_cannot_work_is_refused_at_parse_time(mask, why):
    """0xffffffff was accepted, then every apply failed its verification
    (iptables-save prints full masks as its defaults) and rolled back."""
    with pytest.raises(mer.UsageError, match=why):
        mer.parse_args(["--mark-mask", mask])


def test_rp_filter_loose_on_every_routed_eni():
    desired = mer.plan(enis_of("xen-eth0-eth1"))
    assert desired.sysctls == {"net/ipv4/conf/eth0/rp_filter": "2", "net/ipv4/conf/eth1/rp_filter": "2"}


# -- Diffing. ------------------------------------------------------------------------

def applied():
    system = recorded.system("applied-2eni")
    record = mer.record_of({"sysctls": {"net/ipv4/conf/eth%d/rp_filter" % n: {"original": "1", "set": "2"}
                                        for n in (0, 1)}})
    return system, record, mer.owned_state(system, record)


def test_recorded_applied_instance_is_in_sync():
    system, record, owned = applied()
    desired = mer.plan(mer.select_enis(system, recorded.imds("applied-2eni")))
    values = {key: "2" for key in desired.sysctls}
    assert mer.render(mer.diff(desired, owned, values, mer.originals_of(record))) == []


def test_flush_removes_exactly_what_is_owned_and_gives_sysctls_back():
    system, record, owned = applied()
    values = {key: "2" for key in owned.sysctls}
    commands = mer.render(mer.diff(EMPTY, owned, values, mer.originals_of(record)))
    assert all("protocol 231" in c for c in commands if " rule " in c)
    assert all("proto 231" in c and "table 2200" in c for c in commands if " route " in c)
    assert len([c for c in commands if " rule del " in c]) == len(system.rules)
    assert len([c for c in commands if " route del " in c]) == len(system.routes)
    assert commands[-2:] == ["sysctl -w net.ipv4.conf.eth0.rp_filter=1",
                             "sysctl -w net.ipv4.conf.eth1.rp_filter=1"]
    assert "iptables -t mangle -X MULTI-ENI-PREROUTING" in commands


def test_sysctl_changed_by_someone_else_since_is_left_alone():
    _, record, owned = applied()
    writes = mer.sysctl_writes({}, owned.sysctls, {"net/ipv4/conf/eth0/rp_filter": "0",
                                                   "net/ipv4/conf/eth1/rp_filter": "2"},
                               mer.originals_of(record))
    assert writes == [("net/ipv4/conf/eth1/rp_filter", "1", "2")]


def test_changes_add_before_they_point_and_remove_the_other_way():
    old = mer.Route(4, 22001, "default", "203.0.113.1", "eth1")
    new = mer.Route(4, 22001, "default", "203.0.113.254", "eth1")
    link = mer.Route(4, 22001, "203.0.113.0/24", None, "eth1")
    rule = mer.rule(4, 20301, 22001, src="203.0.113.10/32")
    gone = mer.rule(4, 20301, 22001, src="203.0.113.11/32")
    desired = EMPTY._replace(routes=frozenset([new, link]), rules=frozenset([rule]),
                             addresses=frozenset([mer.Address("eth1", "203.0.113.12/32")]))
    current = EMPTY._replace(routes=frozenset([old]), rules=frozenset([gone]))
    assert mer.render(mer.diff(desired, current, {}, {})) == [
        "ip -4 address add 203.0.113.12/32 dev eth1  # assigned in IMDS, not configured",
        "ip -4 route add 203.0.113.0/24 dev eth1 table 22001 proto 231",
        "ip -4 route replace default via 203.0.113.254 dev eth1 table 22001 proto 231",
        "ip -4 rule add priority 20301 from 203.0.113.10/32 table 22001 protocol 231",
        "ip -4 rule del priority 20301 from 203.0.113.11/32 table 22001 protocol 231"]


def test_mangle_in_sync_needs_nothing_and_a_duplicate_jump_is_repaired():
    _, _, owned = applied()
    mangle = owned.mangle[4]
    assert mer.mangle_commands(mangle, mangle) == []
    doubled = mangle._replace(jumps=tuple(sorted(mangle.jumps + mangle.jumps[:1])))
    repair = mer.mangle_commands(mangle, doubled)
    assert [line.split(" ")[0] for line in repair if line.startswith(("-D", "-I"))] == ["-D", "-D", "-I"]


# -- The data path (issue 16) and other software's marks (issue 18, item 9). ----------

TAG = "-m comment --comment multi-eni-routing "
# The rules of the layout of issue 16 as the version before this one wrote them:
# the same matches with the marker first (a packet paid for it in every rule).
MARKER_FIRST = (
    "PREROUTING -m comment --comment multi-eni-routing -m conntrack --ctdir REPLY -m connmark ! --mark "
    "0x0/0x3f00 -m connmark ! --mark 0x3f00/0x3f00 -m mark --mark 0x0 -j CONNMARK --restore-mark "
    "--nfmask 0x3f00 --ctmask 0x3f00",
    "PREROUTING -m comment --comment multi-eni-routing -m connmark --mark 0x0/0x3f00 -m conntrack "
    "--ctdir ORIGINAL -j MULTI-ENI-PREROUTING")


def hook_rules(mangle, hook):
    """The tool's rules in one built-in chain, without the chain's name."""
    return [j[len(hook) + 1:] for j in mangle.jumps if j.startswith(hook + " ")]


def test_a_packet_of_a_known_connection_meets_two_rules_and_only_first_packets_the_per_eni_rules():
    mangle = mer.plan(enis_of("multi-card")).mangle[4]  # 5 ENIs
    pre, out = hook_rules(mangle, "PREROUTING"), hook_rules(mangle, "OUTPUT")
    # the marker last, just before the target: a packet a rule turns away is
    # turned away by the rule's first match and never pays for the marker
    assert len(pre) == 2 and len(out) == 1 and all(r.index(TAG) + len(TAG) == r.index("-j ") for r in pre + out)
    # the per-ENI rules: only for a connection that has neither an ENI's mark nor "seen"
    into = [r for r in pre if r.endswith("-j " + mer.CHAIN_PREROUTING)]
    assert into == ["-m connmark --mark 0x0/0x3f00 -m conntrack --ctdir ORIGINAL " + TAG + "-j MULTI-ENI-PREROUTING"]
    assert dict(mangle.chains) == {mer.CHAIN_PREROUTING: tuple(
        ["-i eth%d -j CONNMARK --set-xmark 0x%d00/0x3f00" % (n, n + 1) for n in range(5)]
        + ["-m connmark --mark 0x0/0x3f00 -j CONNMARK --set-xmark 0x3f00/0x3f00"])}
    # the restore: replies only, an ENI's mark only (not 0, not "seen"), onto no mark only
    restore = ("-m conntrack --ctdir REPLY -m connmark ! --mark 0x0/0x3f00 -m connmark ! --mark 0x3f00/0x3f00 "
               "-m mark --mark 0x0 " + TAG + "-j CONNMARK --restore-mark --nfmask 0x3f00 --ctmask 0x3f00")
    assert [r for r in pre if r not in into] == out == [restore]


def test_the_rules_with_the_marker_first_are_replaced_in_one_batch():
    """The version before wrote the same rules with the marker first: they are
    the tool's (found by the marker) and an apply replaces exactly those three."""
    enis = enis_of("xen-eth0-eth1")
    desired = mer.plan(enis).mangle[4]
    older = desired._replace(jumps=tuple(sorted(MARKER_FIRST + ("OUTPUT " + MARKER_FIRST[0].split(" ", 1)[1],))))
    text = "\n".join(["*mangle", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":MULTI-ENI-PREROUTING - [0:0]"]
                     + ["-A " + j for j in older.jumps]
                     + ["-A MULTI-ENI-PREROUTING " + spec for spec in dict(desired.chains)[mer.CHAIN_PREROUTING]]
                     + ["COMMIT"])
    assert mer.parse_mangle(text) == older
    lines = mer.mangle_commands(desired, older)
    verbs = sorted(line.split(" ")[0] for line in lines if not line.startswith("-A "))
    assert verbs == ["-D"] * 3 + ["-F"] + ["-I"] * 3
    assert {line[3:] for line in lines if line.startswith("-D ")} == set(older.jumps)
    assert mer.mangle_commands(desired, desired) == []


def test_the_tools_rules_in_the_hooks_are_found_by_their_comment_and_no_others():
    text = "\n".join([
        "*mangle", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":MULTI-ENI-PREROUTING - [0:0]",
        "-A PREROUTING -m comment --comment multi-eni-routing -m mark --mark 0x0 -j CONNMARK --restore-mark",
        "-A PREROUTING -m comment --comment multi-eni-routing-not -j MARK --set-xmark 0x1/0x1",
        "-A PREROUTING -j MULTI-ENI-PREROUTING",
        "-A OUTPUT -m comment --comment kube -j MARK --set-xmark 0x4000/0x4000",
        "-A MULTI-ENI-PREROUTING -i eth0 -j CONNMARK --set-xmark 0x100/0x3f00", "COMMIT"])
    assert mer.parse_mangle(text) == mer.Mangle(
        ("PREROUTING -j MULTI-ENI-PREROUTING",
         "PREROUTING -m comment --comment multi-eni-routing -m mark --mark 0x0 -j CONNMARK --restore-mark"),
        ((mer.CHAIN_PREROUTING, ("-i eth0 -j CONNMARK --set-xmark 0x100/0x3f00",)),))


def test_an_upgrade_from_the_layout_before_issue_16_replaces_it_and_converges():
    system = recorded.system("applied-v2")
    owned = mer.owned_state(system, mer.EMPTY_RECORD)
    desired = mer.plan(mer.select_enis(system, recorded.imds("applied-v2")),
                       groups={link.name: link.group for link in system.links})
    commands = mer.render(mer.diff(desired, owned, {}, {}))
    mangle = [c for c in commands if c.startswith("iptables")]
    old_jumps = ["iptables -t mangle -D OUTPUT -m comment --comment multi-eni-routing -j MULTI-ENI-OUTPUT",
                 "iptables -t mangle -D PREROUTING -m comment --comment multi-eni-routing -j MULTI-ENI-PREROUTING"]
    assert set(old_jumps) <= set(mangle)
    assert mangle.index(old_jumps[0]) < mangle.index("iptables -t mangle -X MULTI-ENI-OUTPUT")
    assert "iptables -t mangle -F MULTI-ENI-PREROUTING" in mangle
    assert [c for c in commands if "fwmark" in c] == [
        "ip -4 rule add priority 20001 fwmark 0x200/0xffffffff table 22001 protocol 231",
        "ip -4 rule add priority 20000 fwmark 0x100/0xffffffff table 22000 protocol 231",
        "ip -4 rule del priority 20000 fwmark 0x100/0x3f00 table 22000 protocol 231",
        "ip -4 rule del priority 20001 fwmark 0x200/0x3f00 table 22001 protocol 231"]
    now = mer.owned_state(recorded.system("applied-2eni"), mer.EMPTY_RECORD)  # what the new layout reads back as
    assert now.mangle == desired.mangle and now.rules == desired.rules
    flush = mer.render(mer.diff(EMPTY, owned, {}, {}))  # a flush of the old layout removes all of it
    assert {"iptables -t mangle -X MULTI-ENI-OUTPUT", "iptables -t mangle -X MULTI-ENI-PREROUTING"} <= set(flush)
    assert set(old_jumps) <= set(flush)


def test_flush_removes_the_tools_rules_in_the_hooks_and_its_chain():
    _, record, owned = applied()
    commands = mer.render(mer.diff(EMPTY, owned, {}, mer.originals_of(record)))
    mangle = [c for c in commands if c.startswith("iptables")]
    assert len([c for c in mangle if c.startswith("iptables -t mangle -D ")]) == 3
    assert mangle[-2:] == ["iptables -t mangle -F MULTI-ENI-PREROUTING", "iptables -t mangle -X MULTI-ENI-PREROUTING"]
    assert all(TAG in c for c in mangle if " -D " in c)


def test_ipv6_addresses_are_added_without_dad():
    add = mer.address_command("add", mer.Address("eth1", "2001:db8:b::11/128"))
    assert " ".join(add.words) == "address add 2001:db8:b::11/128 dev eth1 nodad noprefixroute"


def test_status_exit_codes():
    _, _, owned = applied()
    assert mer.status_report([], owned, NO_CHANGES)["applied"] is True
    assert mer.status_report([], EMPTY, NO_CHANGES)["applied"] is False


def test_eni_waiting_for_dhcp_is_not_given_its_primary_address():
    """IMDS lists eth1's primary 203.0.113.10, but eth1 has no address yet: DHCP's job."""
    enis = {e.name: e for e in enis_of("no-address")}
    assert v4(enis["eth1"]).added == () and v4(enis["eth1"]).addresses == ()
    assert not any(r.table == 22001 for r in mer.plan(list(enis.values())).rules)


def test_dry_run_says_where_an_added_address_comes_from():
    lines = recorded.plan_commands("nitro-ens5-ens6-ens7")
    assert lines[0] == "ip -4 address add 198.51.100.141/32 dev ens6  # assigned in IMDS, not configured"


def test_an_unexpected_error_is_one_line_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(mer.os, "geteuid", lambda: 0)
    monkeypatch.setattr(mer, "find_programs", lambda names: 1 / 0)
    assert mer.main(["--dry-run"]) == mer.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err == "multi-eni-routing: error: unexpected ZeroDivisionError: division by zero (-vv shows where)\n"


def test_interface_gone_is_a_usage_error_for_apply_but_not_for_flush_or_status(monkeypatch):
    system = recorded.system("xen-eth0-eth1")
    with pytest.raises(mer.ToolError) as error:
        mer.check_interfaces(mer.parse_args(["-i", "eth0", "-i", "eth9"]), system)
    assert error.value.exit_code == mer.EXIT_USAGE and "eth9" in str(error.value)
    for action in (["-f"], ["--status"]):
        args = mer.parse_args(action + ["-i", "eth0", "-i", "eth9"])
        assert mer.check_interfaces(args, system).interface == ("eth0",)
        assert args.interface == ("eth0", "eth9")  # the options record itself is never changed


def test_enis_never_share_a_number_or_a_table():
    """eth1 is device 1 in IMDS; eth0 and a NIC IMDS does not know must not take 1."""
    system = recorded.system("xen-eth0-eth1")
    imds = recorded.imds("xen-eth0-eth1")
    eth0_mac = imds.primary_mac
    imds = imds._replace(enis={mac: meta for mac, meta in imds.enis.items() if mac != eth0_mac})
    enis = mer.select_enis(system, imds, include=["eth0", "eth1"])  # eth0 unknown to IMDS: position 0
    assert [(e.name, e.device_number, mer.table_of(e)) for e in enis] == [("eth0", 0, 22000), ("eth1", 1, 22001)]
    enis = mer.select_enis(system, imds, include=["eth1", "eth0"])  # eth0 at position 1, taken by eth1
    assert [(e.name, e.device_number, mer.table_of(e)) for e in enis] == [("eth1", 1, 22000), ("eth0", 2, 22001)]


def test_imds_giving_two_enis_one_device_number_is_refused():
    system = recorded.system("xen-eth0-eth1")
    imds = recorded.imds("xen-eth0-eth1")
    imds = imds._replace(enis={mac: meta._replace(device_number=0) for mac, meta in imds.enis.items()})
    with pytest.raises(mer.ToolError, match="same network card and device number"):
        mer.select_enis(system, imds)


def test_duplicate_interface_options_count_once():
    system = recorded.system("xen-eth0-eth1")
    assert [e.name for e in mer.select_enis(system, None, include=["eth0", "eth1", "eth0"])] == ["eth0", "eth1"]


def test_kernel_without_ipv6_is_given_no_ipv6_addresses():
    system = recorded.system("nitro-ens5-ens6-ens7")._replace(ipv6=False)
    imds = recorded.imds("nitro-ens5-ens6-ens7")
    imds = imds._replace(enis={mac: with_addresses(meta, 6, meta.families[6].addresses + ("2001:db8:b::99",))
                               for mac, meta in imds.enis.items()})
    assert all(v6(e).added == () for e in mer.select_enis(system, imds))
    assert any(v6(e).added for e in mer.select_enis(system._replace(ipv6=True), imds))


def fake_reads(monkeypatch, ipv6):
    """read_outputs with the programs and the kernel faked: (outputs, the
    commands run, the kernel reads made)."""
    commands, kernel = [], []

    def run_together(given, alongside=None):
        commands.extend(argv for argv, _ in given)
        alongside()
        return ["%s out" % argv[0] for argv, _ in given]
    monkeypatch.setattr(mer, "ipv6_enabled", lambda: ipv6)
    monkeypatch.setattr(mer, "run_together", run_together)
    monkeypatch.setattr(mer, "read_kernel", lambda names: kernel.extend(names) or {n: [n] for n in names})
    outputs = mer.read_outputs({name: name for name in ("iptables-save", "ip6tables-save")})
    return outputs, commands, kernel


def test_ipv6_sources_read_as_empty_when_the_kernel_has_no_ipv6(monkeypatch):
    outputs, commands, kernel = fake_reads(monkeypatch, ipv6=False)
    assert outputs["rule6"] == outputs["route6"] == outputs["own6"] == outputs["mangle6"] == ""
    assert commands == [["iptables-save", "-t", "mangle"]]
    assert sorted(kernel) == ["addr", "own4", "route4", "rule4"]


def test_the_kernel_is_read_in_this_process_while_the_save_programs_run(monkeypatch):
    outputs, commands, kernel = fake_reads(monkeypatch, ipv6=True)
    assert sorted(outputs) == sorted(mer.ALL_SOURCES) and "link" not in outputs
    assert commands == [["iptables-save", "-t", "mangle"], ["ip6tables-save", "-t", "mangle"]]
    assert sorted(kernel) == ["addr", "own4", "own6", "route4", "route6", "rule4", "rule6"]
    assert outputs["mangle6"] == "ip6tables-save out" and outputs["rule6"] == ["rule6"]


def test_commands_run_alongside_this_processs_work_and_its_failure_waits_for_them(tmp_path):
    done = tmp_path / "done"
    seen = []
    assert mer.run_together([(["echo", "one"], None)], alongside=lambda: seen.append(1)) == ["one\n"]
    assert seen == [1]

    def failing():
        raise mer.ToolError("kernel read failed")
    with pytest.raises(mer.ToolError, match="kernel read failed"):
        mer.run_together([(["sh", "-c", "sleep 0.2; touch %s" % done], None)], alongside=failing)
    assert done.exists()


# -- Unit: rtnetlink messages as `ip -j` prints them (the lab compares the real ones). --

def attribute(kind, value):
    """One rtattr, padded to 4 bytes."""
    data = mer.RTATTR.pack(mer.RTATTR.size + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def u32(value):
    return mer.U32.pack(value)


def rule_message(family=2, table=0, src_len=0, *attributes):
    return mer.RTMSG.pack(family, 0, src_len, 0, table, 0, 0, 1, 0) + b"".join(attributes)


def test_rules_decode_as_ip_prints_them():
    ours = rule_message(2, 0, 24, attribute(mer.FRA_PRIORITY, u32(20301)), attribute(mer.FRA_TABLE, u32(22001)),
                        attribute(mer.FRA_SRC, bytes([198, 51, 100, 0])), attribute(mer.FRA_PROTOCOL, b"\xe7"))
    assert mer.rule_entry(2, ours) == {"priority": 20301, "src": "198.51.100.0", "srclen": 24, "dst": "all",
                                       "protocol": 231, "table": 22001}
    marked = rule_message(2, 0, 0, attribute(mer.FRA_PRIORITY, u32(20001)), attribute(mer.FRA_FWMARK, u32(0x200)),
                          attribute(mer.FRA_FWMASK, u32(0x3F00)), attribute(mer.FRA_TABLE, u32(22001)),
                          attribute(mer.FRA_IIFNAME, b"eth1\0"))
    assert mer.rule_entry(2, marked) == {"priority": 20001, "src": "all", "dst": "all", "fwmark": "0x200",
                                         "fwmask": "0x3f00", "iif": "eth1", "table": 22001}
    main = rule_message(2, 254, 0, attribute(mer.FRA_PRIORITY, u32(20200)), attribute(mer.FRA_TABLE, u32(254)),
                        attribute(mer.FRA_SUPPRESS_PREFIXLEN, u32(mer.UNSET)),
                        attribute(mer.FRA_SUPPRESS_IFGROUP, u32(231)), attribute(mer.FRA_PROTOCOL, b"\xe7"))
    assert mer.parse_rules([mer.rule_entry(2, main)], 4) == [mer.rule(4, 20200, 254, suppress_ifgroup=231)]
    # priority 0 (the local table's rule carries none), a mark of 0 printed as C's %#x does, a goto: no table
    assert mer.rule_entry(2, rule_message(2, 255, 0, attribute(mer.FRA_FWMARK, u32(0)),
                                          attribute(mer.FRA_FWMASK, u32(0xFF)))) == {
        "priority": 0, "src": "all", "dst": "all", "fwmark": "0", "fwmask": "0xff", "table": 255}
    assert "table" not in mer.rule_entry(2, rule_message(2, 0, 0, attribute(mer.FRA_PRIORITY, u32(5))))


def route_message(family, dst_len, table, protocol, kind=1, flags=0, *attributes):
    return mer.RTMSG.pack(family, dst_len, 0, 0, table, protocol, 0, kind, flags) + b"".join(attributes)


def test_routes_decode_as_ip_prints_them_and_the_filters_hold_without_the_kernels():
    names = {3: "eth1"}
    default = route_message(2, 0, 252, 231, 1, 0, attribute(mer.RTA_TABLE, u32(22001)),
                            attribute(mer.RTA_GATEWAY, bytes([203, 0, 113, 1])), attribute(mer.RTA_OIF, u32(3)))
    assert mer.route_entry(2, default, names, 0, 231) == {"dst": "default", "table": 22001, "protocol": 231,
                                                          "gateway": "203.0.113.1", "dev": "eth1"}
    assert mer.parse_routes([mer.route_entry(2, default, names, 0, 231)], 4) == [
        mer.Route(4, 22001, "default", "203.0.113.1", "eth1")]
    assert mer.route_entry(2, default, names, 254, 0) is None  # another table than main
    subnet = route_message(10, 64, 254, 2, 1, 0, attribute(mer.RTA_TABLE, u32(254)),
                           attribute(mer.RTA_DST, bytes.fromhex("20010db8000100000000000000000000")),
                           attribute(mer.RTA_OIF, u32(9)))
    assert mer.route_entry(10, subnet, names, 254, 0) == {"dst": "2001:db8:1::/64", "table": 254, "protocol": 2,
                                                          "dev": "if9"}
    assert mer.route_entry(10, subnet, names, 0, 231) is None  # another protocol
    cached = route_message(10, 128, 254, 2, 1, mer.RTM_F_CLONED, attribute(mer.RTA_OIF, u32(3)))
    assert mer.route_entry(10, cached, names, 254, 0) is None
    blackhole = route_message(2, 8, 254, 4, 6, 0, attribute(mer.RTA_DST, bytes([198, 18, 0, 0])))
    assert mer.parse_routes([mer.route_entry(2, blackhole, names, 254, 0)], 4) == []


def test_links_and_addresses_decode_as_ip_prints_them():
    def link(index, name, flags, kind=1, address=b"\x02\x00\x00\x00\x00\x01", *more):
        return mer.IFINFO.pack(0, kind, index, flags, 0) + attribute(mer.IFLA_IFNAME, name + b"\0") + \
            attribute(mer.IFLA_ADDRESS, address) + b"".join(more)
    links = mer.link_entries([
        link(2, b"eth0", mer.IFF_UP, 1, b"\x02\x00\x00\x00\x00\x01", attribute(mer.IFLA_GROUP, u32(231))),
        link(3, b"br0", 0, 1, b"\x02\x00\x00\x00\x00\x02", attribute(mer.IFLA_GROUP, u32(0))),
        link(4, b"veth0", mer.IFF_UP, 1, b"\x02\x00\x00\x00\x00\x03", attribute(mer.IFLA_MASTER, u32(3))),
        link(5, b"gre1", 0, 778, bytes([198, 51, 100, 7]))])
    assert [(e["ifname"], e["flags"], e.get("group"), e.get("master"), e["address"]) for e in links] == [
        ("eth0", ["UP"], 231, None, "02:00:00:00:00:01"), ("br0", [], 0, None, "02:00:00:00:00:02"),
        ("veth0", ["UP"], None, "br0", "02:00:00:00:00:03"), ("gre1", [], None, None, "198.51.100.7")]
    global4 = mer.IFADDR.pack(2, 24, 0, 0, 2) + attribute(mer.IFA_ADDRESS, bytes([198, 51, 100, 10])) + \
        attribute(mer.IFA_LOCAL, bytes([198, 51, 100, 10]))
    link6 = mer.IFADDR.pack(10, 64, 0, 253, 2) + attribute(mer.IFA_ADDRESS, bytes.fromhex("fe80" + "00" * 13 + "01"))
    elsewhere = mer.IFADDR.pack(2, 24, 0, 0, 99) + attribute(mer.IFA_LOCAL, bytes([203, 0, 113, 9]))
    entries = mer.address_entries(links, [global4, link6, elsewhere])
    assert entries[0]["addr_info"] == [
        {"family": "inet", "local": "198.51.100.10", "prefixlen": 24, "scope": "global"},
        {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"}]
    parsed = mer.parse_links(entries)
    assert (parsed[0].addresses, parsed[0].group, parsed[1].group, parsed[2].master) == (
        {4: (mer.LinkAddress("198.51.100.10", 24),), 6: ()}, 231, 0, "br0")


class FakeNetlink:
    """A netlink socket that answers each dump request with the next of `answers`."""

    def __init__(self, *answers):
        self.answers, self.sent = list(answers), []

    def send(self, data):
        self.sent.append(data)

    def recv(self, size):
        return self.answers.pop(0)


def message(kind, payload, flags=0):
    """A netlink message, padded to 4 bytes as the kernel sends it."""
    data = mer.NLMSG_HEADER.pack(mer.NLMSG_HEADER.size + len(payload), kind, flags, 1, 0) + payload
    return data + b"\0" * (-len(data) % 4)


def test_a_dump_the_kernel_says_was_interrupted_is_read_again_and_an_error_is_raised():
    interrupted = message(mer.RTM_NEWLINK, b"first", mer.NLM_F_DUMP_INTR) + message(mer.NLMSG_DONE, u32(0))
    whole = message(mer.RTM_NEWLINK, b"again") + message(mer.RTM_NEWLINK, b"more")
    sock = FakeNetlink(interrupted, whole, message(mer.NLMSG_DONE, u32(0)))
    assert mer.netlink_dump(sock, mer.RTM_GETLINK, b"") == [b"again", b"more"]
    assert len(sock.sent) == 2
    refused = FakeNetlink(message(mer.NLMSG_ERROR, struct.pack("=i", -22) + b"\0" * 16))
    with pytest.raises(OSError) as error:
        mer.netlink_dump(refused, mer.RTM_GETROUTE, b"")
    assert error.value.errno == 22
    with pytest.raises(OSError, match="a netlink message of 40 bytes in 20"):  # cut short: never parsed
        mer.netlink_dump(FakeNetlink(message(mer.RTM_NEWLINK, b"\0" * 24)[:20]), mer.RTM_GETLINK, b"")


def test_routes_read_with_their_protocol_as_filter_are_the_tools():
    # `ip route show table all proto 231` omits the protocol it filtered on.
    own = [{"dst": "default", "gateway": "198.51.100.1", "dev": "eth1", "table": "22001"},
           {"dst": "198.51.100.0/24", "dev": "eth1", "table": "main"}]
    outputs = {"addr": "[]", "rule4": "[]", "rule6": "[]", "route4": "[]", "route6": "[]",
               "own4": mer_json(own), "own6": "[]", "mangle4": "", "mangle6": ""}
    system = mer.parse_system(outputs, {})
    assert system.routes == [mer.Route(4, 22001, "default", "198.51.100.1", "eth1")]
    assert system.main_routes == []  # main's come from route4 alone: never twice


def test_an_applied_recording_parses_the_same_read_the_new_way():
    """route4/6 of all tables (as recorded) and main + own (as read now) give one System."""
    name = "applied-2eni"
    outputs = {key: recorded.read(name, filename) for key, filename in recorded.FILES.items()}
    split = dict(outputs)
    for family in (4, 6):
        entries = recorded.json.loads(outputs["route%d" % family] or "[]")
        split["route%d" % family] = mer_json([e for e in entries if e.get("table", "main") == "main"])
        split["own%d" % family] = mer_json([{k: v for k, v in e.items() if k != "protocol"} for e in entries
                                            if str(e.get("protocol")) == str(mer.RT_PROTO)])
    assert mer.parse_system(split, {}).routes  # the recording has the tool's routes
    assert mer.parse_system(split, {}) == mer.parse_system(outputs, {})


def test_verify_after_link_group_changes_reads_the_links_with_the_addresses_read_before():
    system = recorded.system("applied-2eni")
    changes = mer.Changes((mer.Command("ip", None, ("link", "set", "dev", "eth1", "group", "default"), ""),), ())
    assert mer.sources_touched(changes) == {"link"}
    outputs = {key: recorded.read("applied-2eni", filename) for key, filename in recorded.FILES.items()}
    links = recorded.json.loads(outputs["addr"])
    for entry in links:
        entry.pop("addr_info", None)
        entry["group"] = "default"
    relinked = mer.parse_system(dict(outputs, link=mer_json(links)), {})
    assert [link.addresses for link in relinked.links] == [link.addresses for link in system.links]
    assert {link.group for link in relinked.links} == {0} != {link.group for link in system.links}


def mer_json(data):
    return recorded.json.dumps(data)


def test_a_link_that_is_down_is_not_routed_until_it_is_up():
    """The kernel refuses routes through a down link: one such ENI must not fail the batch."""
    assert [e.name for e in enis_of("no-address")] == ["eth0", "eth1"]  # eth2 is down


def test_leftover_chains_alone_count_as_applied_for_status():
    _, _, owned = applied()
    chains_only = EMPTY._replace(mangle={4: owned.mangle[4], 6: mer.NO_MANGLE})
    assert mer.status_report([], chains_only, NO_CHANGES)["applied"] is True


# -- Exit codes and errors at the boundary. ------------------------------------------

def test_not_root_exits_4_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(mer.os, "geteuid", lambda: 1000)
    assert mer.main([]) == mer.EXIT_NOT_ROOT
    assert capsys.readouterr().err == "multi-eni-routing: error: must run as root\n"


def test_missing_program_exits_5_naming_its_package(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(mer.os, "geteuid", lambda: 0)
    monkeypatch.setattr(mer, "which", lambda name: None if name == "ip" else "/bin/" + name)
    assert mer.main(["--dry-run"]) == mer.EXIT_MISSING_PROGRAM
    assert capsys.readouterr().err == (
        "multi-eni-routing: error: ip not found: install iproute2 (Debian, Ubuntu) "
        "or iproute (Amazon Linux, RHEL)\n")


def test_a_failing_program_is_one_error_with_command_code_and_stderr():
    with pytest.raises(mer.CommandError) as error:
        mer.run(["sh", "-c", "echo 'RTNETLINK answers: File exists' >&2; exit 2"])
    assert (error.value.returncode, error.value.stderr) == (2, "RTNETLINK answers: File exists\n")
    assert str(error.value).endswith("exited 2: RTNETLINK answers: File exists")
    assert error.value.exit_code == mer.EXIT_FAILURE


def test_programs_run_without_a_shell_and_in_the_c_locale():
    assert mer.run(["sh", "-c", "echo $LC_ALL"]) == "C\n"
    assert mer.run(["echo", "a;b", "$HOME"]) == "a;b $HOME\n"
    assert mer.run_together([(["echo", "one"], None), (["cat"], "two\n")]) == ["one\n", "two\n"]


def test_a_program_that_cannot_start_is_the_same_error():
    with pytest.raises(mer.CommandError) as error:
        mer.run(["/nonexistent/ip", "-j", "rule"])
    assert "/nonexistent/ip -j rule exited 127 (not started): No such file or directory" == str(error.value)


def test_commands_run_together_report_the_first_failure_after_all_ended(tmp_path):
    done = tmp_path / "done"
    with pytest.raises(mer.CommandError, match="exited 3"):
        mer.run_together([(["sh", "-c", "exit 3"], None), (["sh", "-c", "sleep 0.2; touch %s" % done], None)])
    assert done.exists()


def test_programs_are_fed_and_drained_at_once_whatever_their_size():
    text = "".join("line %d\n" % n for n in range(200000))  # 2.3 MB: many times a pipe's buffer each way
    assert mer.run_together([(["cat"], text), (["cat"], "small\n")]) == [text, "small\n"]
    assert mer.run(["true"], text) == ""  # it never reads its input: done without an error


def test_a_program_runs_with_sigpipe_as_programs_expect_and_a_killed_one_says_its_signal():
    status = dict(line.split(":\t") for line in mer.run(["cat", "/proc/self/status"]).splitlines()
                  if line.startswith("SigIgn"))
    assert not int(status["SigIgn"], 16) >> (signal.SIGPIPE - 1) & 1  # Python ignores it; the child does not
    with pytest.raises(mer.CommandError) as error:
        mer.run(["sh", "-c", "kill -9 $$"])
    assert error.value.returncode == -9


def test_programs_are_killed_and_reaped_when_a_signal_handler_stops_the_wait():
    def stop(signum, frame):
        raise RuntimeError("stopped")
    before = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        started = time.monotonic()
        with pytest.raises(RuntimeError):
            mer.run_together([(["sleep", "30"], None), (["cat"], None)])
        assert time.monotonic() - started < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    with pytest.raises(ChildProcessError):  # no child left, not even a zombie
        os.waitpid(-1, os.WNOHANG)


def test_a_kernel_without_rule_protocols_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(mer.os, "geteuid", lambda: 0)
    monkeypatch.setattr(mer.os, "uname", lambda: mer.os.uname_result(("Linux", "h", "4.14.336-1.x86_64", "", "")))
    assert mer.kernel_version() == (4, 14)
    assert mer.main([]) == mer.EXIT_FAILURE
    assert "Linux 4.14.336-1.x86_64 is too old" in capsys.readouterr().err


def test_ipv6_without_a_learned_router_is_said_not_guessed(capsys):
    system = recorded.system("nitro-ens5-ens6-ens7")
    no_ra = system._replace(main_routes=[r for r in system.main_routes
                                         if not (r.family == 6 and r.dst == "default" and r.dev == "ens6")])
    ens6 = mer.select_enis(no_ra, recorded.imds("nitro-ens5-ens6-ens7"))[1]
    assert v6(ens6).gateway is None
    assert "ens6 has IPv6 addresses but no router learned from RAs" in capsys.readouterr().err
    assert not any(r.dst == "default" and r.family == 6 and r.dev == "ens6" for r in mer.plan([ens6]).routes)


def test_without_imds_a_machine_that_is_not_ec2_has_no_eni():
    system = recorded.system("xen-eth0-eth1")
    virtio = system._replace(sysfs={name: (True, "virtio_net") for name in system.sysfs})
    assert mer.select_enis(virtio, None) == []


def test_status_says_where_each_address_came_from(capsys):
    enis = enis_of("nitro-ens5-ens6-ens7")
    report = mer.status_report(enis, EMPTY, NO_CHANGES)
    mer.print_status(report)
    out = capsys.readouterr().out
    assert out.startswith("multi-eni-routing: not applied\n")
    assert "ens6: table 22001 (device 1, card 0, from IMDS), gateway 198.51.100.129 and fe80::1" in out
    assert "    198.51.100.140 (configured)\n    198.51.100.141 (added from IMDS)\n" in out
    assert "    2001:db8:b:0:1234::/80 (delegated prefix)\n" in out


# -- Routing model v2: numbering, names, addresses routed elsewhere, the record. -----

def test_slots_are_dense_from_zero_over_the_pairs_that_exist():
    numbers = [(0, 0), (4, 0), (10, 0), (31, 0), (0, 1)]
    assert mer.slots_of(numbers, [None] * 5, {}, 63) == [0, 1, 2, 3, 4]


def test_a_reattached_eni_gets_its_remembered_slot_back_and_newcomers_avoid_it():
    remembered = {"0:0": 0, "0:1": 1, "4:0": 2}  # 0:1 was detached
    assert mer.slots_of([(0, 0), (4, 0), (10, 0)], [None] * 3, remembered, 63) == [0, 2, 3]
    assert mer.slots_of([(0, 0), (4, 0), (0, 1)], [None] * 3, remembered, 63) == [0, 2, 1]
    # with no room left, a remembered but absent pair gives its slot up
    assert mer.slots_of([(0, 0), (4, 0), (10, 0)], [None] * 3, remembered, 3) == [0, 2, 1]


def test_without_a_record_an_interface_keeps_the_slot_it_is_routed_with():
    assert mer.slots_of([(0, 0), (0, 1)], [0, 5], {}, 63) == [0, 5]


def test_more_enis_than_the_mask_numbers_is_one_clear_error():
    with pytest.raises(mer.ToolError, match="64 ENIs, but room for 63"):
        mer.slots_of([(card, device) for card in range(32) for device in range(2)], [None] * 64, {}, 63)


def test_remembered_slots_keep_absent_pairs_unless_their_slot_was_given_away():
    enis = enis_of("xen-eth0-eth1")
    record = mer.record_of({"slots": {"0:5": 7, "0:6": 1}})
    assert mer.remembered_slots(record, enis) == {"0:0": 0, "0:1": 1, "0:5": 7}


def test_an_ipv6_default_goes_although_the_table_keeps_its_ipv4_default():
    v4_default = mer.Route(4, 22001, "default", "203.0.113.1", "eth1")
    v6_default = mer.Route(6, 22001, "default", "fe80::1", "eth1")
    current = EMPTY._replace(routes=frozenset([v4_default, v6_default]))
    changes = mer.diff(EMPTY._replace(routes=frozenset([v4_default])), current, {}, {})
    assert mer.render(changes) == ["ip -6 route del default via fe80::1 dev eth1 table 22001 proto 231"]


def test_interfaces_with_unsafe_names_are_skipped_or_refused(capsys):
    system = recorded.system("xen-eth0-eth1")
    renamed = [link._replace(name="e#1") if link.name == "eth1" else link for link in system.links]
    system = system._replace(links=renamed)
    enis = mer.select_enis(system, recorded.imds("xen-eth0-eth1"))
    assert [e.name for e in enis] == ["eth0"]
    assert "'e#1' is not a name the tool can route safely" in capsys.readouterr().err
    with pytest.raises(mer.ToolError) as error:
        mer.check_interfaces(mer.parse_args(["-i", "eth0", "-i", "e#1"]), system)
    assert error.value.exit_code == mer.EXIT_USAGE and "'e#1'" in str(error.value)


def test_an_address_main_routes_to_another_device_or_a_foreign_rule_names_is_not_added():
    """The VPC CNI's secondary-IP mode: IMDS lists eth1's pod addresses."""
    system = recorded.system("xen-eth0-eth1")
    imds = recorded.imds("xen-eth0-eth1")
    eth1_mac = next(mac for mac in imds.enis if mac != imds.primary_mac)
    meta = imds.enis[eth1_mac]
    listed = meta.families[4]._replace(addresses=("203.0.113.10", "203.0.113.77", "203.0.113.78", "203.0.113.79"))
    imds = imds._replace(enis=dict(imds.enis, **{eth1_mac: meta._replace(families={4: listed, 6: meta.families[6]})}))
    pods = system._replace(
        main_routes=system.main_routes + [mer.MainRoute(4, "203.0.113.77/32", None, "eni1a2b3c")],
        foreign_rules=system.foreign_rules + [mer.ForeignRule(4, 512, None, "203.0.113.78/32")])
    eth1 = mer.select_enis(pods, imds)[1]
    assert v4(eth1).added == ("203.0.113.79",)
    assert dict(v4(eth1).refused) == {"203.0.113.77": "main routes it to eni1a2b3c",
                                      "203.0.113.78": "rule 512 of another program names it"}
    report = mer.status_report([eth1], EMPTY, NO_CHANGES)
    assert {"address": "203.0.113.77", "why": "main routes it to eni1a2b3c"} in report["enis"][0]["not_added"]


def test_same_subnet_enis_are_not_taken_for_routing_each_others_addresses_elsewhere():
    """Main has 203.0.113.0/24 through enX0 and enX1 alike: no more specific than
    enX1's own subnet, so a secondary address IMDS lists for enX1 is added."""
    imds = recorded.imds("same-subnet")
    secondary = next(mac for mac in imds.enis if mac != imds.primary_mac)
    listed = with_addresses(imds.enis[secondary], 4, ("203.0.113.20", "203.0.113.21"))
    imds = imds._replace(enis=dict(imds.enis, **{secondary: listed}))
    enis = mer.select_enis(recorded.system("same-subnet"), imds)
    assert all(v4(e).refused == () for e in enis)
    assert v4(enis[1]).added == ("203.0.113.21",)


def test_record_entries_of_a_gone_or_replaced_interface_are_dropped():
    links = recorded.system("xen-eth0-eth1").links
    index = {link.name: link.index for link in links}
    record = mer.record_of({"sysctls": {"net/ipv4/conf/eth1/rp_filter": {"original": "1", "set": "2", "ifindex": index["eth1"]},
                          "net/ipv4/conf/eth0/rp_filter": {"original": "0", "set": "2", "ifindex": 99},
                          "net/ipv4/conf/eth7/rp_filter": {"original": "1", "set": "2", "ifindex": 7}},
              "addresses": [["eth1", "203.0.113.11/32", index["eth1"]], ["eth0", "198.51.100.12/32", 99]],
              "slots": {"0:0": 0}})
    live = mer.live_record(record, links)
    assert list(live.sysctls) == ["net/ipv4/conf/eth1/rp_filter"]
    assert live.addresses == (("eth1", "203.0.113.11/32", index["eth1"]),)
    assert live.slots == {"0:0": 0}


def test_the_record_is_named_after_this_namespace_whatever_pid_1_is(monkeypatch):
    monkeypatch.setattr(mer.os, "stat", lambda path: mer.os.stat_result((0,) * 10) if "1/ns" in path
                        else mer.os.stat_result((0, 4026532281) + (0,) * 8))
    assert mer.netns_id() == 4026532281
    assert mer.state_path("/run/multi-eni-routing", mer.netns_id()) == \
        "/run/multi-eni-routing/state-netns-4026532281.json"


def test_an_upgrade_replaces_the_state_of_version_1_whole():
    system = recorded.system("applied-v1")
    owned = mer.owned_state(system, mer.EMPTY_RECORD)
    desired = mer.plan(mer.select_enis(system, recorded.imds("applied-v1")),
                       groups={link.name: link.group for link in system.links})
    commands = mer.render(mer.diff(desired, owned, {}, {}))
    deleted = [c for c in commands if " rule del " in c]
    # all 9 rules of version 1, the fwmark rules too (now exact, not masked)
    assert len(deleted) == 9 and len([c for c in deleted if "fwmark 0x" in c and "/0x3f00" in c]) == 2
    assert any("suppress_prefixlength 0" in c for c in deleted)
    assert "ip -4 route del 198.51.100.0/24 via 203.0.113.1 dev eth1 table 22001 proto 231" in commands
    assert "iptables -t mangle -F MULTI-ENI-PREROUTING" in commands
    desired_now = mer.owned_state(recorded.system("applied-2eni"), mer.EMPTY_RECORD)
    assert desired_now.rules == desired.rules and desired_now.routes == desired.routes
    assert desired_now.mangle == desired.mangle and desired_now.groups == desired.groups


def test_an_imds_answer_without_the_addresses_the_eni_has_removes_none_the_tool_added():
    """A listing that shows device-number but not yet local-ipv4s reads like an IPv6-only ENI."""
    system = recorded.system("xen-eth0-eth1")
    imds = recorded.imds("xen-eth0-eth1")
    primary = imds.enis[imds.primary_mac]
    imds = imds._replace(enis=dict(imds.enis, **{imds.primary_mac: with_addresses(primary, 4, ())}))
    ours = frozenset([mer.Address("eth0", "198.51.100.11/32")])
    eth0 = mer.select_enis(system, imds, owned_addresses=ours)[0]
    assert v4(eth0).added == ("198.51.100.11",)


# -- The recorded instances of issue 7. -----------------------------------------------

def test_multi_card_enis_get_dense_slots_within_every_range():
    enis = enis_of("multi-card")
    assert [(e.name, e.network_card, e.device_number, e.slot, mer.table_of(e)) for e in enis] == [
        ("eth0", 0, 0, 0, 22000), ("eth1", 0, 1, 1, 22001), ("eth2", 4, 0, 2, 22002),
        ("eth3", 10, 0, 3, 22003), ("eth4", 31, 0, 4, 22004)]
    rules = mer.plan(enis).rules
    assert max(r.priority for r in rules) == mer.PRIO_SOURCE + 4 <= mer.PRIO_LAST
    assert {r.fwmark for r in rules if r.fwmark} == {"0x%d00/0xffffffff" % n for n in range(1, 6)}


def test_an_ipv6_only_eni_is_routed_for_ipv6_only():
    desired = mer.plan(enis_of("ipv6-only-eni"))
    assert {(r.family, r.table) for r in desired.rules if r.src} == {(4, 22000), (6, 22000), (6, 22001)}
    assert list(desired.sysctls) == ["net/ipv4/conf/eth0/rp_filter"]


def test_vpc_cni_pod_addresses_are_neither_added_nor_given_rules():
    enis = {e.name: e for e in enis_of("vpc-cni-node")}
    assert v4(enis["eth1"]).added == () and v4(enis["eth0"]).added == ()
    assert {a for a, _ in v4(enis["eth1"]).refused} == {"203.0.113.20", "203.0.113.21"}
    assert all(why.startswith(("main routes it to eni", "rule ")) for _, why in v4(enis["eth1"]).refused)
    desired = mer.plan(list(enis.values()))
    assert not desired.addresses
    assert not any(r.src and r.src.startswith("203.0.113.2") for r in desired.rules)


def test_mixed_subnets_choose_by_subnet_where_one_eni_owns_it_and_by_address_elsewhere():
    sources = {(r.src, r.iif, r.table) for r in mer.plan(enis_of("mixed-subnets")).rules if r.src}
    assert sources == {
        ("198.51.100.10/32", None, 22000),  # 198.51.100.0/24 is eth0's and eth1's
        ("198.51.100.20/32", None, 22001), ("198.51.100.21/32", None, 22001),
        ("203.0.113.0/25", "lo", 22002), ("203.0.113.48/28", None, 22002),  # a delegated prefix: any iif
        ("203.0.113.128/25", "lo", 22003), ("198.18.7.7/32", None, 22003)}  # outside eth3's subnet


def test_an_interface_named_with_a_hash_is_never_routed(capsys):
    assert [e.name for e in enis_of("hash-name")] == ["eth0"]
    assert "'d#x' is not a name the tool can route safely" in capsys.readouterr().err
