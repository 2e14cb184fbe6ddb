"""Facts about the machine every bench result is attached to.

Numbers without the hardware they were measured on mean little: cores,
memory, CPU model, kernel, whether this host is itself a VM, the accelerator
the VM tiers get (KVM or TCG, as the microvm tier reports it), and the engine
versions of every tier.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tierbox.tiers import get_tier, tier_names


def read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in read_text("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def host_boot_id() -> str:
    return read_text("/proc/sys/kernel/random/boot_id").strip()


def _cpu_model() -> str:
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _is_vm() -> bool:
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            return " hypervisor" in line
    return False


def _os_name() -> str:
    for line in read_text("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def tier_accelerator(info: dict[str, Any]) -> str:
    """KVM, TCG or unknown, from a VM tier's availability text."""
    low = f"{info.get('reason', '')} {info.get('engine', '')}".lower()
    return "TCG" if "tcg" in low else "KVM" if "kvm" in low else "unknown"


def accelerator(engines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """KVM or TCG, as the microvm tier (else the vm tier) says in its
    availability text; "unknown" with the reason when neither tier can tell."""
    for name in ("microvm", "vm"):
        info = engines.get(name)
        if not info or not info.get("available"):
            continue
        return {
            "kind": tier_accelerator(info),
            "source": f"{name} tier: {info.get('reason', '')}".strip(),
        }
    why = "; ".join(
        f"{n} tier unavailable: {engines[n].get('reason', '')}"
        for n in ("microvm", "vm")
        if n in engines
    )
    return {
        "kind": "unknown",
        "source": why or "no microvm or vm tier to ask",
        "dev_kvm_present": Path("/dev/kvm").exists(),
    }


def engine_facts() -> dict[str, dict[str, Any]]:
    """Per tier: availability, engine, version, why (never raises)."""
    out: dict[str, dict[str, Any]] = {}
    for name in tier_names():
        try:
            tier = get_tier(name)
            info = tier.available().to_dict()
            info["isolation"] = tier.isolation
        except Exception as exc:  # a tier's own check blew up: report, do not stop
            info = {"available": False, "reason": f"availability check failed: {exc}"}
        out[name] = info
    return out


def machine_facts(engines: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    engines = engines if engines is not None else engine_facts()
    mem = meminfo()
    affinity = len(os.sched_getaffinity(0))  # Linux only, as tierbox is
    facts: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "cpu_model": _cpu_model(),
        "memory_total_bytes": mem.get("MemTotal"),
        "memory_available_bytes": mem.get("MemAvailable"),
        "kernel": platform.release(),
        "os": _os_name(),
        "arch": platform.machine(),
        "host_is_vm": _is_vm(),
        "accelerator": accelerator(engines),
        "python": sys.version.split()[0],
        "tierbox": _version("tierbox"),
        "wasmtime": _version("wasmtime"),
        "engines": {
            name: {
                "available": bool(info.get("available")),
                "engine": info.get("engine", ""),
                "version": info.get("version", ""),
                "reason": info.get("reason", ""),
            }
            for name, info in engines.items()
        },
    }
    with contextlib.suppress(OSError):
        facts["load_avg_1m"] = os.getloadavg()[0]
    return facts
