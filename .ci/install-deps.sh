#!/usr/bin/env bash
# Installs the real peers vhusniff's lab and tests run (QEMU, qemu-storage-daemon, dpdk-testpmd,
# tshark, busybox-static) on Debian 12, as root, then fetches and builds the guest kit.
# Idempotent: apt is skipped when every command is already there, and the kit is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(qemu-system-x86 qemu-system-common qemu-utils busybox-static cpio tshark dpdk-dev)
COMMANDS=(qemu-system-x86_64 qemu-storage-daemon qemu-img busybox cpio tshark dpdk-testpmd)

missing=0
for command in "${COMMANDS[@]}"; do
  command -v "$command" >/dev/null 2>&1 || missing=1
done

if [ "$missing" -eq 1 ]; then
  # Otherwise tshark's package stops to ask whether non-root users may capture.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update
  apt-get install -y --no-install-recommends "${PACKAGES[@]}"
fi

"${PYTHON:-python3}" -m vhusniff.lab.peers prepare
