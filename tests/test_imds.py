"""The IMDS client against the lab's emulator on loopback (no root needed): every
way IMDS misbehaves gives a clear ImdsError or a correct answer, in bounded time."""

import errno
import json
import socket
import threading
import time

import pytest

import imds_emulator
import recorded
from recorded import mer

PRIMARY, SECONDARY = "02:00:00:00:00:01", "02:00:00:00:00:02"


def tree(secondary_ipv4s="203.0.113.10\n203.0.113.11"):
    def eni(number, ipv4s, subnet):
        return {"device-number": str(number), "network-card": "0", "interface-id": "eni-%d" % number,
                "local-ipv4s": ipv4s, "subnet-ipv4-cidr-block": subnet, "ipv6s": ""}
    return {"mac": PRIMARY, "network": {"interfaces": {"macs": {
        PRIMARY: eni(0, "198.51.100.10", "198.51.100.0/24"),
        SECONDARY: eni(1, secondary_ipv4s, "203.0.113.0/24")}}}}


@pytest.fixture
def imds(tmp_path):
    """Start an emulator on 127.0.0.1; yields configure(meta_data, behaviour) -> client factory."""
    config, log = tmp_path / "imds.json", tmp_path / "requests.log"
    config.write_text(json.dumps({"meta-data": tree()}))
    server = imds_emulator.Server(("127.0.0.1", 0), imds_emulator.Handler)
    server.emulator = imds_emulator.Emulator(str(config), str(log))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def configure(meta_data=None, **behaviour):
        config.write_text(json.dumps({"meta-data": meta_data or tree(), "behaviour": behaviour}))
        return lambda timeout=3.0: mer.ImdsClient(timeout, ("127.0.0.1",), server.server_address[1])

    configure.requests = lambda: [json.loads(line) for line in log.read_text().splitlines()]
    yield configure
    server.shutdown()
    server.server_close()


def fetch(client):
    started = time.monotonic()
    try:
        return mer.fetch_imds(client), time.monotonic() - started
    except mer.ImdsError as exc:
        return exc, time.monotonic() - started


def test_imdsv2_token_is_used_for_every_get(imds):
    answer, _ = fetch(imds(tokens="required")())
    assert answer.primary_mac == PRIMARY
    assert answer.enis[SECONDARY].families[4].addresses == ("203.0.113.10", "203.0.113.11")
    assert answer.enis[SECONDARY].families[4].subnets[0].exploded == "203.0.113.0/24"
    gets = [r for r in imds.requests() if r["method"] == "GET"]
    assert gets and all(r["token"] and r["status"] in (200, 404) for r in gets)


def test_imdsv1_only_works_without_a_token(imds):
    answer, _ = fetch(imds(tokens="v1-only")())
    assert set(answer.enis) == {PRIMARY, SECONDARY}


def test_token_refused_is_a_clear_error(imds):
    error, elapsed = fetch(imds(tokens="refused")())
    assert isinstance(error, mer.ImdsError) and "token refused (HTTP 403)" in str(error)
    assert elapsed < 1


def test_new_eni_answering_404_twice_is_retried(imds):
    answer, _ = fetch(imds(mac_404_first={SECONDARY: 2})())
    assert answer.enis[SECONDARY].device_number == 1


def test_throttling_429_is_retried_with_backoff(imds):
    answer, _ = fetch(imds(throttle_first=3)())
    assert answer.primary_mac == PRIMARY
    assert [r["status"] for r in imds.requests()][:3] == [429, 429, 429]


def test_a_slow_imds_hits_the_time_bound(imds):
    error, elapsed = fetch(imds(delay=0.4)(timeout=1.0))
    assert isinstance(error, mer.ImdsError)
    assert elapsed < 2.5


@pytest.mark.parametrize("behaviour", [dict(drip=0.02), dict(slow_headers=0.5), dict(endless_body=True)],
                         ids=["drip", "slow-headers", "endless-body"])
def test_a_misbehaving_imds_cannot_stretch_the_deadline(imds, behaviour):
    """Every byte comes before the per-receive timeout, so only one deadline
    over the whole discovery (body bytes included) bounds it."""
    error, elapsed = fetch(imds(**behaviour)(timeout=1.0))
    assert isinstance(error, mer.ImdsError) and "timed out" in str(error), error
    assert elapsed < 1.3


