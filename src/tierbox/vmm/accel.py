"""Which accelerator a guest runs under: KVM where a test boot proves it
works, else TCG (QEMU's software emulation).

A ``/dev/kvm`` that exists proves nothing: on hosts that are themselves VMs
it can be ``kvm_pvm``, on which stock Linux guest kernels do not boot. So
usable KVM is decided by booting a test guest of the tier's own kind with a
timeout (the tier supplies that boot), never by the device node alone. The
verdict is cached on disk under a key of everything it depends on (the host
kernel, QEMU, the guest build...), so the test boot runs once per change,
and in memory per :class:`Accelerator`. An environment variable forces
either choice (tests, debugging).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

G = TypeVar("G")

KVM_DEVICE = "/dev/kvm"
CHOICES = ("kvm", "tcg")


def kvm_device_problem() -> str | None:
    """Why KVM cannot even be tried here (no device, no access), or None."""
    if not os.path.exists(KVM_DEVICE):
        return f"no {KVM_DEVICE}"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"no usable {KVM_DEVICE} (this process cannot open it read-write)"
    return None


class Accelerator(Generic[G]):
    """The accelerator of one tier's guests, decided once and remembered.

    ``guest`` gives what the test boot boots (built when missing); ``key``
    names everything the verdict depends on; ``probe`` boots it under KVM and
    says whether it reached ``proof`` (with a detail for the reason).
    """

    def __init__(
        self,
        *,
        env: str,
        cache_file: Callable[[], Path],
        guest: Callable[[], G],
        key: Callable[[G], str],
        probe: Callable[[G], tuple[bool, str]],
        proof: str,
    ) -> None:
        self.env = env
        self._cache_file = cache_file
        self._guest = guest
        self._key = key
        self._probe = probe
        self._proof = proof
        self._choice: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def forced(self) -> str | None:
        """The choice forced by the environment variable, if any."""
        value = os.environ.get(self.env, "")
        return value if value in CHOICES else None

    def choice(self) -> tuple[str, str]:
        """("kvm" or "tcg", why). May run the test boot (once per key)."""
        with self._lock:
            if self._choice is None:
                self._choice = self._decide()
            return self._choice

    def known(self) -> str | None:
        """The choice if it is known without a test boot (forced, decided in
        this process, or cached on disk by any process), else None."""
        if self._choice is not None:
            return self._choice[0]
        forced = self.forced()
        if forced is not None:
            return forced
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return str(json.loads(self._cache_file().read_text())["accel"])
        return None

    def _decide(self) -> tuple[str, str]:
        forced = self.forced()
        if forced is not None:
            return forced, f"forced by {self.env}={forced}"
        problem = kvm_device_problem()
        if problem is not None:
            return "tcg", problem
        guest = self._guest()
        key = self._key(guest)
        cache = self._cache_file()
        # an unreadable or stale cache only means one more test boot
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            d = json.loads(cache.read_text())
            if d["key"] == key:
                return str(d["accel"]), str(d["reason"])
        ok, detail = self._probe(guest)
        verdict = (
            ("kvm", f"a KVM test boot reached {self._proof}")
            if ok
            else ("tcg", f"KVM unusable: a test boot failed ({detail})")
        )
        # not writable: the verdict still holds for this process
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "accel": verdict[0], "reason": verdict[1]}))
        return verdict
