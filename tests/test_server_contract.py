"""The contract suite once more, through a daemon, on container and wasm: the
same tests as ``tests/tiers/test_contract.py``, with every sandbox made,
driven and closed by the remote SDK (``tierbox.Client``) over the daemon's
unix socket, so remote sandboxes keep the local ones' promises.

The suite's ``box``/``pbox`` fixtures are replaced here by boxes whose
``create`` is ``client.sandboxes.create`` and whose one-shot ``run`` is
``client.run``; the few tests that call ``get_tier(...).run`` or
``Sandbox.list`` directly get the daemon's through the module they live in.
(The dead-sandbox test kills host processes of a local instance, and is not
repeated.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import tests.tiers.test_contract as contract
from tests.test_server import WASM_IMAGE, Daemon, require_engines, running
from tests.tiers.test_contract import (  # noqa: F401 - collected here, with the fixtures below
    many,
    test_exec_timeout_keeps_the_sandbox_usable,
    test_files_make_parents_and_round_trip,
    test_files_parents_belong_to_the_workload,
    test_fork_bomb_is_stopped_by_the_pids_limit,
    test_infinite_loop_times_out,
    test_long_lived_sandbox_exec_files_stats,
    test_memory_bomb_is_oom_killed,
    test_missing_command_exits_127_with_a_clear_line,
    test_one_shot_exit_code_and_output,
    test_oom_of_a_child_is_caught_even_when_pid1_exits_zero,
    test_output_flood_is_capped,
    test_pids_counts_the_workload_only,
    test_repr_names_id_tier_and_image,
    test_sandboxes_share_nothing_writable,
    test_stdin_reaches_the_workload,
)
from tierbox import Client, SandboxSpec
from tierbox.spec import ExecResult


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Daemon, Client]]:
    require_engines()
    with running(keys=("contract",)) as (d, keys), d.client(keys["contract"]) as client:
        yield d, client


class RemoteTier:
    """What the suite calls ``get_tier(name)`` for: one-shot runs on the daemon."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def run(
        self, spec: SandboxSpec, argv: list[str], *, stdin: bytes | str | None = None
    ) -> ExecResult:
        return self.client.run(spec.image, argv, tier=self.name, spec=spec, stdin=stdin)


class RemoteSandboxes:
    """What the suite calls ``Sandbox`` for: ``Sandbox.list()`` on the daemon."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def list(self) -> list[Any]:
        return self.client.sandboxes.list()


@dataclass(frozen=True)
class RemoteBox(contract.Box):
    client: Client | None = None

    def create(self, **kw: object) -> Any:
        opts = {"memory_mib": self.memory_mib, "pids": 64, "timeout_s": 20.0} | kw
        assert self.client is not None
        return self.client.sandboxes.create(self.image, tier=self.tier, **opts)

    def run(self, name: str, **kw: object) -> ExecResult:
        stdin = kw.pop("stdin", None)
        assert self.client is not None
        return RemoteTier(self.client, self.tier).run(self.spec(**kw), self.cmd(name), stdin=stdin)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _through_the_daemon(served: tuple[Daemon, Client], monkeypatch: pytest.MonkeyPatch) -> None:
    _, client = served
    monkeypatch.setattr(contract, "get_tier", lambda name: RemoteTier(client, name))
    monkeypatch.setattr(contract, "Sandbox", RemoteSandboxes(client))


def _remote_box(client: Client, tier: str) -> RemoteBox:
    if tier == "wasm":
        return RemoteBox(tier, WASM_IMAGE, 64, client)
    return RemoteBox(tier, "busybox", 64, client)


@pytest.fixture(params=["container", "wasm"])
def box(request: pytest.FixtureRequest, served: tuple[Daemon, Client]) -> RemoteBox:
    return _remote_box(served[1], request.param)


@pytest.fixture(params=["container"])
def pbox(request: pytest.FixtureRequest, served: tuple[Daemon, Client]) -> RemoteBox:
    return _remote_box(served[1], request.param)
