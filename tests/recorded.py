"""Load the recorded instances under tests/fixtures into the tool's data model."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import multi_eni_routing as mer  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
NAMES = sorted(n for n in os.listdir(FIXTURES) if os.path.exists(os.path.join(FIXTURES, n, "addr.json")))
FILES = {"addr": "addr.json", "rule4": "rule4.json", "rule6": "rule6.json",
         "route4": "route4.json", "route6": "route6.json",
         "mangle4": "mangle4.txt", "mangle6": "mangle6.txt"}


def read(name, filename):
    with open(os.path.join(FIXTURES, name, filename)) as handle:
        return handle.read()


def system(name):
    """The System discovery would have read on this recorded instance."""
    outputs = {key: read(name, filename) for key, filename in FILES.items()}
    sysfs = {dev: (info["device"], info["driver"])
             for dev, info in json.loads(read(name, "sysfs.json")).items()}
    return mer.parse_system(outputs, sysfs)


class RecordedImds:
    """An IMDS client answering from the fixture's imds.json, as ImdsClient would."""

    def __init__(self, tree):
        self.tree = tree

    def connect(self):
        return "recorded"

    def close(self):
        pass

    def remaining(self):
        return 0.0  # a recording does not change: waiting for it would never end

    def another(self):
        return self

    def get(self, path, missing_ok=True, retry_missing=False):
        if path == "mac":
            return self.tree["mac"]
        if path == "network/interfaces/macs/":
            return "\n".join(mac + "/" for mac in self.tree["macs"])
        mac, field = path[len("network/interfaces/macs/"):].split("/", 1)
        keys = self.tree["macs"].get(mac)
        if keys is not None and field == "":  # the ENI's directory: the keys it has
            value = "\n".join(sorted(keys))
        else:
            value = (keys or {}).get(field)
        if value is None and not missing_ok:
            raise mer.ImdsError("%s: HTTP 404" % path)
        return value


def imds(name):
    """The Imds answer of the recorded instance, or None if it has none."""
    if not os.path.exists(os.path.join(FIXTURES, name, "imds.json")):
        return None
    return mer.fetch_imds(RecordedImds(json.loads(read(name, "imds.json"))))


# What the recordings cannot show, as the layouts in fixtures/record.py left it:
# the applied instances have rp_filter=2 on their ENIs, set by the tool (on
# applied-2eni its state record says from 1; version 1's record is not read, an
# upgrade replaces it whole). Elsewhere rp_filter is 1 and there is no record.
APPLIED_SYSCTLS = {"net/ipv4/conf/eth0/rp_filter": "2", "net/ipv4/conf/eth1/rp_filter": "2"}
SYSCTLS = {"applied-2eni": APPLIED_SYSCTLS, "applied-v1": APPLIED_SYSCTLS, "applied-v2": APPLIED_SYSCTLS}
RECORDS = {name: {"sysctls": {key: {"original": "1", "set": value} for key, value in APPLIED_SYSCTLS.items()}}
           for name in ("applied-2eni", "applied-v2")}


def plan_commands(name, use_imds=True, **options):
    """The commands an apply would run on the recorded instance as it is: a
    first apply, or where the tool's state is there already (applied-2eni,
    applied-v1, applied-v2) what the diff against that state leaves to do."""
    sys_ = system(name)
    record = mer.record_of(RECORDS.get(name, {}))
    enis = mer.select_enis(sys_, imds(name) if use_imds else None, **options)
    desired = mer.plan(enis, groups={link.name: link.group for link in sys_.links})
    current = mer.owned_state(sys_, record)
    sysctl_values = {key: SYSCTLS.get(name, {}).get(key, "1") for key in [*desired.sysctls, *current.sysctls]}
    return mer.render(mer.diff(desired, current, sysctl_values, mer.originals_of(record)))
