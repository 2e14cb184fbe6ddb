"""The daemon under faults and load, as a real process: graceful shutdown on
SIGTERM, ``kill -9`` at rest, mid-create and mid-exec with reconciliation
after the restart, 50 concurrent clients, and fuzzing of the whole API from
its OpenAPI schema with schemathesis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import assert_gone, wait_until
from tests.test_server import WASM_IMAGE, Daemon, require_engines, running
from tierbox import Sandbox
from tierbox.errors import ShuttingDownError


@pytest.fixture(autouse=True, scope="module")
def _engines() -> None:
    require_engines()


def _gone(ids: set[str]) -> bool:
    try:
        assert_gone(ids)
    except AssertionError:
        return False
    return True


def _host_procs(sandbox_id: str) -> set[int]:
    """Host processes whose command line names the sandbox."""
    out = subprocess.run(["pgrep", "-f", sandbox_id], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.fixture
def fresh() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        d.env.pop("TIERBOX_SERVER_FAULT", None)
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        d.cleanup()


def test_sigterm_drains_then_exits_leaving_sandboxes_running(fresh: Daemon) -> None:
    d = fresh.start()
    with d.client() as client:
        box = client.sandboxes.create("busybox", memory_mib=64, keep=True)
        wasm = client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64, keep=True)
        bg = box.run(["sleep", "60"], background=True)
        ended: dict[str, Any] = {}

        def follow() -> None:
            with (
                d.http() as h,
                h.stream("GET", f"/v1/sandboxes/{box.id}/execs/{bg.id}/events", timeout=60) as r,
            ):
                for line in r.iter_lines():
                    if line.startswith("data:") and '"exit"' in line:
                        ended.update(json.loads(line[5:]))

        def foreground() -> None:
            ended["fg"] = box.run(["sh", "-c", "sleep 2; echo finished"])

        threads = [threading.Thread(target=follow), threading.Thread(target=foreground)]
        for t in threads:
            t.start()
        wait_until(lambda: len(box.processes()) >= 3, timeout_s=20, what="both commands to start")
        d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        with d.http() as h:
            wait_until(lambda: h.get("/readyz").status_code == 503, what="the drain")
            r = h.post("/v1/sandboxes", json={"image": "busybox", "memory_mib": 64})
            assert r.status_code == 503 and r.json()["code"] == "shutting_down"
        for t in threads:
            t.join(60)
        assert d.proc.wait(60) == 0  # type: ignore[union-attr]
    # the foreground command finished within the grace period
    assert ended["fg"].stdout == b"finished\n"
    # the background one was cancelled, and its client was told
    assert ended["exec"]["status"] == "cancelled"
    assert ended["exec"]["error"]["code"] == "shutting_down"
    assert "shut down" in ended["exec"]["message"]
    # the sandboxes are still running
    live = {r.id for r in Sandbox.list()}
    assert {box.id, wasm.id} <= live
    d.start()
    with d.client() as client:
        for sid in (box.id, wasm.id):
            sb = client.sandboxes.get(sid)
            assert sb.run(["toolbox", "echo", "ok"] if sb.tier == "wasm" else ["echo", "ok"]).ok
        with pytest.raises(ShuttingDownError):
            from tierbox.client._common import result_of

            result_of(client.json("GET", f"/v1/sandboxes/{box.id}/execs/{bg.id}"))


def test_kill9_then_restart_finds_every_sandbox_and_reaps_dead_ones(fresh: Daemon) -> None:
    d = fresh.start()
    with d.client() as client:
        a = client.sandboxes.create("busybox", memory_mib=64, keep=True)
        b = client.sandboxes.create("busybox", memory_mib=64, keep=True)
        w = client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64, keep=True)
        for sb in (a, b, w):
            sb.files.write("/tmp/mark", sb.id)
    d.kill9()
    # b's engine dies while no daemon watches
    for pid in Sandbox.connect(b.id).instance.host_pids():
        os.kill(pid, signal.SIGKILL)
    d.start()
    with d.client() as client:
        listed = {s.id: s for s in client.sandboxes.list()}
        assert set(listed) >= {a.id, w.id} and b.id not in listed
        for sid in (a.id, w.id):
            sb = client.sandboxes.get(sid)
            assert sb.files.read_text("/tmp/mark") == sid
            assert sb.run(["toolbox", "echo", "x"] if sb.tier == "wasm" else ["true"]).ok
        dead = client.json("GET", f"/v1/sandboxes/{b.id}")
        assert dead["state"] == "dead" and "died" in dead["reason"]
        everything = client.json("GET", "/v1/sandboxes", params={"ended": True})
        ids = [s["id"] for s in everything]
        assert len(ids) == len(set(ids)) == 3  # nothing lost, nothing duplicated
        with d.http() as h:
            assert 'tierbox_daemon_restarts{previous="crash"} 1.0' in h.get("/metrics").text
    wait_until(lambda: _gone({b.id}), timeout_s=20, what="the dead sandbox to be reaped")


@pytest.mark.parametrize("point", ["before-create", "after-create"])
def test_kill9_mid_create_leaves_no_orphan(fresh: Daemon, point: str) -> None:
    d = fresh
    d.env["TIERBOX_SERVER_FAULT"] = f"{point}:60"
    d.start()
    host_before = {r.id for r in Sandbox.list()}  # other processes may make more meanwhile

    def create() -> None:
        try:
            with d.client() as client:
                client.sandboxes.create("busybox", memory_mib=64, keep=True)
        except Exception:
            pass  # the daemon dies under it

    t = threading.Thread(target=create, daemon=True)
    t.start()
    assert d.proc is not None
    made: set[str] = set()
    if point == "after-create":

        def appeared() -> bool:
            made.update(
                r.id
                for r in Sandbox.list()
                if r.owner_pid == d.proc.pid and r.id not in host_before  # type: ignore[union-attr]
            )
            return bool(made)

        wait_until(appeared, timeout_s=30, what="the engine to start the sandbox")
    else:
        wait_until(lambda: "fault point before-create" in d.log_text(), what="the fault point")
    first_pid = d.proc.pid
    d.kill9()
    t.join(10)
    d.env.pop("TIERBOX_SERVER_FAULT")
    d.start()
    daemons = {first_pid, d.proc.pid}
    with d.client() as client:
        assert client.sandboxes.list() == []
        rows = client.json("GET", "/v1/sandboxes", params={"ended": True})
        assert [r["state"] for r in rows] == ["failed"]
        assert "stopped while creating" in rows[0]["reason"]
    assert not [r.id for r in Sandbox.list() if r.owner_pid in daemons]
    if made:
        wait_until(lambda: _gone(made), timeout_s=20, what="the half-made sandbox to go")


def test_kill9_mid_exec_interrupts_it_and_leaves_no_orphan_process(fresh: Daemon) -> None:
    d = fresh.start()
    with d.client() as client:
        box = client.sandboxes.create("busybox", memory_mib=64, keep=True)
        wasm = client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64, keep=True)
        procs_before = _host_procs(box.id)

        def run(sb: Any, argv: list[str]) -> None:
            with contextlib.suppress(Exception):  # the daemon dies under it
                sb.run(argv)

        threads = [
            threading.Thread(target=run, args=(box, ["sh", "-c", "sleep 300"]), daemon=True),
            threading.Thread(target=run, args=(wasm, ["toolbox", "sleep", "300"]), daemon=True),
        ]
        for t in threads:
            t.start()
        wait_until(
            lambda: any(p.argv == ["sleep", "300"] for p in box.processes()),
            timeout_s=20,
            what="the command to run",
        )
        wait_until(
            lambda: len(client.json("GET", f"/v1/sandboxes/{wasm.id}/execs")) == 1,
            what="the wasm command to start",
        )
    d.kill9()
    d.start()
    with d.client() as client:
        for sb_id in (box.id, wasm.id):
            execs = client.json("GET", f"/v1/sandboxes/{sb_id}/execs")
            assert [e["status"] for e in execs] == ["interrupted"], execs
        box = client.sandboxes.get(box.id)
        assert not [p for p in box.processes() if "sleep" in " ".join(p.argv)]
        assert box.run(["echo", "usable"]).stdout == b"usable\n"
        assert client.sandboxes.get(wasm.id).run(["toolbox", "echo", "usable"]).ok
        wait_until(
            lambda: _host_procs(box.id) <= procs_before,
            timeout_s=20,
            what="the interrupted command's host processes to go",
        )


def test_fifty_concurrent_clients_each_get_their_own_output() -> None:
    with running(keys=("alpha", "beta")) as (d, keys):
        results: dict[int, Any] = {}
        ids: dict[int, tuple[str, str]] = {}

        def client_work(n: int) -> None:
            tier = "wasm" if n % 2 else "container"
            key = keys["alpha" if n % 4 < 2 else "beta"]
            token = f"client-{n}-{os.urandom(4).hex()}"
            try:
                with d.client(key) as c:
                    image = WASM_IMAGE if tier == "wasm" else "busybox"
                    sb = c.sandboxes.create(image, tier=tier, memory_mib=64)
                    ids[n] = (sb.id, tier)
                    argv = ["toolbox", "echo", token] if tier == "wasm" else ["echo", token]
                    seen: list[bytes] = []
                    outs = [sb.run(argv).stdout for _ in range(2)]
                    outs.append(sb.run(argv, on_stdout=seen.append).stdout)
                    sb.close()
                    results[n] = (token, outs, b"".join(seen))
            except Exception as exc:  # reported below, with the client's number
                results[n] = exc

        threads = [threading.Thread(target=client_work, args=(n,)) for n in range(50)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        took = time.monotonic() - started
        failures = {n: r for n, r in results.items() if isinstance(r, Exception)}
        assert not failures, failures
        assert len(results) == 50
        for token, outs, streamed in results.values():
            assert outs == [f"{token}\n".encode()] * 3
            assert streamed == f"{token}\n".encode()
        with d.client() as c:
            assert c.sandboxes.list() == []
        made = {sid for sid, _ in ids.values()}
        wait_until(lambda: _gone(made), timeout_s=30, what="every sandbox to be gone")
        print(f"\n50 clients: {took:.1f} s")


@pytest.mark.slow
def test_fuzz_the_api_from_its_openapi_schema() -> None:
    """schemathesis generates requests for every operation from the served
    schema (bounded: a few hundred cases); no answer may be a 5xx, none may
    hang, and no sandbox may be left behind."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    with running(tcp=True, keys=("fuzz",)) as (d, keys):
        d.cli(
            "tenants",
            "set",
            "fuzz",
            "--max-sandboxes",
            "3",
            "--max-memory",
            "256m",
            "--tiers",
            "wasm",
        )
        auth = {"Authorization": f"Bearer {keys['fuzz']}"}
        # tar bodies go as the bytes generated (mostly not tars: the daemon must say so)
        schemathesis.serializer.alias("application/x-tar", "application/octet-stream")
        schema = schemathesis.openapi.from_url(d.url + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert len(operations) >= 25
        cases = 0
        for op in operations:

            @given(case=op.as_strategy())
            @settings(
                max_examples=16,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                nonlocal cases
                cases += 1
                response = case.call(base_url=d.url, headers=auth, timeout=60)
                case.validate_response(response, checks=[not_a_server_error])

            check()
        assert cases >= 300, cases
        print(f"\nschemathesis: {cases} cases")
        with httpx.Client(base_url=d.url, headers=auth, timeout=60) as h:
            made = [s["id"] for s in h.get("/v1/sandboxes", params={"ended": True}).json()]
            for sb in h.get("/v1/sandboxes").json():
                assert h.delete(f"/v1/sandboxes/{sb['id']}").status_code == 200
            assert h.get("/v1/sandboxes").json() == []
        assert "Traceback" not in d.log_text()
        pid = d.proc.pid  # type: ignore[union-attr]
    assert not [r.id for r in Sandbox.list() if r.owner_pid == pid]
    wait_until(lambda: _gone(set(made)), timeout_s=30, what="the fuzzed sandboxes to go")
