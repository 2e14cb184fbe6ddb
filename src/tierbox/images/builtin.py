"""The built-in ``busybox:latest`` image, made from the host's busybox-static in seconds.

It needs no network, so every tier has an image to run even on an offline host.
``python -m tierbox.images`` builds it (idempotently) and unpacks its
rootfs, so that the first sandbox start is fast; setup calls it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tierbox.errors import HostError
from tierbox.host.runner import run

BUSYBOX_REF = "busybox:latest"
BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_CMD = ["sh"]
BUSYBOX_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnobody:x:65534:\n"


def make_busybox_rootfs(dest: Path, busybox: Path = BUSYBOX_BINARY) -> None:
    """Lay out a minimal root filesystem in ``dest``: busybox, its applet links, users, /tmp."""
    if not busybox.is_file():
        raise HostError(f"{busybox} is missing: run `apt-get install busybox-static`")
    for sub, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700)):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        (dest / sub).chmod(mode)  # mkdir's mode is filtered by the umask
    for mount_point in ("dev", "proc", "sys"):
        (dest / mount_point).mkdir(exist_ok=True)
    shutil.copyfile(busybox, dest / "bin" / "busybox")
    (dest / "bin" / "busybox").chmod(0o755)
    if os.geteuid() == 0:
        # Inside a chroot, busybox links its applets to /bin/busybox, not to a host path.
        run(["chroot", str(dest), "/bin/busybox", "--install", "-s", "/bin"])
    else:
        for applet in run([str(busybox), "--list"]).stdout.decode().split():
            link = dest / "bin" / applet
            if applet != "busybox" and not link.exists():
                link.symlink_to("/bin/busybox")
    (dest / "etc" / "passwd").write_text(PASSWD)
    (dest / "etc" / "group").write_text(GROUP)
