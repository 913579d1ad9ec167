#!/usr/bin/env python3
"""Show what multi_eni_routing.py fixes, in a simulated VPC (as root, after
`sh demo/install-deps.sh`, which installs iproute2, iptables and procps):

    python3 demo/vpc-demo.py

Builds the lab of tests/lab.py in network namespaces (an instance with two
ENIs, eth0 198.51.100.10-11 and eth1 203.0.113.10-11, IPv6 on both, and a
container published on 203.0.113.11:8080), then probes every address from a
client on the internet: without the tool, with it, and after --flush.
Removes everything when done; touches nothing outside its namespaces.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from lab import DNAT_PORT, Lab, lab_usable, tcp_answer  # noqa: E402

PHASES = ["without tool", "with tool", "after flush"]


def probe(lab):
    """{row label: "ICMP TCP" cell} for every address, and the published service."""
    mark = {True: "ok", False: "--"}
    rows = {}
    for address, reach in lab.reachability(lab.addresses()).items():
        eni = next(e.name for e in lab.enis if address in lab.addresses(e))
        rows["%s (%s)" % (address, eni)] = "%s   %s" % (mark[reach.icmp], mark[reach.tcp])
    service = tcp_answer(lab.client, lab.dnat_address, DNAT_PORT, timeout=1) is not None
    rows["%s:%d -> container" % (lab.dnat_address, DNAT_PORT)] = "     " + mark[service]
    return rows


def run_tool(lab, *args):
    result = lab.run_tool(*args)
    print("$ multi_eni_routing.py %s-> exit %d" % (" ".join(args) + " " if args else "", result.rc))
    for line in (result.stdout + result.stderr).splitlines():
        print("  " + line)
    return result.rc == 0


def print_table(columns):
    width = max(len(label) for label in columns[0])
    print()
    print("%-*s  %s" % (width, "", "".join("%-16s" % phase for phase in PHASES)))
    print("%-*s  %s" % (width, "reached from 198.18.0.10", "ICMP TCP        " * len(PHASES)))
    for label in columns[0]:
        print("%-*s  %s" % (width, label, "".join("%-16s" % column[label] for column in columns)))


def cannot_run():
    """Why the demo cannot run here, with what to do about it; or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces): run it as root, e.g. sudo python3 %s" % sys.argv[0]
    missing = [name for name in ("ip", "iptables-restore", "ip6tables-restore", "sysctl")
               if not shutil.which(name)]
    if missing:
        return "missing %s: run sh demo/install-deps.sh first" % ", ".join(missing)
    usable, why = lab_usable()
    return None if usable else why


def main():
    problem = cannot_run()
    if problem:
        sys.exit("vpc-demo: %s" % problem)
    print("Building the lab: instance with eth0 + eth1, a VPC router that drops packets "
          "leaving an ENI with a source it does not own, a client, a container...")
    with Lab(enis=2, addresses=2, container=True) as lab:
        columns = [probe(lab)]
        ok = run_tool(lab)
        columns.append(probe(lab))
        ok = run_tool(lab, "--flush") and ok
        columns.append(probe(lab))
    print_table(columns)
    all_ok_with_tool = all("--" not in cell for cell in columns[1].values())
    print("\nwith the tool every address and the published service answer: %s"
          % ("yes" if all_ok_with_tool else "NO"))
    print("namespaces and processes removed.")
    return 0 if ok and all_ok_with_tool else 1


if __name__ == "__main__":
    sys.exit(main())
