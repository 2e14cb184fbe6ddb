"""Unit tests that need no engine: spec parsing, argument checks, the error
tree, the one runner, the OCI bundle writer."""

from __future__ import annotations

import inspect
import math
import subprocess
from pathlib import Path

import pytest

import tierbox
from tierbox import errors, make_spec
from tierbox.errors import CommandError, SpecError, TierboxError, UsageError
from tierbox.host.runner import exit_error, run, spawn
from tierbox.spec import (
    Limits,
    NetworkPolicy,
    SandboxSpec,
    Termination,
    TerminationKind,
    check_run_args,
    parse_duration_s,
    parse_memory_mib,
    parse_user,
    sandbox_path,
)
from tierbox.tiers import oci


@pytest.mark.parametrize(
    ("text", "mib"), [("256m", 256), ("1g", 1024), ("512MiB", 512), ("1.5g", 1536)]
)
def test_memory_sizes(text: str, mib: int) -> None:
    assert parse_memory_mib(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "12q", "-5m", "100"])
def test_bad_memory_sizes_name_the_value(text: str) -> None:
    with pytest.raises(SpecError, match=repr(text).strip("'") or "memory"):
        parse_memory_mib(text)


def test_durations() -> None:
    assert parse_duration_s("10s") == 10 and parse_duration_s("500ms") == 0.5
    assert parse_duration_s("2m") == 120 and parse_duration_s("1h") == 3600
    for bad in ("soon", "0", "nan", "inf", "-1s"):
        with pytest.raises(SpecError):
            parse_duration_s(bad)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"memory_mib": "256m"}, "memory_mib='256m' is a string"),
        ({"memory_mib": 2}, "at least 4 MiB"),
        ({"pids": 1.5}, "pids=1.5 must be a whole number"),
        ({"pids": 0}, "pids=0 is too small"),
        ({"timeout_s": math.nan}, "finite"),
        ({"timeout_s": math.inf}, "finite"),
        ({"timeout_s": -1}, "positive"),
        ({"cpus": 10_000}, "out of range"),
        ({"cpus": "2"}, "must be a number"),
        ({"network": "everywhere"}, "not a network policy"),
        ({"env": {"A": 1}}, "env must map str"),
        ({"user": 1000}, "user=1000"),
        ({"user": "bob"}, "numeric uid"),
        ({"workdir": ""}, "workdir is empty"),
    ],
)
def test_bad_spec_options_are_usage_errors_naming_the_option(
    options: dict[str, object], needle: str
) -> None:
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make_spec("busybox", **options)  # type: ignore[arg-type]


def test_defaults_live_in_limits_only() -> None:
    spec = make_spec("busybox")
    assert spec.limits == Limits()
    params = inspect.signature(make_spec).parameters
    for name in ("memory_mib", "cpus", "pids", "timeout_s", "disk_mib", "output_bytes"):
        assert params[name].default == getattr(Limits, name), name


def test_spec_round_trips_through_dict() -> None:
    spec = make_spec("busybox", memory_mib=64, cpus=0.5, env={"A": "b"}, user="1000:1000")
    assert SandboxSpec.from_dict(spec.to_dict()) == spec
    assert spec.network is NetworkPolicy.NONE


def test_unknown_options_name_the_real_ones() -> None:
    from tierbox.sandbox import _spec_from

    with pytest.raises(UsageError, match="unknown option memry_mib: the options are memory_mib"):
        _spec_from("busybox", {"memry_mib": 64})


@pytest.mark.parametrize(
    ("path", "cwd", "want"),
    [
        ("/tmp/x", "/", "/tmp/x"),
        ("/./tmp/x", "/", "/tmp/x"),
        ("../tmp/x", "/", "/tmp/x"),
        ("//a//b/../c", "/", "/a/c"),
        ("rel.txt", "/tmp", "/tmp/rel.txt"),
        ("/..", "/", "/"),
    ],
)
def test_sandbox_paths_are_normalised_once(path: str, cwd: str, want: str) -> None:
    assert sandbox_path(path, cwd=cwd) == want


@pytest.mark.parametrize("bad", ["", "/tmp/a\0b", b"/tmp/x", None, 3])
def test_bad_sandbox_paths(bad: object) -> None:
    with pytest.raises(UsageError):
        sandbox_path(bad)


def test_users() -> None:
    assert parse_user(None) is None
    assert parse_user("1000") == (1000, 1000)
    assert parse_user("1000:50") == (1000, 50)
    for bad in ("bob", "1:2:3", "-1", "4294967295"):
        with pytest.raises(SpecError):
            parse_user(bad)


