"""A staging OCI image layout holding an imported image's canonical layers.

An import rewrites every layer (:mod:`tierbox.images.tarstream`), so the
digests that name layers change: the config's diff_ids, the manifest and the
index are written here for the new blobs. skopeo then copies this layout into
the store, checking every digest on the way. Why by hand: the blobs are ours,
made in this process; skopeo and umoci offer no way to register a blob and
recompute the documents that name it.
"""

from __future__ import annotations

import gzip
import json
import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierbox.images.tarstream import HashingWriter, Writable

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
#: zlib level for canonical layers: 1 compresses a rootfs ~3x at several times level 6's speed.
LAYER_GZIP_LEVEL = 1
_CHUNK_BYTES = 1 << 20
_QUEUED_CHUNKS = 8  # up to ~8 MiB in flight between the tar writer and zlib


@dataclass(frozen=True)
class Blob:
    """A blob written to the layout: its digest and size in bytes."""

    digest: str
    size: int

    def descriptor(self, media_type: str) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": self.digest, "size": self.size}


class _BackgroundGzip:
    """A gzip stream compressed on a second thread.

    zlib releases the GIL, so compression runs beside the tar parsing that
    feeds it; a large layer imports in about the time of the slower of the two.
    """

    def __init__(self, out: Writable) -> None:
        raw: Any = out
        self._gz = gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=LAYER_GZIP_LEVEL, mtime=0
        )
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._pending = bytearray()  # small writes (tar headers) batched into chunks
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._compress, name="tierbox-gzip", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self._pending += data
        if len(self._pending) >= _CHUNK_BYTES:
            self._queue.put(bytes(self._pending))
            self._pending.clear()
        return len(data)

    def close(self) -> None:
        """Finish the gzip stream (trailer included); raises what compressing raised."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            self._queue.put(bytes(self._pending))
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._gz.close()

    def _compress(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:  # after an error, drain so the writer never blocks
                try:
                    self._gz.write(chunk)
                except BaseException as exc:
                    self._error = exc


class GzipBlob:
    """Where a blob is being written: ``stream`` takes the uncompressed bytes.

    The gzip header carries no name or time, so one input gives one digest.
    """

    def __init__(self, out: Writable) -> None:
        self.hashed = HashingWriter(out)
        self.stream = _BackgroundGzip(self.hashed)
        self.blob: Blob | None = None  # set when the stream is closed and the blob named


class StagingLayout:
    """An OCI image layout directory being filled with one image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs" / "sha256"
        self._blobs.mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    @contextmanager
    def gzip_blob(self) -> Iterator[GzipBlob]:
        """A new gzip-compressed blob; its digest is known once the block ends without error."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._blobs)
        try:
            with os.fdopen(fd, "wb") as fh:
                writer = GzipBlob(fh)
                try:
                    yield writer
                finally:
                    writer.stream.close()
            writer.blob = Blob(writer.hashed.digest, writer.hashed.size)
            os.rename(tmp, self._blobs / writer.blob.digest.removeprefix("sha256:"))
        finally:
            Path(tmp).unlink(missing_ok=True)

    def json_blob(self, document: Any) -> Blob:
        """Write a JSON document as a blob."""
        data = json.dumps(document, separators=(",", ":")).encode()
        hashed = HashingWriter()
        hashed.write(data)
        path = self._blobs / hashed.digest.removeprefix("sha256:")
        path.write_bytes(data)
        return Blob(hashed.digest, hashed.size)

    def write_image(
        self,
        ref_name: str,
        config: dict[str, Any],
        layers: list[tuple[Blob, str]],
        annotations: dict[str, str],
    ) -> Blob:
        """Write config (with the layers' diff_ids), manifest and index naming ``ref_name``."""
        config = {**config, "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]}}
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.json_blob(config).descriptor(OCI_CONFIG),
            "layers": [blob.descriptor(OCI_LAYER_GZIP) for blob, _ in layers],
        }
        if annotations:
            manifest["annotations"] = annotations
        blob = self.json_blob(manifest)
        entry = {**blob.descriptor(OCI_MANIFEST), "annotations": {REF_NAME_ANNOTATION: ref_name}}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        (self.root / "index.json").write_text(json.dumps(index, separators=(",", ":")))
        return blob
