"""The daemon's durable state: one SQLite database (WAL) in its state directory.

Tables: tenants (quotas), api_keys (only a SHA-256 of each key), sandboxes
(owner, spec, state), snapshots, execs (commands with their ending and the
head of their output), audit (who did what, when, with what outcome) and
daemon_runs (each start of the daemon, to tell a clean stop from a crash and
to find sandboxes a crashed daemon was making).

Every write is one transaction. WAL with ``synchronous=NORMAL`` loses nothing
a committed transaction wrote when the daemon is killed (only a power cut
could take the last ones), and lets ``tierbox keys create`` write while the
daemon runs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierbox import paths
from tierbox.errors import AuthenticationError, UsageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    max_sandboxes INTEGER,
    max_memory_mib INTEGER,
    allowed_tiers TEXT,
    created_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    sha256 TEXT NOT NULL,
    created_unix REAL NOT NULL,
    revoked_unix REAL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT,
    tier TEXT NOT NULL,
    image TEXT,
    spec TEXT NOT NULL,
    memory_mib INTEGER,
    state TEXT NOT NULL,
    created_unix REAL NOT NULL,
    ended_unix REAL,
    expires_unix REAL,
    reason TEXT,
    source_snapshot TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_by_tenant ON sandboxes(tenant, state);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    created_unix REAL NOT NULL,
    deleted_unix REAL
);
CREATE TABLE IF NOT EXISTS execs (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    argv TEXT NOT NULL,
    background INTEGER NOT NULL,
    pid INTEGER,
    status TEXT NOT NULL,
    exit_code INTEGER,
    termination TEXT,
    started_unix REAL NOT NULL,
    ended_unix REAL,
    stdout_head BLOB,
    stderr_head BLOB
);
CREATE INDEX IF NOT EXISTS execs_by_sandbox ON execs(sandbox_id, started_unix);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_unix REAL NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT,
    action TEXT NOT NULL,
    target TEXT,
    detail TEXT,
    status TEXT NOT NULL,
    exit_code INTEGER
);
CREATE TABLE IF NOT EXISTS daemon_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pid INTEGER NOT NULL,
    started_unix REAL NOT NULL,
    seen_unix REAL NOT NULL,
    stopped_unix REAL,
    clean INTEGER NOT NULL DEFAULT 0
);
"""

#: Sandbox states: creating -> running -> deleting -> deleted; running ->
#: dead (its engine died; reaped) or expired (its ttl ran out); creating ->
#: failed (the create raised, or the daemon died during it).
LIVE_STATES = ("creating", "running", "deleting")
#: the tenant of requests on the unix socket without a key: the host operator
OPERATOR = "local"
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
KEY_PREFIX = "tbk_"
#: how much of each stream of a command the database keeps for the dashboard
OUTPUT_HEAD_BYTES = 64 << 10


def default_dir() -> Path:
    """The daemon's state directory: ``$TIERBOX_SERVER_DIR``, else
    ``$TIERBOX_HOME/server``."""
    value = os.environ.get("TIERBOX_SERVER_DIR")
    return Path(value) if value else paths.home() / "server"


def db_path(state_dir: Path) -> Path:
    return state_dir / "state.db"


@dataclass(frozen=True)
class Tenant:
    """A tenant and its quotas (None: no limit)."""

    name: str
    max_sandboxes: int | None = None
    max_memory_mib: int | None = None
    allowed_tiers: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_sandboxes": self.max_sandboxes,
            "max_memory_mib": self.max_memory_mib,
            "allowed_tiers": list(self.allowed_tiers) if self.allowed_tiers is not None else None,
        }


@dataclass(frozen=True)
class Caller:
    """Who a request comes from. ``operator``: the host's root on the unix
    socket without a key, who sees every tenant's sandboxes."""

    tenant: str
    key_id: str | None = None
    operator: bool = False

    def sees(self, tenant: str) -> bool:
        return self.operator or tenant == self.tenant