def test_run_arguments_are_checked_once() -> None:
    assert check_run_args(["echo", "hi"], "text", None, None) == (["echo", "hi"], b"text")
    assert check_run_args([], None, None, None, allow_empty=True) == ([], None)
    for argv in ("echo hi", b"echo", [], ["echo", 3], ["a\0b"]):
        with pytest.raises(UsageError):
            check_run_args(argv, None, None, None)
    with pytest.raises(UsageError, match="stdin"):
        check_run_args(["cat"], 42, None, None)
    with pytest.raises(UsageError, match="timeout_s"):
        check_run_args(["true"], None, None, math.nan)


@pytest.mark.parametrize(
    ("term", "status"),
    [
        (Termination(TerminationKind.EXITED, exit_code=7), 7),
        (Termination(TerminationKind.TIMED_OUT, signal=9), 124),
        (Termination(TerminationKind.OOM_KILLED, signal=9), 137),
        (Termination(TerminationKind.SIGNALED, signal=15), 143),
        (Termination(TerminationKind.OUTPUT_LIMIT, signal=9), 137),
    ],
)
def test_shell_status(term: Termination, status: int) -> None:
    assert term.shell_status == status


def test_every_error_derives_from_the_root_and_is_exported() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, Exception) and c.__module__ == errors.__name__
    ]
    assert len(classes) > 10
    for c in classes:
        assert issubclass(c, TierboxError), c
        assert c.__name__ in errors.__doc__, f"{c.__name__} is not in the errors.py tree"
        assert getattr(tierbox, c.__name__, None) is c, f"tierbox.{c.__name__} is not exported"


def test_error_classes_are_defined_only_in_errors_py() -> None:
    src = Path(tierbox.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for line in path.read_text().splitlines():
            if line.startswith("class ") and "Error(" in line:
                offenders.append(f"{path.relative_to(src)}: {line}")
    assert offenders == []


def test_runner_turns_failures_into_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo bad >&2; exit 3"])
    assert info.value.returncode == 3 and info.value.argv[0] == "sh"
    assert "bad" in info.value.stderr and "exit code 3" in str(info.value)
    with pytest.raises(CommandError) as info:
        run(["sleep", "5"], timeout_s=0.2)
    assert info.value.returncode is None and "timed out" in str(info.value)
    with pytest.raises(CommandError) as info:
        spawn(["/no/such/program"])
    assert info.value.returncode == 127
    log = tmp_path / "log"
    log.write_text("x" * 10_000 + "the real reason")
    proc = spawn(["sh", "-c", "exit 4"], stdout=subprocess.DEVNULL)
    proc.wait()
    err = exit_error(proc, message="it failed", log=log)
    assert err.returncode == 4 and err.stderr.endswith("the real reason")
    assert len(err.stderr) <= 4000


def test_bundle_is_hardened() -> None:
    spec = make_spec("busybox", memory_mib=64, pids=32)
    proc = oci.process_json(["sh"], spec, env={"PATH": "/bin"}, cwd="/")
    assert proc["user"] == {"uid": 65534, "gid": 65534}
    assert proc["noNewPrivileges"] is True
    assert all(v == [] for v in proc["capabilities"].values())
    cfg = oci.bundle_config(
        rootfs=Path("/x"), process=proc, spec=spec, cgroups_path="tierbox/x", hostname="h"
    )
    assert cfg["root"]["readonly"] is True
    assert {"type": "network"} in cfg["linux"]["namespaces"]
    assert cfg["linux"]["resources"]["memory"]["limit"] == 64 << 20
    assert cfg["linux"]["resources"]["pids"] == {"limit": 32}
    names = {n for rule in cfg["linux"]["seccomp"]["syscalls"] for n in rule["names"]}
    for denied in ("unshare", "setns", "keyctl", "add_key", "request_key", "mount"):
        allowed = [
            r
            for r in cfg["linux"]["seccomp"]["syscalls"]
            if denied in r["names"] and r["action"] == "SCMP_ACT_ALLOW"
        ]
        assert not allowed, (denied, allowed)
    assert "read" in names


def test_pinned_kill_waits_for_the_exit_and_spares_a_dead_one() -> None:
    """close() kills a container's init through its pidfd and waits: the call
    returns once the process has exited, and is harmless when it already has."""
    from tierbox.host.pinned import PinnedProcess, start_time

    proc = subprocess.Popen(["sleep", "60"])
    pinned = PinnedProcess(proc.pid, start_time(proc.pid), label="t")
    assert pinned.alive()
    assert pinned.kill(timeout_s=5.0)
    assert not pinned.alive()
    assert proc.wait(timeout=5) == -9
    assert pinned.kill(timeout_s=0.1)  # exited (and reaped): nothing to signal
    pinned.close()
    assert pinned.kill(timeout_s=0.1)  # closed: nothing pinned
