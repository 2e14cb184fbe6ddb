"""``tierbox serve``: sandboxes as an HTTP service for many clients and tenants.

Built on the facade (:class:`~tierbox.Sandbox`, :class:`~tierbox.AsyncSandbox`),
never on a tier's internals:

- :mod:`.codes`: error classes <-> the API's ``code`` field and HTTP status
  (shared with the remote SDK, :mod:`tierbox.client`);
- :mod:`.db`: durable state in SQLite (WAL): tenants, hashed API keys,
  sandboxes and their owners, snapshots, commands, the audit log;
- :mod:`.service`: the daemon's sandboxes, commands, quotas and reconciliation
  after a restart, independent of HTTP;
- :mod:`.app`: the versioned REST API (FastAPI), streaming over SSE and
  WebSocket; :mod:`.metrics`: Prometheus; :mod:`.dashboard`: the web pages;
- :mod:`.daemon`: uvicorn on a unix socket (and TCP when asked), graceful
  shutdown on SIGTERM.

Importing this package loads nothing heavy: the SDK imports :mod:`.codes`.
"""
