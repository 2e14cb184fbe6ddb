"""One error hierarchy for tierbox.

Every error tierbox raises derives from :class:`TierboxError`; foreign errors
are translated at the boundary with ``raise ... from exc``::

    TierboxError
    ├── UsageError                 bad input from the caller (CLI exit code 2)
    │   ├── SpecError              malformed spec: memory string, limits, command
    │   │   └── InvalidModuleError a file that is not a runnable WASI command module
    │   ├── UnknownTierError       a tier name that does not exist
    │   ├── ImageNotFoundError     an image that is not in the store
    │   ├── UnsupportedImageError  an image the tier cannot run and has no variant of
    │   ├── DockerfileError        a Dockerfile that does not parse or is malformed (file:line)
    │   └── AdvisoryDBError        an advisory directory (OSV export) that cannot be read
    ├── TierUnavailableError       the tier exists but cannot run on this host
    │   └── LibvirtUnreachableError  libvirtd cannot be reached: not running, not startable, gone
    ├── ImageError                 store corruption, digest mismatch, bad archive
    │   ├── UnsafeImageError       a hostile archive: ../ paths, escaping links, devices
    │   └── NotTarError            a file that is not a tar archive at all
    ├── CommandError               an external command failed (argv, exit code, stderr)
    ├── SandboxError               a sandbox operation failed
    │   ├── SandboxNotFoundError   no sandbox with that id
    │   ├── SandboxClosedError     the sandbox was already closed
    │   ├── SandboxDeadError       the sandbox died under its user (init or VM gone)
    │   ├── WaitTimeoutError       a background command still runs after wait(timeout_s)
    │   ├── SandboxFileError       a file operation inside the sandbox failed
    │   │   ├── FileTooLargeError  a read would exceed its max_bytes cap
    │   │   └── NotRegularFileError  a FIFO, device, socket or directory where a file was asked for
    │   ├── NotSupportedError      the tier cannot do this (e.g. snapshot)
    │   ├── VMNotFoundError        no tierbox VM with that name (also a UsageError)
    │   ├── VMExistsError          a VM, libvirt domain or sandbox has that name (also a UsageError)
    │   ├── SnapshotNotFoundError  a VM has no snapshot with that name (also a UsageError)
    │   ├── SnapshotExistsError    a VM has a snapshot with that name already (also a UsageError)
    │   ├── SnapshotHasChildrenError  a VM snapshot with children, deleted alone (also a UsageError)
    │   ├── SnapshotError          a microVM snapshot is missing, corrupted or for another machine
    │   ├── LibvirtError           libvirt refused or failed an operation (carries its code)
    │   ├── QMPError               QEMU refused a QMP command, or its monitor went away
    │   ├── AgentError             the guest agent refused a request (errno and message)
    │   ├── AgentGoneError         the guest agent's line closed: QEMU exited, the guest died
    │   ├── AgentTimeoutError      the guest agent did not answer in time
    │   │   └── AgentProtocolError the guest broke the agent protocol (a dead agent)
    │   └── AgentTooOldError       the guest runs an agent older than the host's protocol
    ├── HostError                  the host lacks something (cgroups, mounts)
    ├── AutoscaleError             the autoscaler could not reach a decision
    │   ├── HPASpecError           a malformed HPA or simulation file (also a UsageError)
    │   └── MetricUnavailableError a metric could not be computed from its samples
    ├── PoolError                  a warm pool could not do what was asked
    │   ├── PoolNotFoundError      no pool with that name (also a UsageError)
    │   │   └── FunctionNotFoundError  no function with that name
    │   ├── PoolExistsError        a pool or function has that name already (also a UsageError)
    │   ├── PoolExhaustedError     no member came free before a claim's timeout
    │   ├── PoolClosedError        the pool was closed or removed
    │   ├── DisruptionBudgetError  a drain could not go on without breaking the disruption budget
    │   └── PoolManagerError       the process hosting pools cannot be reached or started
    ├── BuildError                 an image build failed: a step's output, or buildah itself
    │   └── GateError              a lint or scan gate stopped a build before the image was stored
    ├── ScanError                  an SBOM or a vulnerability source could not be produced or read
    ├── KubeError                  Kubernetes export, advice or apply could not be done
    │   ├── ManifestError          a manifest or workload file that does not parse (UsageError)
    │   └── KubeApplyError         the API server (or kubeconfig) refused or failed an apply
    ├── DoctorError                tierbox doctor could not read what it was given
    │   ├── HistoryNotFoundError   no such run or sandbox in the run history (also a UsageError)
    │   ├── DoctorInputError       a file that is no pod, inspect JSON or cgroup (also a UsageError)
    │   └── ExplainError           the chat endpoint of --explain failed or answered nonsense
    ├── ServerError                the daemon (``tierbox serve``) could not do what was asked
    │   ├── AuthenticationError    no API key, or a wrong or revoked one (HTTP 401)
    │   ├── PermissionDeniedError  the key's tenant may not ask for this (host mounts, host network)
    │   ├── QuotaExceededError     a tenant quota would be exceeded; ``quota`` names it (HTTP 429)
    │   ├── InvalidRequestError    a request that does not validate, ``field`` named (a UsageError)
    │   ├── ExecNotFoundError      no command with that id in the sandbox (also a UsageError)
    │   ├── ShuttingDownError      the daemon is stopping and takes no new work
    │   └── ServerUnreachableError the daemon cannot be reached (no socket, refused, timed out)
    └── BenchError                 a benchmark step got a result it cannot use
        └── ProbeBuildError        an isolation probe program could not be built
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Sequence


class TierboxError(Exception):
    """Root of every error tierbox raises."""


class UsageError(TierboxError):
    """The caller asked for something malformed; the CLI exits with code 2."""


class SpecError(UsageError):
    """A sandbox spec, limit string or command is malformed."""


class UnknownTierError(UsageError):
    """A tier name that tierbox does not know."""


class ImageNotFoundError(UsageError):
    """The image is not in the store."""


class TierUnavailableError(TierboxError):
    """The tier exists but cannot run on this host; the message says why."""


class ImageError(TierboxError):
    """The image store or an image archive is broken."""


class UnsafeImageError(ImageError):
    """An image archive tried to write outside its root or create devices."""


class HostError(TierboxError):
    """The host lacks a facility tierbox needs (cgroups, mount namespaces)."""


class NotTarError(ImageError):
    """The file is not a tar archive at all."""


class BenchError(TierboxError):
    """A benchmark step got a result it cannot use (the bench reports it and goes on)."""


class ProbeBuildError(BenchError):
    """An isolation probe program could not be built (no compiler, a failed build)."""


# ---- autoscaling and warm pools (autoscale/, pools/) -------------------------------


class AutoscaleError(TierboxError):
    """The autoscaler could not reach a decision."""


class HPASpecError(AutoscaleError, UsageError):
    """A HorizontalPodAutoscaler, its behavior or a simulation file is malformed;
    the message names the field."""


class MetricUnavailableError(AutoscaleError):
    """A metric could not be computed from the samples given; ``reason`` is the
    Kubernetes condition reason (FailedGetResourceMetric, ...)."""

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class PoolError(TierboxError):
    """A warm pool could not do what was asked."""


class PoolNotFoundError(PoolError, UsageError):
    """No pool with that name: ``tierbox pool ls`` lists them."""


class FunctionNotFoundError(PoolNotFoundError):
    """No function with that name: ``tierbox fn ls`` lists them."""


class PoolExistsError(PoolError, UsageError):
    """A pool or function already has that name."""


class PoolExhaustedError(PoolError):
    """No member came free before the claim's timeout (the pool is at its
    max_size and every member is claimed, or members failed to start)."""


class PoolClosedError(PoolError):
    """The pool was closed or removed."""


class DisruptionBudgetError(PoolError):
    """A drain could not go on without taking ready+claimed members below the
    pool's disruption budget before its timeout; the message says why."""


