"""``python -m tierbox.vmm.build``: set-up of the microvm tier's guest.

Fetches and prepares the kernel (once), rebuilds the initramfs when its
sources changed, checks the kernel has built in what the guest relies on,
and decides the accelerator with a test boot. Idempotent; ``--force``
redoes everything.
"""

from __future__ import annotations

import argparse
import re
import sys

from tierbox.errors import TierboxError
from tierbox.vmm import artifacts

#: Config options the guest init and agent rely on being built in (=y).
REQUIRED_BUILTIN = (
    "CONFIG_PVH",
    "CONFIG_EXT4_FS",
    "CONFIG_TMPFS",
    "CONFIG_DEVTMPFS",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_MEMCG",
    "CONFIG_CGROUP_PIDS",
    "CONFIG_RTC_DRV_CMOS",
)


def check_config(text: str) -> list[str]:
    """Required options that are not built in (empty when all is well)."""
    bad = []
    for opt in REQUIRED_BUILTIN:
        m = re.search(rf"^{opt}=(\S+)$", text, re.MULTILINE)
        if m is None or m.group(1) != "y":
            bad.append(f"{opt}={m.group(1) if m else 'unset'}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="refetch the kernel, rebuild all")
    args = parser.parse_args(argv)
    try:
        kernel = artifacts.build_kernel(force=args.force)
        bad = check_config((kernel.vmlinux.parent / "config").read_text())
        if bad:
            print(f"50-microvm: the guest kernel lacks built-in {', '.join(bad)}", file=sys.stderr)
            return 1
        initramfs = artifacts.build_initramfs(kernel, force=args.force)
    except TierboxError as exc:
        print(f"50-microvm: {exc}", file=sys.stderr)
        return 1
    print(
        f"50-microvm: kernel {kernel.release} ({kernel.package} {kernel.version}), "
        f"modules {', '.join(kernel.modules_loaded)}; "
        f"initramfs {initramfs.path.stat().st_size // 1024} KiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
