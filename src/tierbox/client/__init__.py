"""The remote SDK: sandboxes on a tierbox daemon (``tierbox serve``), with the
methods of the local :class:`~tierbox.Sandbox`.

- :class:`Client` (:mod:`.sync`) and :class:`AsyncClient` (:mod:`.aio`), on
  httpx, over the daemon's unix socket or HTTP;
- results are :class:`~tierbox.ExecResult`, errors the very classes of
  :mod:`tierbox.errors` (the daemon names them in each error's ``code``).
"""

from tierbox.client._common import RemoteSandboxRecord, RemoteSnapshot
from tierbox.client.aio import AsyncClient, AsyncRemoteCommandHandle, AsyncRemoteSandbox
from tierbox.client.sync import (
    Client,
    RemoteCommandHandle,
    RemoteFiles,
    RemoteSandbox,
)

__all__ = [
    "AsyncClient",
    "AsyncRemoteCommandHandle",
    "AsyncRemoteSandbox",
    "Client",
    "RemoteCommandHandle",
    "RemoteFiles",
    "RemoteSandbox",
    "RemoteSandboxRecord",
    "RemoteSnapshot",
]