def junk_listing():
    meta = tree()
    meta["network"]["interfaces"]["macs"][SECONDARY] = "<html>junk</html>"
    return meta


@pytest.mark.parametrize("meta_data, message", [
    (dict(tree(), mac="not-a-mac"), "not a MAC address"),
    (tree(secondary_ipv4s="203.0.113.10\n2001:db8::1"), "is not IPv4"),
    (tree(secondary_ipv4s="<html>junk</html>"), "not an address"),
    (dict(tree(), mac={"huge": 10 ** 6}), "larger than"),
    (junk_listing(), "not a key listing"),
])
def test_malformed_answers_are_refused_whole(imds, meta_data, message):
    error, elapsed = fetch(imds(meta_data)())
    assert isinstance(error, mer.ImdsError) and message in str(error)
    assert elapsed < 2


def test_secondary_stuck_at_device_number_0_is_refused(imds):
    meta = tree()
    meta["network"]["interfaces"]["macs"][SECONDARY]["device-number"] = "0"
    error, elapsed = fetch(imds(meta)(timeout=1.0))
    assert isinstance(error, mer.ImdsError) and "device-number stays 0" in str(error)
    assert elapsed < 2


def test_silent_endpoints_are_given_up_within_3_seconds():
    """Packets to IMDS silently dropped: both endpoints time out, under 3 s in all."""
    listeners = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((host, listeners[0].getsockname()[1] if listeners else 0))
        sock.listen(0)  # accepts the connection, never answers
        listeners.append(sock)
    try:
        client = mer.ImdsClient(5.0, ("127.0.0.1", "::1"), listeners[0].getsockname()[1])
        error, elapsed = fetch(client)
    finally:
        for sock in listeners:
            sock.close()
    assert isinstance(error, mer.ImdsError) and "timed out" in str(error)
    assert elapsed < 3


def test_unusable_imds_falls_back_with_a_warning(monkeypatch, capsys):
    monkeypatch.setattr(mer, "IMDS_ENDPOINTS", ("127.0.0.1",))
    monkeypatch.setattr(mer, "IMDS_PORT", 9)  # discard: refused at once
    system = recorded.system("xen-eth0-eth1")
    assert mer.discover_imds(mer.parse_args(["--imds-timeout", "0.5"]), system.links, system.sysfs) is None
    assert "warning: instance metadata not usable" in capsys.readouterr().err


def only_primary_listed():
    meta = tree()
    del meta["network"]["interfaces"]["macs"][SECONDARY]
    return meta


def test_an_eni_attached_a_moment_ago_is_waited_for_in_the_listing(imds):
    client = imds(only_primary_listed())()
    threading.Timer(0.4, lambda: imds(tree())).start()  # IMDS catches up
    started = time.monotonic()
    answer = mer.fetch_imds(client, expected_macs={PRIMARY, SECONDARY})
    assert set(answer.enis) == {PRIMARY, SECONDARY}
    assert 0.4 <= time.monotonic() - started < 2


def test_a_nic_imds_never_lists_costs_at_most_the_deadline(imds):
    answer, elapsed = fetch(imds(only_primary_listed())(timeout=1.0))
    assert set(answer.enis) == {PRIMARY} and elapsed < 0.5  # nothing expected: no wait
    started = time.monotonic()
    answer = mer.fetch_imds(imds(only_primary_listed())(timeout=1.0), expected_macs={PRIMARY, SECONDARY})
    assert set(answer.enis) == {PRIMARY} and time.monotonic() - started < 1.5


def test_a_kept_alive_connection_closed_by_imds_is_reopened_once(imds):
    client = imds()()
    client.connect()
    client.conn.sock.close()  # as if IMDS had dropped the idle connection
    client.conn.sock = None
    assert client.get("mac") == PRIMARY
    original = client.request
    calls = []

    def reset_twice(*args):
        calls.append(args)
        if len(calls) <= 2:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return original(*args)

    client.request = reset_twice
    with pytest.raises(mer.ImdsError, match="connection reset"):
        client.get("mac")
    assert len(calls) == 2


# -- what a run asks: the listing first, then only keys the ENI has, 4 ENIs at once --

