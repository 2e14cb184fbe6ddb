#!/usr/bin/env bash
# vm tier: full VMs as libvirt domains on qemu:///system.
#   - Debian packages from 60-vm.packages (libvirt-daemon-system, QEMU, and
#     libvirt-dev + pkg-config for the Python binding);
#   - the PyPI binding libvirt-python, pinned to the installed libvirt's
#     version (Debian's python3-libvirt serves only the system python);
#   - /dev/kvm to group kvm, mode 0660, as Debian's udev rules would (there
#     is no udev here; without it libvirt re-probes QEMU at every start);
#   - virtlogd and libvirtd started by hand where they do not run (no systemd);
#   - the guest: the microvm tier's kernel and initramfs plus the PCI virtio
#     modules and /vminit, the busybox base disk, the KVM verdict (a test
#     boot), and the saved template of the default VM shape.
# Idempotent: a second run only checks. $PY is the venv's python.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}

# Debian packages: listed in scripts/setup.d/*.packages, installed by scripts/setup.sh.

want=$(pkg-config --modversion libvirt)
have=$("$PY" -c 'import importlib.metadata as m; print(m.version("libvirt-python"))' 2>/dev/null || true)
if [ "$have" != "$want" ]; then
    echo "60-vm: installing libvirt-python==$want (builds against libvirt-dev)"
    "$PY" -m pip install -q "libvirt-python==$want"
fi

"$PY" -m tierbox.tiers.vm setup
