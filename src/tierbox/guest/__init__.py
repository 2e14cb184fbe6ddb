"""The in-guest side of the microvm tier: its agent (C, static) and /init.

Both are plain files shipped with the package and built into the microVM's
initramfs by :mod:`tierbox.vmm.artifacts` at set-up.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENT_SOURCE = HERE / "agent.c"
INIT_SCRIPT = HERE / "init.sh"

__all__ = ["AGENT_SOURCE", "INIT_SCRIPT"]
