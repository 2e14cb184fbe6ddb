"""``tierbox serve`` through a real daemon process: the REST API, the remote
SDK, tenants (isolation, quotas, keys), errors, streaming, metrics and the
CLI as a client. Sandboxes are real (container and wasm).

:class:`Daemon` is shared with the other ``test_server_*`` modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, TIERBOX, assert_gone, require_image, require_tier, wait_until
from tests.tiers.test_contract import TOOLBOX_IMAGE, _toolbox_image
from tierbox import (
    AuthenticationError,
    Client,
    Egress,
    ExecNotFoundError,
    InvalidRequestError,
    NotSupportedError,
    QuotaExceededError,
    SandboxClosedError,
    SandboxNotFoundError,
    ServerUnreachableError,
    TerminationKind,
    UnknownTierError,
)
from tierbox.server import codes

DATA = Path(__file__).parent / "data" / "server"
OPENAPI = ROOT / "src" / "tierbox" / "server" / "openapi.json"
#: the contract suite's WASI toolbox, under a name only these tests use (the
#: contract suite re-imports its own image, which would pull the module from
#: under a sandbox that a restarted daemon reattaches)
WASM_IMAGE = TOOLBOX_IMAGE  # the contract suite's toolbox, imported once for both


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A real ``tierbox serve`` process on a private state directory."""

    def __init__(self, *, tcp: bool = False, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tbsrv-", dir="/tmp"))
        self.socket = self.dir / "s.sock"
        self.port = free_port() if tcp else None
        self.env = {**os.environ, **(env or {})}
        self.env.pop("TIERBOX_URL", None)
        self.log = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}"

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TIERBOX, *args, "--state-dir", str(self.dir)]
            if args[0] in ("keys", "tenants")
            else [*TIERBOX, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**self.env, **(env or {})},
        )

    def key(self, tenant: str) -> str:
        r = self.cli("keys", "create", "--tenant", tenant)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def start(self, *extra: str, wait: bool = True) -> Daemon:
        args = [*TIERBOX, "serve", "--state-dir", str(self.dir), "--socket", str(self.socket)]
        args += ["--bench-dir", str(DATA / "bench"), "--grace", "5s", *self.extra, *extra]
        if self.port is not None:
            args += ["--listen", f"127.0.0.1:{self.port}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=self.env)
        if wait:
            wait_until(self.ready, timeout_s=60, what="the daemon to be ready")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited {self.proc.returncode}: {self.log_text()}")
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket))) as c:
                return c.get("http://d/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, key: str | None = None) -> Client:
        return Client(str(self.socket), api_key=key)

    def http(self, key: str | None = None, *, tcp: bool = False) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if tcp:
            return httpx.Client(base_url=self.url, headers=headers, timeout=120)
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(
            base_url="http://tierbox", transport=transport, headers=headers, timeout=120
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def cleanup(self) -> None:
        """Remove every sandbox this daemon holds (through its API), then stop it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception), self.http() as h:
                for sb in h.get("/v1/sandboxes").json():
                    h.delete(f"/v1/sandboxes/{sb['id']}")
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(
    *, tcp: bool = False, keys: tuple[str, ...] = ()
) -> Iterator[tuple[Daemon, dict[str, str]]]:
    d = Daemon(tcp=tcp)
    made = {t: d.key(t) for t in keys}
    d.start()
    try:
        yield d, made
    finally:
        d.cleanup()


def require_engines() -> None:
    require_tier("container")
    require_tier("wasm")
    require_image("busybox")
    _toolbox_image()


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[Daemon, dict[str, str]]]:
    require_engines()
    with running(tcp=True, keys=("acme", "globex", "quota")) as found:
        yield found


# ---- the schema and the socket --------------------------------------------------------
def test_served_openapi_matches_the_checked_in_schema(
    daemon: tuple[Daemon, dict[str, str]],
) -> None:
    d, _ = daemon
    with d.http() as h:
        served = h.get("/openapi.json").json()
    assert served == json.loads(OPENAPI.read_text()), (
        "src/tierbox/server/openapi.json is stale: "
        "python -m tierbox.server.app > src/tierbox/server/openapi.json"
    )
    assert served["info"]["version"] == "1"
    assert all(p.startswith("/v1/") for p in served["paths"])


def test_socket_is_private_and_tcp_needs_a_key(daemon: tuple[Daemon, dict[str, str]]) -> None:
    d, _ = daemon
    mode = stat.S_IMODE(d.socket.stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_IMODE(d.dir.stat().st_mode) == 0o700
    # on TCP every /v1 call needs a key; on the socket the host's root needs none
    with d.http(tcp=True) as h:
        r = h.get("/v1/sandboxes")
        assert r.status_code == 401 and r.json()["code"] == "authentication"
    with d.http() as h:
        assert h.get("/v1/me").json()["operator"] is True
    # a daemon refuses TCP while no key exists
    lonely = Daemon(tcp=True)
    try:
        r = subprocess.run(
            [
                *TIERBOX,
                "serve",
                "--state-dir",
                str(lonely.dir),
                "--listen",
                f"127.0.0.1:{lonely.port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2
        assert "without an API key" in r.stderr
    finally:
        shutil.rmtree(lonely.dir, ignore_errors=True)


def test_keys_create_prints_the_key_alone_and_stores_its_hash_only(
    daemon: tuple[Daemon, dict[str, str]],
) -> None:
    d, _ = daemon
    r = d.cli("keys", "create", "--tenant", "initech")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"tbk_[0-9a-f]{12}_[A-Za-z0-9_-]{40,}", lines[0])
    key = lines[0]
    db = (d.dir / "state.db").read_bytes() + b"".join(
        p.read_bytes() for p in d.dir.glob("state.db-*")
    )
    assert key.encode() not in db
    listed = d.cli("keys", "ls", "--json")
    assert key not in listed.stdout and "initech" in listed.stdout
    with d.client(key) as c:
        assert c.me()["tenant"] == "initech"


# ---- sandboxes through the SDK ------------------------------------------------------------
@pytest.mark.parametrize("tier", ["container", "wasm"])
def test_sdk_create_run_stream_background_files_delete(
    daemon: tuple[Daemon, dict[str, str]], tier: str, tmp_path: Path
) -> None:
    d, keys = daemon
    image = "busybox" if tier == "container" else WASM_IMAGE
    echo = (
        ["sh", "-c", "echo out; echo err >&2; exit 7"]
        if tier == "container"
        else ["toolbox", "outerr", "7"]
    )
    with d.client(keys["acme"]) as client:
        sb = client.sandboxes.create(image, tier=tier, memory_mib=64, name=f"web-{tier}")
        assert sb.tier == tier and sb.tenant == "acme" and sb.id in repr(sb)
        assert client.sandboxes.get(f"web-{tier}").id == sb.id  # names work as ids
        r = sb.run(echo)
        assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)
        assert r.termination.kind is TerminationKind.EXITED
        got: list[tuple[str, bytes]] = []
        r = sb.run(
            echo,
            on_stdout=lambda b: got.append(("out", b)),
            on_stderr=lambda b: got.append(("err", b)),
        )
        assert r.exit_code == 7 and ("out", b"out\n") in got and ("err", b"err\n") in got
        if tier == "container":
            h = sb.run(["cat"], background=True)
            h.send_stdin("line one\n")
            h.close_stdin()
            assert h.wait(30).stdout == b"line one\n"
            slow = sb.run(["sleep", "30"], background=True)
            with pytest.raises(Exception, match="still running"):
                slow.wait(0.5)
            slow.kill()
            assert slow.wait(30).termination.kind is TerminationKind.SIGNALED
            assert any(p.argv[:1] == ["/.tierbox/init"] for p in sb.processes())
        sb.files.write("/tmp/app/data.bin", bytes(range(256)))
        assert sb.files.read("/tmp/app/data.bin") == bytes(range(256))
        assert [e.name for e in sb.files.entries("/tmp/app")] == ["data.bin"]
        assert sb.files.download("/tmp/app", tmp_path / "out") == 256
        assert (tmp_path / "out" / "data.bin").read_bytes() == bytes(range(256))
        (tmp_path / "tree" / "sub").mkdir(parents=True)
        (tmp_path / "tree" / "sub" / "f.txt").write_text("in a tree")
        sb.files.upload(tmp_path / "tree", "/tmp/tree")
        assert sb.files.read_text("/tmp/tree/sub/f.txt") == "in a tree"
        st = sb.stats()
        assert st.memory_peak_bytes is not None
        assert sb.id in [s.id for s in client.sandboxes.list()]
        sid = sb.id
        sb.close()
        sb.close()  # idempotent
        with pytest.raises(SandboxClosedError):
            sb.run(echo)
        assert sid not in [s.id for s in client.sandboxes.list()]
        with pytest.raises(SandboxNotFoundError):
            client.sandboxes.get(sid)
        audit = client.audit()
        mine = [a for a in audit if a["target"] == sid or (a["detail"] or {}).get("exec")]
        actions = {a["action"] for a in audit if a["target"] == sid}
        assert {"create", "exec", "delete"} <= actions, mine
        assert any(a["action"] == "exec" and a["exit_code"] == 7 for a in audit)
    wait_until(lambda: _gone(sid), timeout_s=15, what="the sandbox's leftovers to go")


def _gone(sid: str) -> bool:
    try:
        assert_gone({sid})
    except AssertionError:
        return False
    return True


def test_one_shot_run_and_async_client(daemon: tuple[Daemon, dict[str, str]]) -> None:
    import asyncio

    from tierbox import AsyncClient

    d, keys = daemon
    with d.client(keys["acme"]) as client:
        before = {s.id for s in client.sandboxes.list()}
        r = client.run("busybox", ["sh", "-c", "cat; echo done"], stdin=b"piped ", memory_mib=64)
        assert r.stdout == b"piped done\n"
        chunks: list[bytes] = []
        r = client.run(
            WASM_IMAGE,
            ["toolbox", "echo", "hi"],
            tier="wasm",
            memory_mib=64,
            on_stdout=chunks.append,
        )
        assert b"".join(chunks) == b"hi\n" == r.stdout
        assert {s.id for s in client.sandboxes.list()} == before  # one-shots leave nothing

    async def go() -> None:
        async with AsyncClient(str(d.socket), api_key=keys["acme"]) as ac:
            sb = await ac.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64)
            async with sb:
                results = await asyncio.gather(
                    *(sb.run(["toolbox", "echo", str(i)]) for i in range(5))
                )
                assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(5)]
                seen = [(s, c) async for s, c in sb.stream(["toolbox", "outerr", "0"])]
                assert ("stdout", b"out\n") in seen and ("stderr", b"err\n") in seen

    asyncio.run(go())


# ---- errors ---------------------------------------------------------------------------------
def test_errors_are_json_with_codes_that_name_the_class(
    daemon: tuple[Daemon, dict[str, str]],
) -> None:
    d, keys = daemon
    with d.http(keys["acme"]) as h:
        r = h.post("/v1/sandboxes", json={"image": "busybox", "memory_mib": "lots"})
        assert r.status_code == 422
        assert r.json() == {
            "code": "invalid_request",
            "message": r.json()["message"],
            "field": "memory_mib",
        }
        assert "lots" not in r.text  # what was sent is never echoed
        r = h.post("/v1/sandboxes", json={"image": "busybox", "colour": "red"})
        assert r.status_code == 422 and r.json()["field"] == "colour"
        r = h.post("/v1/sandboxes", json={"image": "busybox", "tier": "warp"})
        assert r.status_code == 422 and r.json()["field"] == "tier"
        r = h.post("/v1/sandboxes", json={"image": "no-such-image:1", "memory_mib": 64})
        assert r.status_code == 404 and r.json()["code"] == "image_not_found"
        r = h.post("/v1/sandboxes", json={"image": "busybox", "env": {"A": "x\u0000y"}})
        assert r.status_code == 422 and r.json()["field"] == "env.A"
        r = h.post(
            "/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["code"] == "invalid_request"
        r = h.get("/v1/sandboxes/nope")
        assert r.status_code == 404 and r.json()["code"] == "sandbox_not_found"
        r = h.get("/v1/nowhere")
        assert r.status_code == 404 and r.json()["code"] == "usage"
    for code, cls in codes.CLASSES.items():
        assert codes.code_of(cls) == code
        assert type(codes.error_from(codes.status_of(cls), {"code": code, "message": "m"})) in (
            cls,
            __import__("tierbox").errors.ServerError,  # classes whose constructor wants more
        )
    with d.client(keys["acme"]) as client:
        with pytest.raises(InvalidRequestError) as info:
            client.sandboxes.create("busybox", memory_mib=2)
        assert info.value.field == "memory_mib"
        with pytest.raises(InvalidRequestError):
            client.sandboxes.create("busybox", tier="warp")
        with pytest.raises(SandboxNotFoundError):
            client.sandboxes.get("0123456789ab")
        wasm = client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64)
        with wasm:
            with pytest.raises(NotSupportedError):
                wasm.revert("before")
            with pytest.raises(ExecNotFoundError):
                client.json("GET", f"/v1/sandboxes/{wasm.id}/execs/nope")
    with pytest.raises(ServerUnreachableError):
        Client(str(d.dir / "no.sock")).sandboxes.list()
    assert UnknownTierError  # re-exported for callers that check it


def test_network_requests_are_checked_and_ports_are_the_operators(
    daemon: tuple[Daemon, dict[str, str]],
) -> None:
    d, keys = daemon
    with d.http(keys["acme"]) as h:
        bad = {"allow": ["10.0.0.1/24:80"], "dns": False}
        r = h.post("/v1/sandboxes", json={"image": "busybox", "network": bad})
        assert r.status_code == 422, r.text
        assert "host bits set" in r.json()["message"]
        r = h.post("/v1/sandboxes", json={"image": "busybox", "network": {"allow": [], "x": 1}})
        assert r.status_code == 422 and r.json()["field"].startswith("network")
        r = h.post("/v1/sandboxes", json={"image": "busybox", "ports": [{"port": 80}]})
        assert r.status_code == 403 and r.json()["code"] == "permission_denied", r.text
        r = h.post("/v1/sandboxes", json={"image": WASM_IMAGE, "tier": "wasm", "network": "host"})
        assert r.status_code in (403, 501), r.text  # the operator's, and not wasm's
    with d.client(keys["acme"]) as client, pytest.raises(NotSupportedError, match="wasm tier"):
        client.sandboxes.create(WASM_IMAGE, tier="wasm", network=Egress(["192.0.2.7:80"]))


# ---- tenants ----------------------------------------------------------------------------------
def test_quotas_refuse_before_anything_starts(daemon: tuple[Daemon, dict[str, str]]) -> None:
    d, keys = daemon
    r = d.cli(
        "tenants", "set", "quota", "--max-sandboxes", "2", "--max-memory", "160m", "--tiers", "wasm"
    )
    assert r.returncode == 0, r.stderr
    host_before = {s["id"] for s in _host_sandboxes()}
    with d.client(keys["quota"]) as client:
        with pytest.raises(QuotaExceededError) as info:
            client.sandboxes.create("busybox", tier="container", memory_mib=64)
        assert info.value.quota == "tiers"
        a = client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64)
        with pytest.raises(QuotaExceededError) as info:
            client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=128)
        assert info.value.quota == "memory_mib"
        b = client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64)
        with pytest.raises(QuotaExceededError) as info:
            client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=16)
        assert info.value.quota == "sandboxes"
        r = client.request("GET", "/v1/me").json()
        assert r["usage"] == {"sandboxes": 2, "memory_mib": 128}
        a.close()
        client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64).close()  # room again
        b.close()
    with d.http(keys["quota"]) as h:
        r = h.post("/v1/sandboxes", json={"image": "busybox", "tier": "container"})
        assert r.status_code == 429 and r.json()["quota"] == "tiers"
        assert "quota" in r.json()["message"]
    # nothing was started for a refused request
    assert {s["id"] for s in _host_sandboxes()} - host_before <= set()
    metrics = d.http().get("/metrics").text
    assert re.search(r'tierbox_quota_refusals_total\{quota="sandboxes"\} [1-9]', metrics)
    assert re.search(r'tierbox_quota_refusals_total\{quota="tiers"\} ([2-9]|[1-9]\d+)\.0', metrics)


def _host_sandboxes() -> list[dict[str, Any]]:
    from tierbox import Sandbox

    return [r.to_dict() for r in Sandbox.list()]


def test_tenants_see_only_their_own(daemon: tuple[Daemon, dict[str, str]], tmp_path: Path) -> None:
    """Tenant B gets 404 (never 403) for every endpoint on tenant A's sandbox,
    command and snapshot; a wrong or revoked key gets 401; keys never appear
    in the daemon's log or in an error message."""
    d, keys = daemon
    a_key, b_key = keys["acme"], keys["globex"]
    with d.client(a_key) as a:
        sb = a.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64, keep=True)
        sb.files.write("/tmp/secret.txt", "acme only")
        snap = sb.snapshot()
        h = sb.run(["toolbox", "sleep", "5"], background=True)
        sid, eid = sb.id, h.id
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/v1/sandboxes/{sid}", {}),
            ("DELETE", f"/v1/sandboxes/{sid}", {}),
            ("GET", f"/v1/sandboxes/{sid}/stats", {}),
            ("GET", f"/v1/sandboxes/{sid}/processes", {}),
            ("POST", f"/v1/sandboxes/{sid}/execs", {"json": {"argv": ["toolbox", "echo", "x"]}}),
            ("GET", f"/v1/sandboxes/{sid}/execs", {}),
            ("GET", f"/v1/sandboxes/{sid}/execs/{eid}", {}),
            ("GET", f"/v1/sandboxes/{sid}/execs/{eid}/events", {}),
            ("POST", f"/v1/sandboxes/{sid}/execs/{eid}/stdin", {"json": {"eof": True}}),
            ("POST", f"/v1/sandboxes/{sid}/execs/{eid}/kill", {"json": {"signal": 9}}),
            ("GET", f"/v1/sandboxes/{sid}/files", {"params": {"path": "/tmp/secret.txt"}}),
            ("PUT", f"/v1/sandboxes/{sid}/files", {"params": {"path": "/tmp/x"}, "content": b"x"}),
            ("GET", f"/v1/sandboxes/{sid}/files/list", {"params": {"path": "/tmp"}}),
            ("GET", f"/v1/sandboxes/{sid}/files/archive", {"params": {"path": "/tmp"}}),
            (
                "PUT",
                f"/v1/sandboxes/{sid}/files/archive",
                {"params": {"path": "/tmp"}, "content": b""},
            ),
            ("POST", f"/v1/sandboxes/{sid}/snapshots", {}),
            ("POST", f"/v1/sandboxes/{sid}/revert", {"json": {"snapshot": snap.id}}),
            ("GET", f"/v1/snapshots/{snap.id}", {}),
            ("POST", f"/v1/snapshots/{snap.id}/restore", {}),
            ("POST", f"/v1/snapshots/{snap.id}/clone", {"json": {"count": 1}}),
            ("DELETE", f"/v1/snapshots/{snap.id}", {}),
        ]
        with d.http(b_key) as hb:
            for method, path, kw in calls:
                r = hb.request(method, path, **kw)
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                assert r.json()["code"] in (
                    "sandbox_not_found",
                    "snapshot_not_found",
                    "exec_not_found",
                )
            assert sid not in [s["id"] for s in hb.get("/v1/sandboxes").json()]
            assert snap.id not in [s["id"] for s in hb.get("/v1/snapshots").json()]
            assert all(e["tenant"] == "globex" for e in hb.get("/v1/audit").json())
        # A's sandbox is untouched
        assert sb.files.read_text("/tmp/secret.txt") == "acme only"
        assert h.wait(30).ok
        # wrong and revoked keys
        for bad in ("tbk_000000000000_nope", a_key[:-2] + "xx", "not-a-key"):
            with d.http(tcp=True) as ht:
                r = ht.get("/v1/sandboxes", headers={"Authorization": f"Bearer {bad}"})
                assert r.status_code == 401, bad
                assert r.json()["code"] == "authentication"
                assert bad not in r.text
        temp = d.key("acme")
        key_id = temp.split("_")[1]
        assert d.http(temp, tcp=True).get("/v1/me").status_code == 200
        assert d.cli("keys", "revoke", key_id).returncode == 0
        r = d.http(temp, tcp=True).get("/v1/me")
        assert r.status_code == 401 and temp not in r.text
        with pytest.raises(AuthenticationError):
            Client(d.url, api_key=temp).sandboxes.list()
        a.snapshots.delete(snap)
        sb.close()
    log = d.log_text()
    for key in (a_key, b_key, temp):
        assert key not in log and key.split("_", 2)[2] not in log


