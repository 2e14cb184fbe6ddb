"""``python -m tierbox.tiers.vm``: the tier's command-line entry point, run
as a child process: by the set-up scripts (``setup``: build the guest
artifacts, decide the accelerator), for debugging (``status``), and by a
create that cold-booted (``template``: build the saved template of one VM
shape in a detached process, see :mod:`tierbox.tiers.vm.templates`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from tierbox import libvirt_host as lvh
from tierbox.errors import TierboxError
from tierbox.spec import Limits, SandboxSpec
from tierbox.tiers.vm.shared import DEFAULT_IMAGE, DEFAULT_MEMORY_MIB
from tierbox.tiers.vm.tier import VMTier
from tierbox.vmm import libvirt_guest as guestmod
from tierbox.vmm import libvirt_template as templates


def setup(image: str = DEFAULT_IMAGE) -> list[str]:
    """Everything the tier needs before its first VM: the PCI modules, the
    guest initramfs, the base disk of ``image``, the accelerator verdict."""
    from tierbox.vmm import artifacts

    lines = list(lvh.start_daemons())
    lines.append(f"libvirt {lvh.binding_version()} answers at {lvh.uri()}")
    if artifacts.load_kernel() is None:
        lines.append("fetching the guest kernel (shared with the microvm tier)")
        artifacts.build_kernel()
    g = guestmod.ensure_guest()
    lines.append(f"guest initramfs {g.initramfs} ({g.sha256[:12]})")
    tier = VMTier()
    accel, why = tier.accelerator()
    lines.append(f"accelerator: {accel} ({why})")
    b = guestmod.base_disk(image)
    lines.append(f"base disk of {b.image}: {b.path}")
    if templates.enabled():
        spec = SandboxSpec(image=image, limits=Limits(memory_mib=DEFAULT_MEMORY_MIB))
        tpl = tier.build_template(spec)
        lines.append(
            f"template of {image}, {DEFAULT_MEMORY_MIB} MiB, 1 vCPU: "
            + (str(tpl.dir) if tpl else "being built by another process")
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tierbox.tiers.vm setup|status|template``."""
    parser = argparse.ArgumentParser(prog="python -m tierbox.tiers.vm")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="build the guest artifacts and decide the accelerator")
    s.add_argument("--image", default=DEFAULT_IMAGE)
    sub.add_parser("status", help="is the tier available here, and why (not)")
    t = sub.add_parser("template", help="build the saved template of one VM shape")
    t.add_argument("--image", default=DEFAULT_IMAGE)
    t.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB)
    t.add_argument("--vcpus", type=int, default=1)
    t.add_argument("--disk-mib", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            for line in setup(args.image):
                print(f"vm: {line}")
        elif args.command == "template":
            spec = SandboxSpec(
                image=args.image,
                limits=Limits(
                    memory_mib=args.memory_mib, cpus=float(args.vcpus), disk_mib=args.disk_mib
                ),
            )
            started = time.monotonic()
            tpl = VMTier().build_template(spec)
            if tpl is None:
                print("vm: another process is building this template")
            else:
                print(f"vm: template {tpl.key} ready in {time.monotonic() - started:.1f} s")
        else:
            a = VMTier().available()
            print(json.dumps(a.to_dict(), indent=1))
            return 0 if a.available else 1
    except TierboxError as exc:
        print(f"vm: {exc}", file=sys.stderr)
        return 1
    return 0
