#!/bin/sh
# Installs what the demo needs on Debian or Ubuntu (run as root): the
# programs the tool drives (iproute2, iptables) and sysctl (procps), which
# the simulated VPC uses.  No pytest: the demo runs on the system python3.
set -eu
export DEBIAN_FRONTEND=noninteractive
missing=""
for pkg in iproute2 iptables procps; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
