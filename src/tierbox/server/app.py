"""The REST API (``/v1``), health and metrics endpoints, as a FastAPI app.

Errors answer with JSON ``{"code", "message", ...}``: the code names the
error class (:mod:`tierbox.server.codes`). Request validation answers 422
naming the field, and never echoes what was sent (it may hold a secret).

Who calls: ``Authorization: Bearer KEY`` names a tenant. On the unix socket
(0600, the host's root) a request without a key is the host operator, who
sees every tenant. The dashboard's login gives a browser a session cookie,
which is accepted for reading only (GET and watching a command's output),
so a page on another site cannot make the daemon act.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Query, Request, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

from tierbox.errors import (
    AuthenticationError,
    FileTooLargeError,
    InvalidRequestError,
    TierboxError,
)
from tierbox.server import codes
from tierbox.server.db import OPERATOR, Caller, Database
from tierbox.server.service import (
    CreateRequest,
    ExecArgs,
    ExecSession,
    Service,
    list_tiers,
)
from tierbox.spec import DEFAULT_READ_MAX_BYTES

log = logging.getLogger("tierbox.server")
API_VERSION = "1"
#: a raw file body (PUT .../files) is at most this big; larger trees go as tar
MAX_FILE_BODY_BYTES = 256 << 20
MAX_TAR_BODY_BYTES = 1 << 30
SESSION_COOKIE = "tierbox_session"
SESSION_TTL_S = 12 * 3600.0


# ---- request shapes ----------------------------------------------------------------------
def _text(value: str) -> str:
    """No NUL (no C string can hold it) and valid UTF-8 (no lone surrogates)."""
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    return value


def _env_name(value: str) -> str:
    _text(value)
    if not value or "=" in value:
        raise ValueError("an environment variable name is not empty and holds no '='")
    return value


Text = Annotated[str, AfterValidator(_text)]
EnvName = Annotated[str, Field(max_length=256), AfterValidator(_env_name)]
EnvValue = Annotated[str, Field(max_length=131072), AfterValidator(_text)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
USER_PATTERN = r"^[0-9]{1,10}(:[0-9]{1,10})?$"


class MountBody(BaseModel):
    """A host path shown in the sandbox (host operator only)."""

    model_config = ConfigDict(extra="forbid")
    host: Annotated[Text, Field(min_length=1, max_length=4096)]
    path: Annotated[Text, Field(min_length=1, max_length=4096)]
    read_only: bool = True


class EgressBody(BaseModel):
    """A private network whose only ways out are ``allow``; names in it are
    resolved once, at create, and pinned."""

    model_config = ConfigDict(extra="forbid")
    allow: list[Annotated[Text, Field(min_length=1, max_length=300)]] = Field(
        default_factory=list,
        max_length=256,
        description="HOST:PORT, CIDR:PORT-RANGE or name.example:443",
    )
    dns: bool = Field(False, description="may also ask the host's DNS resolvers")


class PortBody(BaseModel):
    """A sandbox port published on the daemon host (loopback unless host_ip)."""

    model_config = ConfigDict(extra="forbid")
    port: Annotated[int, Field(ge=1, le=65535)]
    host_port: Annotated[int, Field(ge=0, le=65535)] = 0
    host_ip: Annotated[str, Field(min_length=2, max_length=64)] = "127.0.0.1"


class SandboxBody(BaseModel):
    """A sandbox's full spec; limits carry their unit in their name."""

    model_config = ConfigDict(extra="forbid")
    image: Annotated[Text, Field(min_length=1, max_length=512)] | None = Field(
        None, description="image reference (busybox, python:3.11, python:wasi); none for process"
    )
    tier: Annotated[Text, Field(min_length=1, max_length=32)] = "container"
    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        None, description="a name unique among this tenant's live sandboxes"
    )
    memory_mib: Annotated[int, Field(ge=4, le=1 << 20)] | None = 256
    cpus: Annotated[float, Field(gt=0, le=1024)] | None = None
    pids: Annotated[int, Field(ge=1, le=1 << 22)] | None = 128
    timeout_s: Annotated[float, Field(gt=0, le=7 * 86400)] | None = 60.0
    disk_mib: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    output_bytes: Annotated[int, Field(ge=1, le=64 << 20)] = 1 << 20
    network: Literal["none", "host"] | EgressBody = Field(
        "none", description="none (loopback only), host, or an egress allow-list"
    )
    ports: list[PortBody] = Field(
        default_factory=list, max_length=64, description="ports published on the daemon host"
    )
    env: dict[EnvName, EnvValue] = Field(default_factory=dict, max_length=1024)
    user: Annotated[str, Field(pattern=USER_PATTERN)] | None = None
    workdir: Annotated[Text, Field(min_length=1, max_length=4096)] = "/"
    mounts: list[MountBody] = Field(default_factory=list, max_length=64)
    ttl_s: Annotated[float, Field(gt=0, le=365 * 86400)] | None = Field(
        None, description="close it after this many seconds"
    )

    def request(self) -> CreateRequest:
        opts = self.model_dump(exclude={"image", "tier", "name", "ttl_s"})
        return CreateRequest(self.image, self.tier, self.name, self.ttl_s, opts)