class PoolManagerError(PoolError):
    """The process hosting pools and functions cannot be reached or started."""


class SandboxError(TierboxError):
    """A sandbox operation failed."""


class SandboxNotFoundError(SandboxError, UsageError):
    """No sandbox with that id exists."""


class SandboxClosedError(SandboxError):
    """The sandbox was closed already."""


class SandboxDeadError(SandboxError):
    """The sandbox died (its init or its VM exited) while still open: close it
    and create a new one. Nothing it held is reachable any more."""


class WaitTimeoutError(SandboxError):
    """A background command is still running when ``wait(timeout_s)`` gave up
    (it keeps running: wait again or kill it)."""


class SandboxFileError(SandboxError):
    """A file operation inside a sandbox failed; ``path`` is the sandbox path."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class FileTooLargeError(SandboxFileError):
    """A read would return more than its ``max_bytes`` cap."""


class NotRegularFileError(SandboxFileError):
    """The path names a FIFO, device, socket or directory, not a regular file."""


class NotSupportedError(SandboxError):
    """The tier cannot perform this operation."""


class CommandError(TierboxError):
    """An external command failed; carries its argv, exit code and stderr."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stderr: str,
        *,
        message: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        what = message or f"command failed: {' '.join(self.argv)}"
        code = "timed out" if returncode is None else f"exit code {returncode}"
        tail = stderr.strip()[-2000:]
        super().__init__(f"{what} ({code})" + (f": {tail}" if tail else ""))


class InvalidModuleError(SpecError):
    """The file is not a runnable WASI command module (bad bytes, a component,
    imports tierbox does not provide, no ``_start``)."""


class UnsupportedImageError(UsageError):
    """The image exists, but this tier cannot run it and knows no variant of it
    that it can (a Linux image on the wasm tier); the message names images that work."""


# ---- the VM tiers (microvm, vm) and their machinery (vmm/, libvirt_host) ------------


class LibvirtUnreachableError(TierUnavailableError):
    """libvirtd cannot be reached (not running, not startable, or it went
    away); the message says how to start it."""


class VMNotFoundError(SandboxError, UsageError):
    """No tierbox VM with that name: ``tierbox vm ls`` lists them."""


