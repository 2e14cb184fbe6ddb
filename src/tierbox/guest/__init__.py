"""The in-guest side of the microvm tier: the agent (C, built static).

``agent.c`` is shipped with the package and compiled into the microVM's
initramfs by :mod:`tierbox.vmm.artifacts` at set-up, where it is both /init
(it mounts the root overlay and loads the virtio modules) and the agent the
host talks to over virtio-serial.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENT_SOURCE = HERE / "agent.c"

__all__ = ["AGENT_SOURCE"]
