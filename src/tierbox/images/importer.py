"""Turn an image archive into a staging OCI layout whose layers are exactly what was checked.

The archive and each layer are parsed once (:mod:`tierbox.images.tarstream`),
bounded by one :class:`~tierbox.images.tarstream.ImportLimits` for the whole
import, checked entry by entry, and written back canonically into a staging
layout (:mod:`tierbox.images.layout`). The store copies that layout in with
skopeo; umoci later unpacks those canonical layers and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO

from tierbox.errors import ImageError
from tierbox.images import archive, tarstream
from tierbox.images.layout import Blob, StagingLayout
from tierbox.images.safety import TarScanner

Progress = Callable[[str], None]


def stage_archive(
    source: Path,
    scratch: Path,
    *,
    wanted: str | None,
    limits: tarstream.ImportLimits,
    name_for: Callable[[str | None], str],
    say: Progress,
) -> tuple[Path, str]:
    """Write the image in ``source`` to a staging layout under ``scratch``.

    ``name_for`` turns the archive's embedded name into the ref to store it
    under. Returns the layout's path and that ref.
    """
    tally = tarstream.Tally(limits)
    with archive.open_image(source, scratch, wanted=wanted, tally=tally) as image:
        key = name_for(image.embedded_ref)
        layout = StagingLayout(scratch / "oci")
        scanner = TarScanner()  # one across layers: a symlink planted below stays known above
        count = len(image.layers)
        say(f"checking {image.kind} {source.name}: {count} layer(s)")
        layers: list[tuple[Blob, str]] = []
        for i, layer in enumerate(image.layers, 1):
            where = f"{source.name} layer {i}/{count}"
            with image.open_layer(layer) as raw, layout.gzip_blob() as blob:
                checked = _DigestReader(raw)
                diff_id = tarstream.rewrite_layer(
                    checked, blob.stream, where=where, scanner=scanner, tally=tally
                )
                checked.verify(layer.digest, where)
            assert blob.blob is not None
            layers.append((blob.blob, diff_id))
        layout.write_image(key, image.config, layers, image.annotations)
    say(f"checked {tally.entries:,} entries, {tally.unpacked_bytes:,} bytes unpacked")
    return layout.root, key


class _DigestReader:
    """Hashes a blob as it is read, so an oci-archive layer is checked against its digest."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hashed = tarstream.HashingWriter()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hashed.write(data)
        return data

    def verify(self, digest: str | None, where: str) -> None:
        """Read what the tar reader left (padding) and compare; no-op without a digest."""
        if digest is None:
            return
        with tarstream.decoding_errors(where):
            while self.read(1 << 20):
                pass
        if self._hashed.digest != digest:
            actual = self._hashed.digest
            raise ImageError(f"{where}: blob {digest} is corrupt (content hashes to {actual})")
