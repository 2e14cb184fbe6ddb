"""The ``vm`` tier: every sandbox is a full virtual machine run by libvirt.

A VM is a libvirt domain on ``qemu:///system``: a q35 PC with its own Linux
kernel (the microVM tier's Debian cloud kernel, booted directly), a virtio
disk that is a qcow2 overlay over a per-image base disk, the guest agent on
a virtio-serial port, the serial console logged to a file, and no network
unless the spec asks for egress (then a virtio-net NIC whose backend is passt
inside the sandbox's gateway namespace, which also publishes ports: see
:mod:`~tierbox.tiers.vm.network`). The domain type is ``kvm`` only where a
KVM test boot reached the guest, else ``qemu`` (TCG, software emulation).
See :mod:`tierbox.vmm.libvirt_domain` for the XML and
:mod:`tierbox.vmm.libvirt_guest` for what it boots.

Inside, workloads run as root by default (the guest kernel is the isolation
boundary; ``SandboxSpec.user`` picks another uid). ``memory_mib`` is the
guest's RAM, ``cpus`` the vCPU count (rounded up) plus a libvirt CPU quota,
``pids`` a guest cgroup limit per exec, ``timeout_s`` is enforced per exec by
the agent. Commands run side by side, on a pseudo-terminal if asked
(``tty=True``), and what a command leaves running lives on until the VM
stops, as in a container. The serial console is logged by virtlogd
(``console_tail``).

The modules, one job each:

- :mod:`~tierbox.tiers.vm.tier`: :class:`VMTier`: availability, the
  accelerator (a KVM test boot as a libvirt domain), shapes, create;
- :mod:`~tierbox.tiers.vm.instance`: :class:`VMInstance`: the agent line,
  exec, files, stats, start/stop/close;
- :mod:`~tierbox.tiers.vm.snapshots`: libvirt snapshots with ``virsh``
  parity, and the fast in-place revert;
- :mod:`~tierbox.tiers.vm.templates`: saved templates of VM shapes, so
  that only the first VM of a shape cold-boots;
- :mod:`~tierbox.tiers.vm.network`: the egress NIC (gateway, passt) and
  published ports;
- :mod:`~tierbox.tiers.vm.records`: state records, finding and listing
  VMs, removing them, reaping the leftovers of crashed runs;
- :mod:`~tierbox.tiers.vm.shared`: names, limits, deadlines and paths, and
  the libvirt lookups and error boundary the others use;
- :mod:`~tierbox.tiers.vm.entry`: ``python -m tierbox.tiers.vm``, the
  child-process entry point (set-up, status, template builds).
"""

from tierbox.tiers.vm.entry import main, setup
from tierbox.tiers.vm.instance import VMInstance
from tierbox.tiers.vm.records import VMInfo
from tierbox.tiers.vm.shared import (
    CAPABILITIES,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY_MIB,
    MIN_MEMORY_MIB,
    domains_dir,
    sockets_dir,
)
from tierbox.tiers.vm.tier import Shape, VMTier

__all__ = [
    "CAPABILITIES",
    "DEFAULT_IMAGE",
    "DEFAULT_MEMORY_MIB",
    "MIN_MEMORY_MIB",
    "Shape",
    "VMInfo",
    "VMInstance",
    "VMTier",
    "domains_dir",
    "main",
    "setup",
    "sockets_dir",
]
