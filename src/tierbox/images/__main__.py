"""``python -m tierbox.images``: build the built-in busybox:latest image if
missing and warm its rootfs cache (set-up runs this)."""

from __future__ import annotations

import sys

from tierbox.images.store import default_store


def main() -> int:
    store = default_store()
    record = store.ensure_busybox()
    rootfs = store.rootfs(record.ref)
    print(f"{record.ref} {record.manifest_digest[:19]} ready: {rootfs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
