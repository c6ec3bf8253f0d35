#!/usr/bin/env bash
# Installs what meshsup and its tests need on Debian (as root): the Debian
# tools the tests drive for real, then a virtualenv in .venv with meshsup.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(wireguard-go wireguard-tools iproute2 iputils-ping iperf3 dnsutils knot-dnsutils
      dnsmasq unbound dnsdist dnsperf rsyslog nfdump systemd-journal-remote openssl clang llvm
      libbpf-dev procps coturn nftables conntrack prometheus tshark tcpdump)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Package scripts must not start dnsmasq/unbound/rsyslog as system services:
  # the tests run their own copies, and a system resolver would hold port 53.
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The user meshsup's DNS and netlog actors run as, once they have joined the bus (README: Privileges).
id -u meshsup >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin meshsup

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
