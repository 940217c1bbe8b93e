#!/usr/bin/env bash
# Installs the real peers vhusniff's lab and tests run (QEMU, qemu-storage-daemon, dpdk-testpmd, virtiofsd,
# vhost-user-gpu, tshark, busybox-static) on Debian 12, as root, then fetches and builds the guest kits and
# unpacks QEMU 10 from bookworm-backports into the cache (not installed: the system QEMU stays 7.2).
# Idempotent: apt is skipped when every program is already there, and the kits and QEMU 10 are cached.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# qemu-system-common has virtiofsd, qemu-system-gui has vhost-user-gpu (and pulls libvirglrenderer1 for it).
# wireshark-qt, xvfb, xdotool, x11-apps (xwd) and imagemagick: the dissector checked in the real Wireshark GUI.
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-gui qemu-utils busybox-static cpio tshark dpdk-dev
          wireshark-qt xvfb xdotool x11-apps imagemagick)
COMMANDS=(qemu-system-x86_64 qemu-storage-daemon qemu-img busybox cpio tshark dpdk-testpmd
          /usr/lib/qemu/virtiofsd /usr/lib/qemu/vhost-user-gpu wireshark Xvfb xdotool xwd import)

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

"${PYTHON:-python3}" -m vhusniff.lab.peers prepare --qemu10 --gpu-kit