@dataclass
class SandboxRow:
    id: str
    tenant: str
    name: str | None
    tier: str
    image: str | None
    spec: dict[str, Any]
    memory_mib: int | None
    state: str
    created_unix: float
    ended_unix: float | None = None
    expires_unix: float | None = None
    reason: str | None = None
    source_snapshot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "tier": self.tier,
            "image": self.image,
            "spec": self.spec,
            "memory_mib": self.memory_mib,
            "state": self.state,
            "created_unix": self.created_unix,
            "ended_unix": self.ended_unix,
            "expires_unix": self.expires_unix,
            "reason": self.reason,
            "source_snapshot": self.source_snapshot,
        }


@dataclass
class ExecRow:
    id: str
    sandbox_id: str
    tenant: str
    argv: list[str]
    background: bool
    status: str
    started_unix: float
    pid: int | None = None
    exit_code: int | None = None
    termination: dict[str, Any] | None = None
    ended_unix: float | None = None
    stdout_head: bytes = b""
    stderr_head: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def hash_key(key: str) -> str:
    """SHA-256 of a key: keys are 256 random bits, so a fast hash is enough
    (there is nothing to guess that a slow one would protect)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_RE.fullmatch(name):
        raise UsageError(
            f"tenant {name!r}: use lower-case letters, digits, '.', '_' or '-' (at most 63)"
        )
    return name


class Database:
    """One connection shared by the daemon's threads (a lock serialises it)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.executescript(SCHEMA)
        os.chmod(path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE: writers queue, never deadlock)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # ---- tenants and keys ---------------------------------------------------------
    def ensure_tenant(self, name: str) -> Tenant:
        check_tenant_name(name)
        with self.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO tenants(name, created_unix) VALUES (?, ?)",
                (name, time.time()),
            )
        tenant = self.tenant(name)
        assert tenant is not None
        return tenant

    def tenant(self, name: str) -> Tenant | None:
        rows = self.query("SELECT * FROM tenants WHERE name = ?", (name,))
        if not rows:
            return None
        r = rows[0]
        tiers = json.loads(r["allowed_tiers"]) if r["allowed_tiers"] is not None else None
        return Tenant(
            name=r["name"],
            max_sandboxes=r["max_sandboxes"],
            max_memory_mib=r["max_memory_mib"],
            allowed_tiers=tuple(tiers) if tiers is not None else None,
        )

    def tenants(self) -> list[Tenant]:
        names = [r["name"] for r in self.query("SELECT name FROM tenants ORDER BY name")]
        return [t for n in names if (t := self.tenant(n)) is not None]

    def set_quotas(
        self,
        name: str,
        *,
        max_sandboxes: int | None,
        max_memory_mib: int | None,
        allowed_tiers: Sequence[str] | None,
    ) -> Tenant:
        self.ensure_tenant(name)
        with self.tx() as c:
            c.execute(
                "UPDATE tenants SET max_sandboxes = ?, max_memory_mib = ?, allowed_tiers = ? "
                "WHERE name = ?",
                (
                    max_sandboxes,
                    max_memory_mib,
                    json.dumps(list(allowed_tiers)) if allowed_tiers is not None else None,
                    name,
                ),
            )
        tenant = self.tenant(name)
        assert tenant is not None
        return tenant

    def create_key(self, tenant: str) -> tuple[str, str]:
        """A new key for ``tenant`` (made if new): ``(key_id, key)``. Only
        the key's hash is stored; the key itself is shown once."""
        self.ensure_tenant(tenant)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        with self.tx() as c:
            c.execute(
                "INSERT INTO api_keys(key_id, tenant, sha256, created_unix) VALUES (?, ?, ?, ?)",
                (key_id, tenant, hash_key(key), time.time()),
            )
        return key_id, key

    def revoke_key(self, key_id: str) -> bool:
        with self.tx() as c:
            cur = c.execute(
                "UPDATE api_keys SET revoked_unix = ? WHERE key_id = ? AND revoked_unix IS NULL",
                (time.time(), key_id),
            )
        return cur.rowcount > 0

    def keys(self) -> list[dict[str, Any]]:
        return [
            {
                "key_id": r["key_id"],
                "tenant": r["tenant"],
                "created_unix": r["created_unix"],
                "revoked_unix": r["revoked_unix"],
            }
            for r in self.query("SELECT * FROM api_keys ORDER BY created_unix")
        ]

    def active_key_count(self) -> int:
        return int(self.query("SELECT count(*) FROM api_keys WHERE revoked_unix IS NULL")[0][0])

    def authenticate(self, key: str) -> Caller:
        """The caller a key stands for; AuthenticationError for a malformed,
        unknown or revoked key (the message never contains the key)."""
        bad = AuthenticationError("invalid or revoked API key")
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX) or len(key) > 200:
            raise bad
        key_id = key[len(KEY_PREFIX) :].split("_", 1)[0]
        rows = self.query(
            "SELECT tenant, sha256, revoked_unix FROM api_keys WHERE key_id = ?", (key_id,)
        )
        if not rows or rows[0]["revoked_unix"] is not None:
            raise bad
        if not hmac.compare_digest(rows[0]["sha256"], hash_key(key)):
            raise bad
        return Caller(tenant=rows[0]["tenant"], key_id=key_id)

    # ---- sandboxes ---------------------------------------------------------------
    @staticmethod
    def _sandbox(r: sqlite3.Row) -> SandboxRow:
        return SandboxRow(
            id=r["id"],
            tenant=r["tenant"],
            name=r["name"],
            tier=r["tier"],
            image=r["image"],
            spec=json.loads(r["spec"]),
            memory_mib=r["memory_mib"],
            state=r["state"],
            created_unix=r["created_unix"],
            ended_unix=r["ended_unix"],
            expires_unix=r["expires_unix"],
            reason=r["reason"],
            source_snapshot=r["source_snapshot"],
        )

    def insert_sandbox(self, row: SandboxRow) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO sandboxes(id, tenant, name, tier, image, spec, memory_mib, state, "
                "created_unix, expires_unix, source_snapshot) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    row.id,
                    row.tenant,
                    row.name,
                    row.tier,
                    row.image,
                    json.dumps(row.spec),
                    row.memory_mib,
                    row.state,
                    row.created_unix,
                    row.expires_unix,
                    row.source_snapshot,
                ),
            )

    def set_sandbox_state(
        self,
        sandbox_id: str,
        state: str,
        *,
        reason: str | None = None,
        new_id: str | None = None,
        image: str | None = None,
        audit: tuple[Caller, str, str | None, dict[str, Any] | None, str] | None = None,
    ) -> None:
        """A sandbox's new state, and with ``audit`` its audit entry
        (caller, action, target, detail, status) in the same transaction."""
        ended = time.time() if state not in LIVE_STATES else None
        with self.tx() as c:
            c.execute(
                "UPDATE sandboxes SET state = ?, reason = coalesce(?, reason), "
                "ended_unix = coalesce(?, ended_unix), id = coalesce(?, id), "
                "image = coalesce(?, image) WHERE id = ?",
                (state, reason, ended, new_id, image, sandbox_id),
            )
            if audit is not None:
                self._audit(c, *audit)

    def sandbox(self, sandbox_id: str) -> SandboxRow | None:
        rows = self.query("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,))
        return self._sandbox(rows[0]) if rows else None

    def sandbox_by_name(self, tenant: str, name: str) -> SandboxRow | None:
        rows = self.query(
            "SELECT * FROM sandboxes WHERE tenant = ? AND name = ? AND state IN (?,?,?)",
            (tenant, name, *LIVE_STATES),
        )
        return self._sandbox(rows[0]) if rows else None

    def sandboxes(
        self, *, tenant: str | None = None, states: Sequence[str] | None = LIVE_STATES
    ) -> list[SandboxRow]:
        sql = "SELECT * FROM sandboxes WHERE 1=1"
        args: list[Any] = []
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        return [self._sandbox(r) for r in self.query(sql + " ORDER BY created_unix", args)]

    # ---- snapshots ----------------------------------------------------------------
    def insert_snapshot(
        self, snap_id: str, tenant: str, sandbox_id: str, tier: str, kind: str, ref: dict[str, Any]
    ) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO snapshots(id, tenant, sandbox_id, tier, kind, ref, created_unix) "
                "VALUES (?,?,?,?,?,?,?)",
                (snap_id, tenant, sandbox_id, tier, kind, json.dumps(ref), time.time()),
            )

    def snapshot(self, snap_id: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT * FROM snapshots WHERE id = ? AND deleted_unix IS NULL", (snap_id,)
        )
        return _snapshot(rows[0]) if rows else None

    def snapshots(self, tenant: str | None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM snapshots WHERE deleted_unix IS NULL"
        args: list[Any] = []
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        return [_snapshot(r) for r in self.query(sql + " ORDER BY created_unix", args)]

    def delete_snapshot(self, snap_id: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE snapshots SET deleted_unix = ? WHERE id = ?", (time.time(), snap_id))

    # ---- commands and the audit log ------------------------------------------------
    def insert_exec(self, row: ExecRow, key_id: str | None) -> int:
        """Record a command that starts, with its audit entry; returns the
        audit entry's number (closed by :meth:`finish_exec`)."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO execs(id, sandbox_id, tenant, argv, background, status, "
                "started_unix) VALUES (?,?,?,?,?,?,?)",
                (
                    row.id,
                    row.sandbox_id,
                    row.tenant,
                    json.dumps(row.argv),
                    int(row.background),
                    row.status,
                    row.started_unix,
                ),
            )
            cur = c.execute(
                "INSERT INTO audit(ts_unix, tenant, key_id, action, target, detail, status) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    row.started_unix,
                    row.tenant,
                    key_id,
                    "exec",
                    row.sandbox_id,
                    json.dumps({"exec": row.id, "argv": row.argv, "background": row.background}),
                    "running",
                ),
            )
            return int(cur.lastrowid or 0)

    def set_exec_pid(self, exec_id: str, pid: int | None) -> None:
        if pid is None:
            return
        with self.tx() as c:
            c.execute("UPDATE execs SET pid = ? WHERE id = ?", (pid, exec_id))

    def finish_exec(
        self,
        exec_id: str,
        audit_seq: int,
        *,
        status: str,
        exit_code: int | None,
        termination: dict[str, Any] | None,
        stdout_head: bytes,
        stderr_head: bytes,
    ) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE execs SET status = ?, exit_code = ?, termination = ?, ended_unix = ?, "
                "stdout_head = ?, stderr_head = ? WHERE id = ?",
                (
                    status,
                    exit_code,
                    json.dumps(termination) if termination is not None else None,
                    time.time(),
                    stdout_head[:OUTPUT_HEAD_BYTES],
                    stderr_head[:OUTPUT_HEAD_BYTES],
                    exec_id,
                ),
            )
            c.execute(
                "UPDATE audit SET status = ?, exit_code = ? WHERE seq = ?",
                (status, exit_code, audit_seq),
            )

    def execs(self, sandbox_id: str, limit: int = 200) -> list[ExecRow]:
        rows = self.query(
            "SELECT * FROM execs WHERE sandbox_id = ? ORDER BY started_unix DESC LIMIT ?",
            (sandbox_id, limit),
        )
        return [_exec(r) for r in rows]

    def exec_row(self, exec_id: str) -> ExecRow | None:
        rows = self.query("SELECT * FROM execs WHERE id = ?", (exec_id,))
        return _exec(rows[0]) if rows else None

    def running_execs(self) -> list[ExecRow]:
        return [_exec(r) for r in self.query("SELECT * FROM execs WHERE status = 'running'")]

    def interrupt_execs(self, reason: str) -> int:
        """Commands a crashed daemon left 'running': they ended with it."""
        with self.tx() as c:
            cur = c.execute(
                "UPDATE execs SET status = 'interrupted', ended_unix = ?, termination = ? "
                "WHERE status = 'running'",
                (
                    time.time(),
                    json.dumps({"kind": "interrupted", "message": reason, "code": "server"}),
                ),
            )
            c.execute("UPDATE audit SET status = 'interrupted' WHERE status = 'running'")
        return cur.rowcount

    def audit(
        self,
        caller: Caller,
        action: str,
        target: str | None,
        detail: dict[str, Any] | None,
        status: str,
        exit_code: int | None = None,
    ) -> None:
        with self.tx() as c:
            self._audit(c, caller, action, target, detail, status, exit_code)

    @staticmethod
    def _audit(
        c: sqlite3.Connection,
        caller: Caller,
        action: str,
        target: str | None,
        detail: dict[str, Any] | None,
        status: str,
        exit_code: int | None = None,
    ) -> None:
        c.execute(
            "INSERT INTO audit(ts_unix, tenant, key_id, action, target, detail, status, "
            "exit_code) VALUES (?,?,?,?,?,?,?,?)",
            (
                time.time(),
                caller.tenant,
                caller.key_id,
                action,
                target,
                json.dumps(detail) if detail is not None else None,
                status,
                exit_code,
            ),
        )

    def audit_log(self, tenant: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        sql = "SELECT * FROM audit"
        args: list[Any] = []
        if tenant is not None:
            sql += " WHERE tenant = ?"
            args.append(tenant)
        rows = self.query(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit])
        return [
            {
                "seq": r["seq"],
                "ts_unix": r["ts_unix"],
                "tenant": r["tenant"],
                "key_id": r["key_id"],
                "action": r["action"],
                "target": r["target"],
                "detail": json.loads(r["detail"]) if r["detail"] else None,
                "status": r["status"],
                "exit_code": r["exit_code"],
            }
            for r in rows
        ]

    # ---- daemon runs -------------------------------------------------------------------
    def begin_run(self) -> tuple[int, list[dict[str, Any]]]:
        """Record this start; returns its run id and the earlier runs that
        never stopped cleanly (crashed or killed) and are not yet reconciled."""
        now = time.time()
        with self.tx() as c:
            crashed = [
                dict(r)
                for r in c.execute(
                    "SELECT * FROM daemon_runs WHERE stopped_unix IS NULL ORDER BY id"
                ).fetchall()
            ]
            c.execute("UPDATE daemon_runs SET stopped_unix = seen_unix WHERE stopped_unix IS NULL")
            cur = c.execute(
                "INSERT INTO daemon_runs(pid, started_unix, seen_unix) VALUES (?,?,?)",
                (os.getpid(), now, now),
            )
            run_id = int(cur.lastrowid or 0)
        return run_id, crashed

    def heartbeat(self, run_id: int) -> None:
        with self.tx() as c:
            c.execute("UPDATE daemon_runs SET seen_unix = ? WHERE id = ?", (time.time(), run_id))

    def end_run(self, run_id: int) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE daemon_runs SET stopped_unix = ?, seen_unix = ?, clean = 1 WHERE id = ?",
                (time.time(), time.time(), run_id),
            )

    def restarts(self) -> dict[str, int]:
        """Starts after the first, by how the run before each ended."""
        rows = self.query("SELECT clean FROM daemon_runs WHERE stopped_unix IS NOT NULL")
        clean = sum(1 for r in rows if r["clean"])
        return {"clean": clean, "crash": len(rows) - clean}


def _snapshot(r: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": r["id"],
        "tenant": r["tenant"],
        "sandbox_id": r["sandbox_id"],
        "tier": r["tier"],
        "kind": r["kind"],
        "ref": json.loads(r["ref"]),
        "created_unix": r["created_unix"],
    }


def _exec(r: sqlite3.Row) -> ExecRow:
    return ExecRow(
        id=r["id"],
        sandbox_id=r["sandbox_id"],
        tenant=r["tenant"],
        argv=json.loads(r["argv"]),
        background=bool(r["background"]),
        status=r["status"],
        started_unix=r["started_unix"],
        pid=r["pid"],
        exit_code=r["exit_code"],
        termination=json.loads(r["termination"]) if r["termination"] else None,
        ended_unix=r["ended_unix"],
        stdout_head=bytes(r["stdout_head"] or b""),
        stderr_head=bytes(r["stderr_head"] or b""),
    )
