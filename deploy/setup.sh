#!/usr/bin/env bash
# Installs what meshsup and its tests need on Debian (as root): the Debian
# tools the tests drive for real, then a virtualenv in .venv with meshsup.
# Safe to run again: it installs only what is missing.
#
# --install-service [--root DIR]: the Debian packages and users, then, instead of
# .venv, meshsup as a service, as
# deploy/meshsup.service and deploy/meshsup-relay.service expect it: the code in
# /opt/meshsup with its own virtualenv, the units in /etc/systemd/system and a
# config in /etc/meshsup/meshsup.toml (kept if there is one). --root DIR puts
# all of it under DIR instead (for tests and packaging: the virtualenv then
# runs only from where it was made) and leaves systemd alone.
set -euo pipefail
cd "$(dirname "$0")/.."

service=0 root=/
while (($#)); do
  case "$1" in
    --install-service) service=1 ;;
    --root) root="${2:?--root needs a directory}"; shift ;;
    *) echo "usage: $0 [--install-service [--root DIR]]" >&2; exit 2 ;;
  esac
  shift
done

DEBS=(wireguard-go wireguard-tools iproute2 iputils-ping iperf3 dnsutils knot-dnsutils
      dnsmasq unbound dnsdist dnsperf rsyslog nfdump systemd-journal-remote openssl
      procps coturn nftables conntrack prometheus tshark tcpdump nats-server
      gcc python3-dev)  # gcc and the headers: pip builds the DNS worker's C modules (actors/dns/scan.c, burst.c)
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

# The users the unprivileged actors run as once they have joined the bus, one per kind so that
# none can signal another or touch its files, all in the group meshsup, which may reach the bus;
# meshsup itself is their fallback (README: Privileges).
id -u meshsup >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin meshsup
for kind in dns netlog coord; do
  id -u "meshsup-$kind" >/dev/null 2>&1 ||
    useradd --system --no-create-home --shell /usr/sbin/nologin --gid meshsup "meshsup-$kind"
done

# The checkout's virtualenv, unless installing the service, which has its own: a service install
# never rewrites the .venv a running node or test may be importing from.
if ! ((service)); then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  exit 0
fi

root="$(realpath -m "$root")" opt="${root%/}/opt/meshsup" units="${root%/}/etc/systemd/system"
etc="${root%/}/etc/meshsup"
# The code: a copy of the package (README and deploy/ with it, no tests, nothing a run
# left in this tree), installed into its own virtualenv, so the service never runs
# from a checkout someone is editing.
mkdir -p "$opt" "$units"
find "$opt" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar --exclude='__pycache__' -cf - README.md pyproject.toml actors bpf supervisor deploy | tar -xf - -C "$opt"
[ -x "$opt/.venv/bin/python" ] || python3 -m venv "$opt/.venv"
"$opt/.venv/bin/python" -m pip uninstall -q -y meshsup >/dev/null 2>&1 || true
"$opt/.venv/bin/python" -m pip install -q --disable-pip-version-check "$opt"
install -m 0644 deploy/meshsup.service deploy/meshsup-relay.service "$units/"
# A config only where there is none: an operator's is never overwritten. Mode 600: it may
# come to hold a private key. Empty of settings, it is the embedded default.
install -d -m 0755 "$etc"
if [ ! -e "$etc/meshsup.toml" ]; then
  install -m 0600 /dev/null "$etc/meshsup.toml"
  cat > "$etc/meshsup.toml" <<'TOML'
# meshsup node configuration (see /opt/meshsup/README.md, "Configuration", and
# /opt/meshsup/deploy/example.toml). Empty, it is the embedded default: a key made
# in /var/lib/meshsup, the interface meshsup0, the DNS controller on, no peers.
TOML
fi
echo "installed: $opt, $units/meshsup.service, $units/meshsup-relay.service, $etc/meshsup.toml"
if [ "$root" != / ]; then
  echo "installed under $root: systemd left alone"
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "start it: systemctl enable --now meshsup (or meshsup-relay)"
else
  echo "systemd is not running (not PID 1): nothing enabled; the units load when it starts"
fi