def typical_eni(number):
    """An IPv4 ENI on one network card, as IMDS has it: no network-card, ipv6s or
    prefixes (empty: not listed, 404), the keys the tool does not read."""
    return {"device-number": str(number), "interface-id": "eni-%017x" % number, "mac": mac_of(number),
            "local-ipv4s": "\n".join("198.18.%d.%d" % (number, host) for host in range(10, 60)),
            "subnet-ipv4-cidr-block": "198.18.%d.0/24" % number, "subnet-id": "subnet-%017x" % number,
            "vpc-id": "vpc-0000000000000000a", "vpc-ipv4-cidr-block": "198.18.0.0/15",
            "vpc-ipv4-cidr-blocks": "198.18.0.0/15", "security-group-ids": "sg-0000000000000000a",
            "owner-id": "123456789012", "ipv4-associations": {"198.18.0.1": "198.18.%d.10" % number},
            "network-card": "", "ipv6s": "", "subnet-ipv6-cidr-blocks": "", "ipv4-prefix": "", "ipv6-prefix": ""}


def mac_of(number):
    return "02:00:00:00:01:%02x" % number


def instance(enis):
    return {"mac": mac_of(0), "network": {"interfaces": {"macs": {e["mac"]: e for e in enis}}}}


def per_eni(requests):
    """Requests per MAC, from the emulator's log."""
    counts = {}
    for request in requests:
        mac = imds_emulator.mac_in(request["path"])
        counts[mac] = counts.get(mac, 0) + 1
    return counts


def test_a_typical_eni_costs_at_most_5_requests_plus_3_per_run(imds):
    enis = [typical_eni(number) for number in range(15)]
    answer, _ = fetch(imds(instance(enis))())
    assert answer.enis[mac_of(7)] == mer.ImdsEni(
        mac_of(7), 7, 0, "eni-00000000000000007",
        {4: mer.ImdsFamily(tuple("198.18.7.%d" % h for h in range(10, 60)),
                           (mer.ipaddress.ip_network("198.18.7.0/24"),), ()),
         6: mer.ImdsFamily((), (), ())})
    requests = imds.requests()
    assert [r["status"] for r in requests] == [200] * len(requests), "no 404s"
    counts = per_eni(requests)
    assert counts.pop(None) == 3  # token, mac, macs/
    assert sorted(counts) == sorted(mac_of(n) for n in range(15))
    assert max(counts.values()) <= 5


def test_enis_are_fetched_on_at_most_4_connections_several_times_faster(imds, monkeypatch):
    client = imds(instance([typical_eni(number) for number in range(15)]), delay=0.01)
    monkeypatch.setattr(mer, "IMDS_CONNECTIONS", 1)
    one_at_a_time, sequential = fetch(client(timeout=10))
    monkeypatch.undo()
    log_size = len(imds.requests())
    concurrent_answer, concurrent = fetch(client(timeout=10))
    requests = imds.requests()[log_size:]
    assert concurrent_answer == one_at_a_time and len(concurrent_answer.enis) == 15
    assert len({r["port"] for r in requests}) == 4  # one connection each, kept alive
    assert max(r["connections"] for r in requests) == 4
    assert sequential >= len(requests) * 0.01
    assert concurrent < sequential / 2, (concurrent, sequential)


def test_an_ipv6_only_eni_is_answered_at_once(imds):
    ipv6_only = dict(typical_eni(1), **{"local-ipv4s": "", "subnet-ipv4-cidr-block": "",
                                        "ipv6s": "2001:db8:1::10", "subnet-ipv6-cidr-blocks": "2001:db8:1::/64"})
    answer, elapsed = fetch(imds(instance([typical_eni(0), ipv6_only]))(timeout=5.0))
    families = answer.enis[mac_of(1)].families
    assert families[4] == mer.ImdsFamily((), (), ())
    assert families[6] == mer.ImdsFamily(("2001:db8:1::10",), (mer.ipaddress.ip_network("2001:db8:1::/64"),), ())
    assert elapsed < 0.5  # it was retried until the deadline: 4.6 of 5 s
    assert all(r["status"] == 200 for r in imds.requests())


def test_a_just_attached_eni_without_device_number_yet_is_waited_for(imds):
    late = dict(typical_eni(1), **{"device-number": ""})
    client = imds(instance([typical_eni(0), late]))()
    threading.Timer(0.3, lambda: imds(instance([typical_eni(0), typical_eni(1)]))).start()
    answer, elapsed = fetch(client)
    assert answer.enis[mac_of(1)].device_number == 1
    assert 0.3 <= elapsed < 2
    error, elapsed = fetch(imds(instance([typical_eni(0), late]))(timeout=1.0))
    assert isinstance(error, mer.ImdsError) and "lists no device-number" in str(error)
    assert elapsed < 1.5