def test_metrics_and_health(daemon: tuple[Daemon, dict[str, str]]) -> None:
    d, keys = daemon
    with d.client(keys["acme"]) as client:
        with client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64) as sb:
            sb.run(["toolbox", "echo", "x"])
            sb.run(["toolbox", "spin"], timeout_s=0.5)
            sb.run(["toolbox", "membomb"])
            with d.http() as h:
                text = h.get("/metrics").text
        assert re.search(r'tierbox_sandboxes\{state="running",tier="wasm"\} [1-9]', text), text
    for name in (
        r'tierbox_create_seconds_bucket\{le="[^"]+",tier="wasm"\}',
        r'tierbox_exec_seconds_count\{tier="wasm"\} ([3-9]|[1-9]\d+)\.0',
        r'tierbox_timeouts_total\{tier="wasm"\} [1-9]',
        r'tierbox_oom_kills_total\{tier="wasm"\} [1-9]',
        r"tierbox_daemon_restarts\{",
    ):
        assert re.search(name, text), name
    with d.http(tcp=True) as h:
        assert h.get("/healthz").json() == {"status": "ok"}
        assert h.get("/readyz").json() == {"status": "ready"}


def test_output_streams_over_sse_and_websocket(daemon: tuple[Daemon, dict[str, str]]) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    d, keys = daemon
    with (
        d.client(keys["acme"]) as client,
        client.sandboxes.create("busybox", tier="container", memory_mib=64) as sb,
        d.http(keys["acme"], tcp=True) as h,
    ):
        script = "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo bye >&2; exit 3"
        lines: list[str] = []
        with h.stream(
            "POST",
            f"/v1/sandboxes/{sb.id}/execs",
            json={"argv": ["sh", "-c", script]},
            headers={"Accept": "text/event-stream"},
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            first_at = None
            started = time.monotonic()
            for line in r.iter_lines():
                if line.startswith("event: stdout") and first_at is None:
                    first_at = time.monotonic() - started
                lines.append(line)
        events = [ln[len("event: ") :] for ln in lines if ln.startswith("event: ")]
        assert events[-1] == "exit" and events.count("stdout") == 3 and "stderr" in events
        assert first_at is not None and first_at < 0.5  # streamed, not at the end
        final = json.loads(
            lines[next(i for i, ln in enumerate(lines) if ln == "event: exit") + 1][6:]
        )
        assert final["exec"]["exit_code"] == 3 and final["exec"]["status"] == "exited"
        # WebSocket: output of a background command, then its ending; stdin through it
        exec_view = h.post(
            f"/v1/sandboxes/{sb.id}/execs", json={"argv": ["cat"], "background": True}
        ).json()
        ws_url = d.url.replace("http", "ws") + f"/v1/sandboxes/{sb.id}/execs/{exec_view['id']}/ws"
        with connect(ws_url, additional_headers={"Authorization": f"Bearer {keys['acme']}"}) as ws:
            ws.send(json.dumps({"type": "stdin", "data": "via websocket\n"}))
            ws.send(json.dumps({"type": "eof"}))
            msgs = []
            while True:
                m = json.loads(ws.recv(timeout=30))
                msgs.append(m)
                if m["type"] == "exit":
                    break
        assert (
            "".join(m.get("text", "") for m in msgs if m["type"] == "stdout") == "via websocket\n"
        )
        assert msgs[-1]["exec"]["status"] == "exited"
        # another tenant's key cannot open it
        with (
            pytest.raises(InvalidStatus),
            connect(ws_url, additional_headers={"Authorization": f"Bearer {keys['globex']}"}) as ws,
        ):
            ws.recv(timeout=5)


def test_snapshots_restore_clone_delete(daemon: tuple[Daemon, dict[str, str]]) -> None:
    d, keys = daemon
    with d.client(keys["acme"]) as client:
        with client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64) as sb:
            sb.files.write("/tmp/state.txt", "v1")
            snap = sb.snapshot()
            assert snap.kind == "restore" and snap.sandbox_id == sb.id
            sb.files.write("/tmp/state.txt", "v2")
            restored = client.sandboxes.restore(snap)
            clones = client.sandboxes.clone(snap, 2)
            for other in (restored, *clones):
                assert other.files.read_text("/tmp/state.txt") == "v1"
                assert other.id != sb.id
                other.close()
            assert snap.id in [s.id for s in client.snapshots.list()]
            assert "path" not in client.json("GET", f"/v1/snapshots/{snap.id}")  # no host path
            client.snapshots.delete(snap)
            assert snap.id not in [s.id for s in client.snapshots.list()]
            with pytest.raises(Exception, match="no snapshot"):
                client.sandboxes.restore(snap)
        with (
            client.sandboxes.create("busybox", memory_mib=64) as c,
            pytest.raises(NotSupportedError),
        ):
            c.snapshot()