class VMExistsError(SandboxError, UsageError):
    """A VM (or another libvirt domain, or a sandbox) already has that name."""


class SnapshotNotFoundError(SandboxError, UsageError):
    """The VM has no snapshot with that name."""


class SnapshotExistsError(SandboxError, UsageError):
    """The VM already has a snapshot with that name."""


class SnapshotHasChildrenError(SandboxError, UsageError):
    """A snapshot with children cannot be deleted alone."""


class SnapshotError(SandboxError):
    """A microVM snapshot is missing, truncated, corrupted or made for another machine."""


class LibvirtError(SandboxError):
    """libvirt refused or failed an operation; ``code`` is libvirt's error number."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class QMPError(SandboxError):
    """QEMU refused a QMP command or the monitor connection failed."""


class AgentError(SandboxError):
    """The guest agent answered with an error (errno and message from the guest)."""

    def __init__(self, err: int, message: str) -> None:
        self.errno = err
        self.message = message
        name = errno_mod.errorcode.get(err, str(err))
        super().__init__(f"{message} ({name})")


class AgentGoneError(SandboxError):
    """The agent's connection closed: QEMU exited or the guest died."""


class AgentTimeoutError(SandboxError):
    """The agent did not answer in time."""


class AgentProtocolError(AgentTimeoutError):
    """The guest broke the agent protocol (an impossible field, a frame its
    request cannot have): the agent is treated as dead, like one that stopped
    answering, since a guest root may be speaking in its place."""


class AgentTooOldError(SandboxError):
    """The guest runs an agent older than this host's protocol (a snapshot or
    VM made before an upgrade)."""


# ---- building, linting and scanning images (build/) -----------------------------------


class DockerfileError(UsageError):
    """A Dockerfile that does not parse, or names an unknown instruction;
    ``path`` and ``line`` (1-based, 0 when unknown) say where."""

    def __init__(self, message: str, *, path: str = "", line: int = 0) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")


class AdvisoryDBError(UsageError):
    """An advisory directory given with ``--db`` (an OSV export) is missing or malformed."""


class BuildError(TierboxError):
    """An image build failed; ``output`` holds the tail of the failing step's output.
    Nothing was stored."""

    def __init__(self, message: str, *, output: str = "") -> None:
        self.summary = message
        self.output = output
        super().__init__(message + (f"\n{output}" if output else ""))


class GateError(BuildError):
    """A lint or scan gate found a finding at or above its level; ``gate`` is
    ``lint`` or ``scan`` and ``finding`` names what stopped the build."""

    def __init__(self, message: str, *, gate: str, finding: str) -> None:
        self.gate = gate
        self.finding = finding
        super().__init__(message)


class ScanError(TierboxError):
    """An SBOM or vulnerability source could not be produced or read (syft
    failed, an image's rootfs is unreadable)."""


# ---- the HTTP daemon and its remote SDK (server/, client/) ----------------------------


class ServerError(TierboxError):
    """The tierbox daemon could not do what was asked, or answered something
    the client cannot read."""


class AuthenticationError(ServerError):
    """No API key was given where one is needed, or the key is wrong or revoked
    (the message never repeats the key)."""


class PermissionDeniedError(ServerError):
    """The key's tenant may not ask for this: host mounts and the host network
    are the host operator's."""


class QuotaExceededError(ServerError):
    """A tenant quota would be exceeded; ``quota`` names it (``sandboxes``,
    ``memory_mib`` or ``tiers``). Nothing was started."""

    def __init__(self, message: str, *, quota: str = "") -> None:
        self.quota = quota
        super().__init__(message)


class InvalidRequestError(ServerError, UsageError):
    """A request that does not validate; ``field`` names the field (dotted)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        self.field = field
        super().__init__(message)


class ExecNotFoundError(ServerError, UsageError):
    """No command with that id in the sandbox."""


class ShuttingDownError(ServerError):
    """The daemon is stopping: it finishes what runs and takes no new work."""


class ServerUnreachableError(ServerError):
    """The daemon cannot be reached: no socket, connection refused or timed out."""


# ---- Kubernetes export, advice and apply (kube/), tierbox doctor (doctor/) ----------------


class KubeError(TierboxError):
    """Kubernetes export, advice or apply could not be done."""


class ManifestError(KubeError, UsageError):
    """A manifest, workload file or bench result that does not parse or lacks a
    field; the message names the file and the field."""


class KubeApplyError(KubeError):
    """The API server refused or failed an apply, or no kubeconfig could be
    loaded; ``status`` is the HTTP status where there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class DoctorError(TierboxError):
    """``tierbox doctor`` could not read what it was given."""


class HistoryNotFoundError(DoctorError, UsageError):
    """No run or sandbox with that id or name in this user's run history."""


class DoctorInputError(DoctorError, UsageError):
    """A file that is neither a pod (kubectl get -o json|yaml), nor docker or
    podman inspect output, nor a cgroup directory."""


class ExplainError(DoctorError):
    """The chat endpoint of ``--explain`` could not be reached, refused the
    request or answered with something that is not a chat completion."""