def test_a_secondary_saying_device_number_0_for_a_moment_is_waited_for(imds):
    client = imds(instance([typical_eni(0), dict(typical_eni(1), **{"device-number": "0"})]))()
    threading.Timer(0.3, lambda: imds(instance([typical_eni(0), typical_eni(1)]))).start()
    answer, elapsed = fetch(client)
    assert answer.enis[mac_of(1)].device_number == 1
    assert 0.3 <= elapsed < 2


def test_a_listing_404_is_retried_and_then_the_eni_costs_no_more(imds):
    enis = [typical_eni(0), typical_eni(1)]
    answer, _ = fetch(imds(instance(enis), mac_404_first={mac_of(1): 2})())
    assert answer.enis[mac_of(1)].device_number == 1
    listing = "/latest/meta-data/network/interfaces/macs/%s/" % mac_of(1)
    assert [r["status"] for r in imds.requests() if r["path"] == listing] == [404, 404, 200]
    assert per_eni(imds.requests())[mac_of(1)] <= 5 + 2


def test_each_connection_uses_the_token_and_the_endpoint_that_answered(imds):
    """The first endpoint accepts connections and never answers; every connection
    goes to the second one, with the token."""
    client = imds(instance([typical_eni(number) for number in range(6)]))
    port = client().port
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        silent.bind(("127.0.0.2", port))
        silent.listen(0)
        answer, elapsed = fetch(mer.ImdsClient(3.0, ("127.0.0.2", "127.0.0.1"), port))
    finally:
        silent.close()
    assert len(answer.enis) == 6 and elapsed < 2
    gets = [r for r in imds.requests() if r["method"] == "GET"]
    assert len({r["port"] for r in gets}) == 4 and all(r["token"] for r in gets)


def test_a_refused_eni_stops_the_others_retrying(imds):
    """One ENI's answer is junk while another's listing still 404s: the whole
    answer is refused at once, not after the other has used up the deadline."""
    meta = instance([typical_eni(number) for number in range(3)])
    meta["network"]["interfaces"]["macs"][mac_of(1)] = "<html>junk</html>"
    error, elapsed = fetch(imds(meta, mac_404_first={mac_of(2): 10 ** 9})(timeout=5.0))
    assert isinstance(error, mer.ImdsError) and "not a key listing" in str(error)
    assert elapsed < 1


# -- the watcher's poll: one request per ENI plus one, the token used again --

def test_the_poll_costs_one_request_per_eni_plus_one_and_no_token(imds):
    enis = [typical_eni(number) for number in range(15)]
    client = imds(instance(enis))
    session = mer.ImdsSession()
    answer = mer.fetch_imds(mer.ImdsClient(5.0, ("127.0.0.1",), client().port, session=session))
    before = len(imds.requests())
    assert mer.imds_unchanged(mer.ImdsClient(5.0, ("127.0.0.1",), client().port, session=session), answer)
    polled = imds.requests()[before:]
    assert len(polled) == 16 and not [r for r in polled if r["method"] == "PUT"]
    assert all(r["token"] and r["status"] == 200 for r in polled)
    assert session.counts["requests"] == len(imds.requests())

    enis[3]["local-ipv4s"] += "\n198.18.3.99"  # an address assigned in EC2
    imds(instance(enis))
    assert not mer.imds_unchanged(mer.ImdsClient(5.0, ("127.0.0.1",), client().port, session=session), answer)
    del enis[3]  # an ENI detached
    imds(instance(enis))
    assert not mer.imds_unchanged(mer.ImdsClient(5.0, ("127.0.0.1",), client().port, session=session), answer)


def test_a_token_imds_no_longer_takes_is_asked_for_again_next_time(imds):
    client = imds()
    session = mer.ImdsSession()
    mer.fetch_imds(mer.ImdsClient(5.0, ("127.0.0.1",), client().port, session=session))
    session.token = "stale"  # IMDS restarted: it knows the token no more
    error, _ = fetch(mer.ImdsClient(5.0, ("127.0.0.1",), client().port, session=session))
    assert isinstance(error, mer.ImdsError) and "401" in str(error)
    answer, _ = fetch(mer.ImdsClient(5.0, ("127.0.0.1",), client().port, session=session))
    assert answer.primary_mac == PRIMARY
