"""The machinery under the microvm and vm tiers, one module per concept.

- :mod:`~tierbox.vmm.artifacts` builds what the guest boots: the Debian cloud
  kernel (decompressed for PVH), the initramfs with busybox, modules and the
  agent, and per-image read-only ext4 root disks.
- :mod:`~tierbox.vmm.qemu` turns a machine description into a QEMU
  ``-M microvm`` argv and runs it (through the one runner) in its own
  process group.
- :mod:`~tierbox.vmm.qmp` is a small QMP client (with fd passing).
- :mod:`~tierbox.vmm.agent` speaks the framed protocol of the guest agent.
- :mod:`~tierbox.vmm.guest` is what both tiers share about a guest: the
  workload's user, environment and working directory, and its stats.
- :mod:`~tierbox.vmm.accel` decides KVM or TCG by a test boot, cached.
- :mod:`~tierbox.vmm.snapshot` writes and checks microVM snapshot manifests.
- :mod:`~tierbox.vmm.libvirt_guest`, :mod:`~tierbox.vmm.libvirt_domain` and
  :mod:`~tierbox.vmm.libvirt_template` are the vm tier's guest build, domain
  XML and saved templates.
- :mod:`~tierbox.vmm.build` is the set-up entry point
  (``python -m tierbox.vmm.build``, run by ``scripts/setup.d/50-microvm.sh``).
"""