# ---- the CLI as a client ----------------------------------------------------------------------
def test_cli_remote_and_tierbox_url(daemon: tuple[Daemon, dict[str, str]]) -> None:
    d, keys = daemon
    env = {"TIERBOX_API_KEY": keys["acme"]}
    r = d.cli(
        "--remote",
        str(d.socket),
        "run",
        "--memory",
        "64m",
        "busybox",
        "--",
        "sh",
        "-c",
        "echo remote; exit 4",
        env=env,
    )
    assert r.returncode == 4 and r.stdout == "remote\n", r.stderr
    r = d.cli(
        "--remote",
        d.url,
        "run",
        "--tier",
        "wasm",
        "--memory",
        "64m",
        WASM_IMAGE,
        "--",
        "toolbox",
        "echo",
        "hi",
        env=env,
    )
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    url_env = {**env, "TIERBOX_URL": d.url}
    made = d.cli(
        "sandbox", "create", "--memory", "64m", "--name", "cli-made", "busybox", env=url_env
    )
    assert made.returncode == 0, made.stderr
    sid = made.stdout.strip()
    r = d.cli("sandbox", "exec", "cli-made", "--", "sh", "-c", "echo in-sandbox", env=url_env)
    assert r.returncode == 0 and r.stdout == "in-sandbox\n", r.stderr
    listed = json.loads(d.cli("sandbox", "ls", "--json", env=url_env).stdout)
    assert [s["id"] for s in listed if s["name"] == "cli-made"] == [sid]
    assert all(s["tenant"] == "acme" for s in listed)
    # the local CLI sees the daemon's sandbox too (it is a kept one on this host), by its id
    local = json.loads(
        subprocess.run(
            [*TIERBOX, "sandbox", "ls", "--json"],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "TIERBOX_URL"},
        ).stdout
    )
    assert sid in [s["id"] for s in local]
    assert d.cli("sandbox", "rm", sid, env=url_env).returncode == 0
    r = d.cli("--remote", d.url, "serve", env=env)
    assert r.returncode == 2 and "does not run on a daemon" in r.stderr
    r = d.cli("--remote", d.url, "sandbox", "ls", env={"TIERBOX_API_KEY": "tbk_bad_key"})
    assert (
        r.returncode == 125 and "invalid or revoked" in r.stderr and "tbk_bad_key" not in r.stderr
    )


