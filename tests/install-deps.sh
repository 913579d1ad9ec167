#!/bin/sh
# Installs what the tests need on Debian or Ubuntu (run as root, from anywhere
# in the source tree): the programs the tool drives and those the lab, the
# shell checks, the boot test and the package builds (debhelper, rpmbuild,
# their linters) use, from the distribution; and pytest, pytest-cov,
# coverage >= 7.10 and prometheus-client (the metrics file's parser) in a
# virtual environment, .venv in the
# source tree (the system Python is never changed: PEP 668).  Then run:
#   .venv/bin/python -m pytest -ra --cov=multi_eni_routing tests
set -eu
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# One package per line; keep it a plain list.
packages="
iproute2
iptables
procps
conntrack
iputils-ping
shellcheck
groff-base
systemd
udev
python3-venv
git
debootstrap
systemd-container
docker.io
busybox-static
make
build-essential
debhelper
dh-python
dpkg-dev
fakeroot
lintian
rpm
rpmlint
"
# Installed where the distribution has them: the docker command is in
# docker-cli from Debian 13 on (docker.io only recommends it).
optional="
docker-cli
"
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
known() { apt-cache show "$1" >/dev/null 2>&1; }
missing=""
for pkg in $packages; do
    installed "$pkg" || missing="$missing $pkg"
done
for pkg in $optional; do
    installed "$pkg" || ! known "$pkg" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    for pkg in $optional; do
        case " $missing " in *" $pkg "*) continue ;; esac
        installed "$pkg" || ! known "$pkg" || missing="$missing $pkg"
    done
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
if ! .venv/bin/python -c 'import pytest, pytest_cov, coverage, prometheus_client; assert coverage.version_info >= (7, 10)' 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pytest pytest-cov 'coverage>=7.10' prometheus-client
fi
