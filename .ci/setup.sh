#!/usr/bin/env bash
# Sets up everything vhusniff needs on a fresh Debian/Ubuntu machine (as root, or with sudo):
# the Python package with its test extras, the real peers (QEMU, qemu-storage-daemon, dpdk-testpmd, virtiofsd,
# vhost-user-gpu, tshark), the guest kits (Debian's cloud kernel, its generic kernel for the GPU guest, busybox
# initramfs) and QEMU 10 from bookworm-backports, unpacked beside them, all cached under ~/.cache/vhusniff.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PYTHON=${PYTHON:-python3}
if ! $PYTHON -m pip --version >/dev/null 2>&1; then
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip python3-venv
fi
# A distribution Python may refuse system-wide installs (PEP 668); the package then goes in anyway, as root.
$PYTHON -m pip install -q -e '.[test]' 2>/dev/null || $PYTHON -m pip install -q --break-system-packages -e '.[test]'
$SUDO bash .ci/install-deps.sh
