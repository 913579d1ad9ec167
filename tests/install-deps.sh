#!/bin/sh
# Installs what the tests need on Debian or Ubuntu (run as root): the programs
# the tool drives, those the lab and the shell checks use, and pytest.
set -eu
export DEBIAN_FRONTEND=noninteractive
missing=""
for pkg in iproute2 iptables conntrack iputils-ping shellcheck systemd udev docker.io busybox-static; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
python3 -c 'import pytest, pytest_cov, coverage; assert coverage.version_info >= (7, 10)' 2>/dev/null ||
    python3 -m pip install -q --upgrade pytest pytest-cov 'coverage>=7.10'
