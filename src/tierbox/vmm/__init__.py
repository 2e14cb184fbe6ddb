"""The machinery under the microvm tier, one module per concept.

- :mod:`~tierbox.vmm.artifacts` builds what the guest boots: the Debian cloud
  kernel (decompressed for PVH), the initramfs with busybox, modules and the
  agent, and per-image read-only ext4 root disks.
- :mod:`~tierbox.vmm.qemu` turns a machine description into a QEMU
  ``-M microvm`` argv, runs it in its own process group and knows which
  accelerator works here.
- :mod:`~tierbox.vmm.qmp` is a small QMP client (with fd passing).
- :mod:`~tierbox.vmm.agent` speaks the framed protocol of the guest agent.
- :mod:`~tierbox.vmm.snapshot` writes and checks snapshot manifests.
- :mod:`~tierbox.vmm.build` is the set-up entry point
  (``python -m tierbox.vmm.build``, run by ``scripts/setup.d/50-microvm.sh``).
"""
