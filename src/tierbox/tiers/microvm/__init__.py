"""The ``microvm`` tier: every sandbox is a QEMU ``-M microvm`` guest with its
own Linux kernel (Debian's cloud kernel), KVM when a test boot proves it
works, TCG (software emulation) otherwise.

Inside the guest, the agent is PID 1 (the initramfs's /init): it loads the
virtio modules, mounts the image's read-only ext4 disk under a tmpfs overlay,
then serves the host over a virtio-serial port (:mod:`tierbox.vmm.agent`). Each command
runs chroot'ed into the overlay, as the sandbox user, in its own guest cgroup
(pids limit, killed as a group on timeout or output overflow). Commands,
file transfers, stats and process listings run side by side on one agent
line; a command can run on a pseudo-terminal (``tty=True``: resize and
Ctrl-C pass through). What a command leaves running (``sleep 300 &``) lives
on until the sandbox closes, as in a container.

Limits: ``memory_mib`` is the guest's RAM (at least
:data:`~tierbox.vmm.qemu.MIN_MEMORY_MIB`); an OOM inside the guest is
reported as ``oom_killed`` with the guest kernel's counter and log line.
``cpus`` becomes the vCPU count (rounded up) and a CPU quota on the QEMU
process's cgroup. ``pids`` is a guest cgroup limit per exec. ``timeout_s`` is
enforced per exec by the agent, and the host gives up on a guest that stops
answering a few seconds later (then stops the VM). ``disk_mib`` caps the
writable layer.

Snapshots pause the guest, save device state by QMP migration (RAM skipped
with ``x-ignore-shared``) and copy the RAM file; restores and clones start a
new QEMU with ``-incoming`` whose RAM maps the snapshot's RAM file
copy-on-write, then reseed the guest's RNG and set its clock.

The modules, one job each:

- :mod:`~tierbox.tiers.microvm.tier`: :class:`MicroVMTier`: availability,
  the accelerator (a KVM test boot of a microVM), booting, attaching;
- :mod:`~tierbox.tiers.microvm.instance`: :class:`MicroVMInstance`: the
  agent line, exec, files, stats, how a dead guest ended, close;
- :mod:`~tierbox.tiers.microvm.snapshots`: snapshot, restore and clones;
- :mod:`~tierbox.tiers.microvm.reap`: the leftovers of crashed runs.
"""

from tierbox.tiers.microvm.instance import CALL_TIMEOUT_S, CAPABILITIES, MicroVMInstance
from tierbox.tiers.microvm.snapshots import RESTORE_TIMEOUT_S
from tierbox.tiers.microvm.tier import ACCEL_ENV, BOOT_TIMEOUT_S, MicroVMTier

__all__ = [
    "ACCEL_ENV",
    "BOOT_TIMEOUT_S",
    "CALL_TIMEOUT_S",
    "CAPABILITIES",
    "RESTORE_TIMEOUT_S",
    "MicroVMInstance",
    "MicroVMTier",
]
