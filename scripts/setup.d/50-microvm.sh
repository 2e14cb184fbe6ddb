#!/usr/bin/env bash
# microvm tier: QEMU, then the guest it boots, all under
# ${TIERBOX_HOME:-~/.local/share/tierbox}/microvm/:
#   - Debian's linux-image-cloud-amd64, fetched with `apt-get download` and
#     unpacked with `dpkg-deb -x` (never installed on the host); its bzImage
#     payload decompressed with lz4 into the vmlinux QEMU boots via PVH, plus
#     the modules the guest needs (virtio_mmio, virtio_console, virtio_blk,
#     virtio_rng, overlay, virtio_net and their dependencies; a kernel built
#     before virtio_net was wanted is fetched again);
#   - the initramfs: /init, busybox-static, those modules and the guest agent
#     (src/tierbox/guest/agent.c, compiled with gcc -static), packed by cpio;
#   - the accelerator verdict: KVM only if a test boot works (cached).
# Idempotent: a second run only checks. $PY is the venv's python.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}

# Debian packages: listed in scripts/setup.d/*.packages, installed by scripts/setup.sh.

# apt-get download needs package lists; refresh them once if the kernel is unknown
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt-get update -qq
fi

"$PY" -m tierbox.vmm.build
# the accelerator verdict, through the tier itself (KVM only if a test boot works)
"$PY" -c 'from tierbox.tiers import get_tier; a = get_tier("microvm").available(); print(f"50-microvm: {a.reason}")'