class ExecBody(BaseModel):
    """A command. ``stdin`` (text) or ``stdin_b64`` (bytes), not both."""

    model_config = ConfigDict(extra="forbid")
    argv: list[Annotated[Text, Field(max_length=131072)]] = Field(min_length=1, max_length=4096)
    stdin: Annotated[str, Field(max_length=64 << 20)] | None = None
    stdin_b64: Annotated[str, Field(max_length=96 << 20)] | None = None
    env: dict[EnvName, EnvValue] | None = Field(None, max_length=1024)
    timeout_s: Annotated[float, Field(gt=0, le=7 * 86400)] | None = None
    cwd: Annotated[Text, Field(min_length=1, max_length=4096)] | None = None
    user: Annotated[str, Field(pattern=USER_PATTERN)] | None = None
    background: bool = Field(False, description="return at once; no time limit unless timeout_s")
    wait: bool = Field(True, description="foreground: answer with the result (false: at once)")

    def args(self) -> ExecArgs:
        return ExecArgs(
            argv=list(self.argv),
            stdin=_stdin(self.stdin, self.stdin_b64),
            env=self.env,
            timeout_s=self.timeout_s,
            cwd=self.cwd,
            user=self.user,
            background=self.background,
        )


class RunBody(SandboxBody):
    """A one-shot run: a sandbox's spec and one command."""

    argv: list[Annotated[Text, Field(max_length=131072)]] = Field(min_length=1, max_length=4096)
    stdin: Annotated[str, Field(max_length=64 << 20)] | None = None
    stdin_b64: Annotated[str, Field(max_length=96 << 20)] | None = None

    def exec_args(self) -> ExecArgs:
        return ExecArgs(argv=list(self.argv), stdin=_stdin(self.stdin, self.stdin_b64))

    def request(self) -> CreateRequest:
        opts = self.model_dump(
            exclude={"image", "tier", "name", "ttl_s", "argv", "stdin", "stdin_b64"}
        )
        return CreateRequest(self.image, self.tier, self.name, self.ttl_s, opts)


class StdinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: Annotated[str, Field(max_length=16 << 20)] | None = None
    data_b64: Annotated[str, Field(max_length=24 << 20)] | None = None
    eof: bool = False


class KillBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signal: Annotated[int, Field(ge=1, le=64)] = 9


class CloneBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: Annotated[int, Field(ge=1, le=64)] = 1


class RevertBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    snapshot: Annotated[Text, Field(min_length=1, max_length=256)] = Field(
        description="the snapshot's id, or its name inside the sandbox"
    )


def _stdin(text: str | None, b64: str | None) -> bytes | None:
    if text is not None and b64 is not None:
        raise InvalidRequestError("give stdin or stdin_b64, not both", field="stdin_b64")
    if b64 is not None:
        return _b64(b64, "stdin_b64")
    if text is not None:
        return _text_bytes(text, "stdin")
    return None


def _b64(value: str, name: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{name} is not valid base64", field=name) from None


def _text_bytes(value: str, name: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{name} is not valid UTF-8 text", field=name) from None


# ---- responses, for the schema -----------------------------------------------------------
class ErrorBody(BaseModel):
    code: str = Field(description="the error class, snake case (sandbox_not_found)")
    message: str
    field: str | None = None
    quota: str | None = None
    path: str | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d}
    for s, d in (
        (400, "bad request"),
        (401, "no key, or a wrong or revoked one"),
        (403, "not for this tenant"),
        (404, "no such sandbox, command, snapshot or image (or another tenant's)"),
        (409, "the sandbox cannot do it now (dead, busy)"),
        (413, "too large"),
        (422, "a field does not validate; 'field' names it"),
        (429, "a tenant quota; 'quota' names it"),
        (503, "the daemon is shutting down, or the tier cannot run here"),
    )
}


