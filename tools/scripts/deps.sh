#!/usr/bin/env bash
# Installs what idlewire needs on the build/test host: Debian packages, binfmt for foreign
# architectures, and the Python virtual environment. Idempotent and quiet when nothing is missing.
# Usage: tools/scripts/deps.sh [image|test]
set -euo pipefail
cd "$(dirname "$0")/../.."
want=${1:-image}

# Debian packages for building images (mmdebstrap + emulation + filesystem tools) ...
pkgs_image=(mmdebstrap debian-archive-keyring arch-test qemu-user-static binfmt-support
  dosfstools mtools faketime e2fsprogs fdisk xz-utils zstd bmap-tools python3-venv ca-certificates
  openssh-client)
# ... and for testing them: QEMU system emulators + firmware, SSH client, networking parts.
pkgs_test=(qemu-system-x86 qemu-system-arm ovmf qemu-efi-aarch64 openssh-client
  wireguard-tools wireguard-go nftables iperf3 iproute2 iputils-ping systemd-container
  strace bc postgresql iso-codes miniupnpd-nftables miniupnpc natpmpc dnsmasq-base
  kea-dhcp6-server)
# postgresql: the hub's tests start their own server (initdb + pg_ctl).
# iso-codes: the schema's ISO 3166-1 country list is checked against Debian's (test_schema_region)
# dnsmasq-base: router mode's LAN DHCP/DNS runs with the role's rendered config in a namespace
# (tests/net/test_router.py); the binary only, no service on this host.
# kea-dhcp6-server: the router lab's ISP (tests/routerbox.py) delegates an IPv6 prefix to a
# router-mode unit (dnsmasq cannot); the tests start kea-dhcp6 themselves in a namespace, and a
# host without a running init does not start the package's service.

# The home-router lab (tests/homelab.py) runs Debian's miniupnpd inside a namespace: the binary
# only (miniupnpd-nftables: no debconf questions, no service that would start on this host; the
# "miniupnpd" package adds those), and the node's side, miniupnpc's upnpc (natpmpc for NAT-PMP).

# The OpenWrt bootstrap tests run their script under busybox sh, as a router would, and tests/e2e's
# home router hands out DHCP leases with busybox udhcpd; Debian's
# busybox and busybox-static conflict, so either one does.
command -v busybox >/dev/null || pkgs_test+=(busybox-static)

pkgs=("${pkgs_image[@]}")
[ "$want" = test ] && pkgs+=("${pkgs_test[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 2
  fi
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || { echo "error: apt-get update failed: is Debian's mirror reachable?" >&2; exit 2; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "error: apt-get install ${missing[*]} failed" >&2; exit 2; }
fi

# arm64 rootfs are built and baked through qemu-user; the kernel needs binfmt_misc mounted and
# the qemu-aarch64 handler registered with the F (fix-binary) flag, which Debian's package sets.
if [ "$(id -u)" = 0 ]; then
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
  fi
  if [ -e /proc/sys/fs/binfmt_misc/register ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  fi
fi

# Python environment: rebuilt when pyproject.toml changes.
py=${PYTHON:-python3}
stamp=.venv/.idlewire-deps
sum=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  echo "setting up the Python environment in .venv"
  "$py" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev]'
  echo "$sum" > "$stamp"
fi
# The collections pinned in requirements.yml come from the pinned `ansible` package; check them.
.venv/bin/python tools/scripts/check_collections.py requirements.yml
