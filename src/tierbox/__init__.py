"""tierbox: run the same workload on any rung of the isolation ladder."""

from tierbox.errors import (
    CommandError,
    HostError,
    ImageError,
    ImageNotFoundError,
    NotSupportedError,
    SandboxError,
    SpecError,
    TierboxError,
    TierUnavailableError,
    UnsafeImageError,
    UsageError,
)
from tierbox.sandbox import Sandbox, make_spec, run
from tierbox.spec import (
    ExecResult,
    Limits,
    NetworkPolicy,
    SandboxSpec,
    Stats,
    Termination,
    TerminationKind,
)

__all__ = [
    "CommandError",
    "ExecResult",
    "HostError",
    "ImageError",
    "ImageNotFoundError",
    "Limits",
    "NetworkPolicy",
    "NotSupportedError",
    "Sandbox",
    "SandboxError",
    "SandboxSpec",
    "SpecError",
    "Stats",
    "Termination",
    "TerminationKind",
    "TierUnavailableError",
    "TierboxError",
    "UnsafeImageError",
    "UsageError",
    "make_spec",
    "run",
]