# ---- the app -------------------------------------------------------------------------------
async def _caller(request: Request) -> Caller:
    """Who calls (see the module's docstring); a cookie counts for reading only."""
    authenticate: Callable[..., Caller] = request.app.state.authenticate
    return authenticate(request, read_only=request.method in ("GET", "HEAD"))


Who = Annotated[Caller, Depends(_caller)]
PathQ = Annotated[Text, Query(min_length=1, max_length=4096, description="path in the sandbox")]
MaxQ = Annotated[int, Query(ge=0, le=1 << 40)]


class Sessions:
    """Browser sessions of the dashboard: a random token per login, in memory."""

    def __init__(self) -> None:
        self._by_token: dict[str, tuple[Caller, float]] = {}

    def new(self, caller: Caller) -> str:
        token = secrets.token_urlsafe(32)
        self._by_token[token] = (caller, time.time() + SESSION_TTL_S)
        return token

    def get(self, token: str | None) -> Caller | None:
        if not token:
            return None
        found = self._by_token.get(token)
        if found is None or found[1] < time.time():
            self._by_token.pop(token or "", None)
            return None
        return found[0]

    def drop(self, token: str | None) -> None:
        self._by_token.pop(token or "", None)


def on_unix_socket(scope: Mapping[str, Any]) -> bool:
    """uvicorn gives no server address for a unix socket's connections."""
    server = scope.get("server")
    return server is None or server[1] is None