def test_dashboard_pages_render_without_a_browser(daemon: tuple[Daemon, dict[str, str]]) -> None:
    d, keys = daemon
    with (
        d.client(keys["acme"]) as client,
        client.sandboxes.create(WASM_IMAGE, tier="wasm", memory_mib=64) as sb,
    ):
        ex = sb.run(["toolbox", "echo", "shown on the page"])
        assert ex.ok
        with d.http(tcp=True) as h:
            assert h.get("/", follow_redirects=False).status_code == 303  # log in first
            r = h.post("/login", data={"key": keys["acme"]}, follow_redirects=False)
            assert r.status_code == 303 and "tierbox_session" in r.headers["set-cookie"]
            assert keys["acme"] not in r.headers["set-cookie"]
            page = h.get("/").text
            assert sb.id in page and "Latest bench report" in page and "start_latency.png" in page
            assert h.get("/ui/bench/start_latency.png").headers["content-type"] == "image/png"
            page = h.get(f"/sandboxes/{sb.id}").text
            assert "toolbox echo shown on the page" in page
            execs = client.json("GET", f"/v1/sandboxes/{sb.id}/execs")
            out = h.get(f"/sandboxes/{sb.id}/execs/{execs[0]['id']}").text
            assert "shown on the page" in out
            # the session cookie reads, never writes
            r = h.post("/v1/sandboxes", json={"image": WASM_IMAGE, "tier": "wasm"})
            assert r.status_code == 401
            r = h.delete(f"/v1/sandboxes/{sb.id}")
            assert r.status_code == 401
        bench = client.bench()
        assert bench["results"]["tiers"]


def test_readme_example_runs_as_written(daemon: tuple[Daemon, dict[str, str]]) -> None:
    import re as re_

    d, keys = daemon
    blocks = re_.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re_.S)
    code = next(b for b in blocks if "with Client() as client" in b)
    env = {**os.environ, "TIERBOX_URL": str(d.socket), "TIERBOX_API_KEY": keys["acme"]}
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 0, p.stderr
    assert "live: b'hi\\n'" in p.stdout
    assert "0 b'fed later\\n' ['in.txt']" in p.stdout
    assert "b'one-shot\\n'" in p.stdout
    with d.client(keys["acme"]) as client:
        assert client.sandboxes.list() == []  # the example leaves nothing