def create_app(
    service: Service,
    *,
    on_start: Callable[[], Awaitable[None]] | None = None,
    dashboard: bool = True,
) -> FastAPI:
    db: Database = service.db
    sessions = Sessions()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        if on_start is not None:
            await on_start()
        yield

    app = FastAPI(
        title="tierbox",
        version=API_VERSION,
        summary="Sandboxes on any rung of the isolation ladder, for many tenants.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.sessions = sessions

    def authenticate(request: Request, *, read_only: bool) -> Caller:
        header = request.headers.get("authorization")
        if header:
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise AuthenticationError("use the header Authorization: Bearer KEY")
            return db.authenticate(key.strip())
        if read_only:
            caller = sessions.get(request.cookies.get(SESSION_COOKIE))
            if caller is not None:
                return caller
        if on_unix_socket(request.scope):
            return Caller(tenant=OPERATOR, operator=True)
        raise AuthenticationError("an API key is needed: Authorization: Bearer KEY")

    app.state.authenticate = authenticate

    # ---- errors ------------------------------------------------------------------------
    @app.exception_handler(TierboxError)
    async def _tierbox_error(request: Request, exc: TierboxError) -> JSONResponse:
        status = codes.status_of(type(exc))
        if status >= 500:
            log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(codes.error_body(exc), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        message = f"{field}: {first.get('msg', 'invalid')}"
        err = InvalidRequestError(message, field=field)
        return JSONResponse(codes.error_body(err), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"code": "usage", "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        body = {"code": "tierbox", "message": f"internal error: {type(exc).__name__}"}
        return JSONResponse(body, status_code=500)

    app.add_middleware(_CountRequests, counter=service.metrics.requests)

    # ---- health and metrics ------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if service.ready and not service.draining:
            return JSONResponse({"status": "ready"})
        state = "draining" if service.draining else "starting"
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(
            service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # ---- sandboxes ---------------------------------------------------------------------
    v1 = "/v1"

    @app.post(f"{v1}/sandboxes", status_code=201, responses=_ERRORS, tags=["sandboxes"])
    async def create_sandbox(who: Who, body: SandboxBody) -> JSONResponse:
        """Create a sandbox; quotas are checked before anything starts."""
        return JSONResponse(await service.create(who, body.request()), status_code=201)

    @app.get(f"{v1}/sandboxes", responses=_ERRORS, tags=["sandboxes"])
    async def list_sandboxes(
        who: Who, ended: Annotated[bool, Query(description="ended ones too")] = False
    ) -> list[dict[str, Any]]:
        """This tenant's live sandboxes (``ended=true``: dead, deleted and failed ones too)."""
        return service.list(who, ended=ended)

    @app.get(f"{v1}/sandboxes/{{sandbox_id}}", responses=_ERRORS, tags=["sandboxes"])
    async def get_sandbox(who: Who, sandbox_id: str) -> dict[str, Any]:
        return service.row(who, sandbox_id)

    @app.delete(f"{v1}/sandboxes/{{sandbox_id}}", responses=_ERRORS, tags=["sandboxes"])
    async def delete_sandbox(who: Who, sandbox_id: str) -> JSONResponse:
        """Stop a sandbox and free everything it holds."""
        return JSONResponse(await service.delete(who, sandbox_id))

    @app.get(f"{v1}/sandboxes/{{sandbox_id}}/stats", responses=_ERRORS, tags=["sandboxes"])
    async def sandbox_stats(who: Who, sandbox_id: str) -> dict[str, Any]:
        return await service.stats(who, sandbox_id)

    @app.get(f"{v1}/sandboxes/{{sandbox_id}}/processes", responses=_ERRORS, tags=["sandboxes"])
    async def sandbox_processes(who: Who, sandbox_id: str) -> list[dict[str, Any]]:
        return await service.processes(who, sandbox_id)

    # ---- commands ----------------------------------------------------------------------
    def _stream_response(session: ExecSession, start: int = 0) -> StreamingResponse:
        return StreamingResponse(
            _sse(session, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Exec-Id": session.id},
        )

    def _wants_stream(request: Request) -> bool:
        return "text/event-stream" in request.headers.get("accept", "")

    @app.post(
        f"{v1}/sandboxes/{{sandbox_id}}/execs",
        responses={
            **_ERRORS,
            201: {"description": "a background command, started"},
            202: {"description": "a foreground command, started (wait=false)"},
        },
        tags=["execs"],
    )
    async def exec_command(request: Request, who: Who, sandbox_id: str, body: ExecBody) -> Response:
        """Run a command. Foreground: the answer is its result, or with
        ``Accept: text/event-stream`` its output as it comes then its ending.
        Background: answers 201 at once; follow ``.../execs/{id}/events``."""
        session = await service.exec_start(who, sandbox_id, body.args())
        if _wants_stream(request):
            return _stream_response(session)
        if body.background:
            return JSONResponse(session.to_dict(), status_code=201)
        if not body.wait:
            return JSONResponse(session.to_dict(), status_code=202)
        await session.done.wait()
        return JSONResponse(session.to_dict())

    @app.get(f"{v1}/sandboxes/{{sandbox_id}}/execs", responses=_ERRORS, tags=["execs"])
    async def list_execs(who: Who, sandbox_id: str) -> list[dict[str, Any]]:
        """The sandbox's commands, newest first (the audit of its execs)."""
        return service.exec_history(who, sandbox_id)

    @app.get(f"{v1}/sandboxes/{{sandbox_id}}/execs/{{exec_id}}", responses=_ERRORS, tags=["execs"])
    async def get_exec(
        who: Who,
        sandbox_id: str,
        exec_id: str,
        wait_s: Annotated[float, Query(ge=0, le=3600)] = 0,
    ) -> dict[str, Any]:
        """A command; ``wait_s``: wait that long for its end first."""
        if wait_s > 0:
            with contextlib.suppress(TierboxError):
                session = service.session(who, sandbox_id, exec_id)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(session.done.wait(), wait_s)
        return service.exec_view(who, sandbox_id, exec_id)

    @app.get(
        f"{v1}/sandboxes/{{sandbox_id}}/execs/{{exec_id}}/events",
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
        response_class=StreamingResponse,
        tags=["execs"],
    )
    async def exec_events(
        who: Who,
        sandbox_id: str,
        exec_id: str,
        start: Annotated[int, Query(ge=0, le=1 << 40)] = 0,
    ) -> StreamingResponse:
        """Server-Sent Events: ``stdout``/``stderr`` chunks (from the
        ``start``-th), then ``exit`` with the command and its result."""
        return _stream_response(service.session(who, sandbox_id, exec_id), start)

    @app.post(
        f"{v1}/sandboxes/{{sandbox_id}}/execs/{{exec_id}}/stdin", responses=_ERRORS, tags=["execs"]
    )
    async def exec_stdin(
        who: Who, sandbox_id: str, exec_id: str, body: StdinBody
    ) -> dict[str, bool]:
        data = _stdin(body.data, body.data_b64) or b""
        await service.send_stdin(who, sandbox_id, exec_id, data, body.eof)
        return {"ok": True}

    @app.post(
        f"{v1}/sandboxes/{{sandbox_id}}/execs/{{exec_id}}/kill", responses=_ERRORS, tags=["execs"]
    )
    async def exec_kill(
        who: Who, sandbox_id: str, exec_id: str, body: Annotated[KillBody, Body()] | None = None
    ) -> dict[str, bool]:
        await service.kill(who, sandbox_id, exec_id, (body or KillBody()).signal)
        return {"ok": True}

    @app.websocket(f"{v1}/sandboxes/{{sandbox_id}}/execs/{{exec_id}}/ws")
    async def exec_ws(websocket: WebSocket, sandbox_id: str, exec_id: str) -> None:
        """The command's output as JSON messages (``stdout``, ``stderr``,
        ``exit``); with a key, messages ``stdin``, ``eof`` and ``kill`` drive it."""
        try:
            header = websocket.headers.get("authorization")
            who = _ws_caller(websocket)
            session = service.session(who, sandbox_id, exec_id)
        except TierboxError as exc:
            await websocket.close(
                code=4000 + codes.status_of(type(exc)) % 1000, reason=str(exc)[:120]
            )
            return
        await websocket.accept()

        async def inbound() -> None:
            while True:
                msg = await websocket.receive_json()
                if not header or not isinstance(msg, dict):
                    continue  # a browser session only watches
                kind = msg.get("type")
                with contextlib.suppress(TierboxError, ValueError, TypeError):
                    if kind == "stdin":
                        data = _stdin(msg.get("data"), msg.get("data_b64")) or b""
                        await service.send_stdin(who, sandbox_id, exec_id, data, False)
                    elif kind == "eof":
                        await service.send_stdin(who, sandbox_id, exec_id, b"", True)
                    elif kind == "kill":
                        await service.kill(who, sandbox_id, exec_id, int(msg.get("signal", 9)))

        reader = asyncio.ensure_future(inbound())
        try:
            async for kind, payload in session.events(_ws_start(websocket)):
                await websocket.send_text(json.dumps(_event(session, kind, payload)))
            await websocket.close()
        except WebSocketDisconnect:
            pass
        finally:
            reader.cancel()

    def _ws_caller(websocket: WebSocket) -> Caller:
        header = websocket.headers.get("authorization")
        if header:
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer":
                raise AuthenticationError("use the header Authorization: Bearer KEY")
            return db.authenticate(key.strip())
        found = sessions.get(websocket.cookies.get(SESSION_COOKIE))
        if found is not None:
            return found
        if on_unix_socket(websocket.scope):
            return Caller(tenant=OPERATOR, operator=True)
        raise AuthenticationError("an API key is needed: Authorization: Bearer KEY")

    # ---- one-shot runs ------------------------------------------------------------------
    @app.post(f"{v1}/run", responses=_ERRORS, tags=["execs"])
    async def run_once(request: Request, who: Who, body: RunBody) -> Response:
        """A fresh sandbox runs one command and is gone (as ``tierbox run``)."""
        _, session = await service.run_once(who, body.request(), body.exec_args())
        if _wants_stream(request):
            return _stream_response(session)
        await session.done.wait()
        return JSONResponse(session.to_dict())

    # ---- files ---------------------------------------------------------------------------
    @app.put(
        f"{v1}/sandboxes/{{sandbox_id}}/files",
        responses=_ERRORS,
        tags=["files"],
        openapi_extra=_raw_body("application/octet-stream"),
    )
    async def put_file(
        request: Request,
        who: Who,
        sandbox_id: str,
        path: PathQ,
        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
    ) -> dict[str, Any]:
        """Write a file (parents made, owned by the workload)."""
        service.find(who, sandbox_id)
        data = await _body(request, MAX_FILE_BODY_BYTES)
        await service.write_file(who, sandbox_id, path, data, mode)
        return {"path": path, "bytes": len(data)}

    @app.get(
        f"{v1}/sandboxes/{{sandbox_id}}/files",
        responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
        response_class=Response,
        tags=["files"],
    )
    async def get_file(
        who: Who, sandbox_id: str, path: PathQ, max_bytes: MaxQ = DEFAULT_READ_MAX_BYTES
    ) -> Response:
        """A regular file's bytes (capped at ``max_bytes``)."""
        data = await service.read_file(who, sandbox_id, path, max_bytes)
        return Response(data, media_type="application/octet-stream")

    @app.get(f"{v1}/sandboxes/{{sandbox_id}}/files/list", responses=_ERRORS, tags=["files"])
    async def list_files(who: Who, sandbox_id: str, path: PathQ) -> list[dict[str, Any]]:
        """A directory's entries: name, kind, size, mode (links not followed)."""
        return await service.entries(who, sandbox_id, path)

    @app.get(
        f"{v1}/sandboxes/{{sandbox_id}}/files/archive",
        responses={**_ERRORS, 200: {"content": {"application/x-tar": {}}}},
        response_class=Response,
        tags=["files"],
    )
    async def get_archive(
        who: Who, sandbox_id: str, path: PathQ, max_bytes: MaxQ = 1 << 30
    ) -> Response:
        """A file or directory as a tar (its base name at the top)."""
        archive = await service.download_tar(who, sandbox_id, path, max_bytes)
        return FileResponse(
            archive,
            media_type="application/x-tar",
            background=BackgroundTask(shutil.rmtree, archive.parent, True),
        )

    @app.put(
        f"{v1}/sandboxes/{{sandbox_id}}/files/archive",
        responses=_ERRORS,
        tags=["files"],
        openapi_extra=_raw_body("application/x-tar"),
    )
    async def put_archive(
        request: Request, who: Who, sandbox_id: str, path: PathQ
    ) -> dict[str, Any]:
        """Unpack a tar at ``path`` (a directory, made if missing)."""
        service.find(who, sandbox_id)
        tmp = Path(tempfile.mkdtemp(prefix="tierbox-serve-"))
        try:
            archive = tmp / "upload.tar"
            await _body_to(request, archive, MAX_TAR_BODY_BYTES)
            copied = await service.upload_tar(who, sandbox_id, path, archive)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"path": path, "bytes": copied}

    # ---- snapshots -------------------------------------------------------------------------
    @app.post(
        f"{v1}/sandboxes/{{sandbox_id}}/snapshots",
        status_code=201,
        responses=_ERRORS,
        tags=["snapshots"],
    )
    async def create_snapshot(who: Who, sandbox_id: str) -> dict[str, Any]:
        return await service.snapshot(who, sandbox_id)

    @app.post(f"{v1}/sandboxes/{{sandbox_id}}/revert", responses=_ERRORS, tags=["snapshots"])
    async def revert(who: Who, sandbox_id: str, body: RevertBody) -> dict[str, bool]:
        """Bring the sandbox back to a snapshot in place (tiers that revert: vm)."""
        await service.revert(who, sandbox_id, body.snapshot)
        return {"ok": True}

    @app.get(f"{v1}/snapshots", responses=_ERRORS, tags=["snapshots"])
    async def list_snapshots(who: Who) -> list[dict[str, Any]]:
        return service.snapshots(who)

    @app.get(f"{v1}/snapshots/{{snapshot_id}}", responses=_ERRORS, tags=["snapshots"])
    async def get_snapshot(who: Who, snapshot_id: str) -> dict[str, Any]:
        return service.snapshot_view(who, snapshot_id)

    @app.delete(f"{v1}/snapshots/{{snapshot_id}}", responses=_ERRORS, tags=["snapshots"])
    async def delete_snapshot(who: Who, snapshot_id: str) -> dict[str, bool]:
        await service.delete_snapshot(who, snapshot_id)
        return {"ok": True}

    @app.post(
        f"{v1}/snapshots/{{snapshot_id}}/restore",
        status_code=201,
        responses=_ERRORS,
        tags=["snapshots"],
    )
    async def restore(who: Who, snapshot_id: str) -> dict[str, Any]:
        """A new sandbox from the snapshot."""
        made: list[dict[str, Any]] = await service.restore(who, snapshot_id, None)
        return made[0]

    @app.post(
        f"{v1}/snapshots/{{snapshot_id}}/clone",
        status_code=201,
        responses=_ERRORS,
        tags=["snapshots"],
    )
    async def clone(
        who: Who, snapshot_id: str, body: Annotated[CloneBody, Body()] | None = None
    ) -> list[dict[str, Any]]:
        """``count`` new sandboxes from the snapshot."""
        return await service.restore(who, snapshot_id, (body or CloneBody()).count)

    # ---- images, tiers, bench, tenant ----------------------------------------------------
    @app.get(f"{v1}/images", responses=_ERRORS, tags=["images"])
    async def list_images(who: Who) -> list[dict[str, Any]]:
        from tierbox.images.store import default_store

        return [r.to_dict() for r in await service.blocking(default_store().list)]

    @app.get(f"{v1}/images/{{ref:path}}", responses=_ERRORS, tags=["images"])
    async def inspect_image(who: Who, ref: str) -> dict[str, Any]:
        from tierbox.images.store import default_store

        _text_bytes(ref, "ref")
        record = await service.blocking(default_store().resolve, ref)
        return record.to_dict()

    @app.get(f"{v1}/tiers", responses=_ERRORS, tags=["tiers"])
    async def tiers(who: Who) -> list[dict[str, Any]]:
        """Every tier: whether it runs here (and why not), what it isolates and can do."""
        return await service.blocking(list_tiers)

    @app.get(f"{v1}/bench", responses=_ERRORS, tags=["bench"])
    async def bench(who: Who) -> dict[str, Any]:
        """The latest bench report the daemon was given (``--bench-dir``)."""
        from tierbox.server.dashboard import latest_bench

        found = await service.blocking(latest_bench, service.bench_dir)
        if found is None:
            return {"report": None, "results": None}
        return {"report": str(found[0]), "results": found[1]}

    @app.get(f"{v1}/me", responses=_ERRORS, tags=["tenants"])
    async def me(who: Who) -> dict[str, Any]:
        """Who this key is: its tenant, quotas and what it uses now."""
        tenant = db.tenant(who.tenant)
        mine = [v for v in service.list(who) if v["tenant"] == who.tenant]
        return {
            "tenant": who.tenant,
            "operator": who.operator,
            "quotas": tenant.to_dict() if tenant else None,
            "usage": {
                "sandboxes": len(mine),
                "memory_mib": sum(v["memory_mib"] or 0 for v in mine),
            },
        }

    @app.get(f"{v1}/audit", responses=_ERRORS, tags=["tenants"])
    async def audit(
        who: Who, limit: Annotated[int, Query(ge=1, le=10000)] = 1000
    ) -> list[dict[str, Any]]:
        """This tenant's audit log, newest first: who, when, what, how it ended."""
        return db.audit_log(None if who.operator else who.tenant, limit)

    if dashboard:
        from tierbox.server.dashboard import mount_dashboard

        mount_dashboard(app, service, sessions, authenticate)
    return app


class _CountRequests:
    """Counts answers by status class (a plain ASGI wrapper: cheaper than
    Starlette's BaseHTTPMiddleware on every request)."""

    def __init__(self, app: Any, counter: Any) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(f"{message['status'] // 100}xx").inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _raw_body(media: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {media: {"schema": {"type": "string", "format": "binary"}}},
        }
    }


async def _body(request: Request, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise FileTooLargeError(
                f"the body is larger than {cap} bytes: send a tar to .../files/archive"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _body_to(request: Request, path: Path, cap: int) -> None:
    size = 0
    with path.open("wb") as out:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise FileTooLargeError(f"the archive is larger than {cap} bytes")
            out.write(chunk)


def _event(session: ExecSession, kind: str, payload: Any) -> dict[str, Any]:
    if kind == "exit":
        return {"type": "exit", "exec": session.to_dict()}
    if kind == "gap":
        return {"type": "gap", "chunks": payload}
    return {
        "type": kind,
        "data_b64": base64.b64encode(payload).decode(),
        "text": payload.decode(errors="replace"),
    }


async def _sse(session: ExecSession, start: int) -> AsyncIterator[bytes]:
    async for kind, payload in session.events(start):
        event = _event(session, kind, payload)
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _ws_start(websocket: WebSocket) -> int:
    try:
        return max(0, int(websocket.query_params.get("start", "0")))
    except ValueError:
        return 0


def openapi_schema() -> dict[str, Any]:
    """The API's OpenAPI schema, as the daemon serves it at ``/openapi.json``
    (``python -m tierbox.server.app > src/tierbox/server/openapi.json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "state.db")
        try:
            schema: dict[str, Any] = create_app(Service(db)).openapi()
        finally:
            db.close()
    return schema


if __name__ == "__main__":
    print(json.dumps(openapi_schema(), indent=1, sort_keys=True))
