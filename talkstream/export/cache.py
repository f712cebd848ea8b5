"""The cache of built artifacts (ONNX graphs, TensorRT engines, timing caches).

An artifact lives in its own directory named by a key: a readable prefix plus the sha256 of the
key's fields (model hash, input shapes, precision, library versions, GPU), which are also written
beside it as ``key.json`` so that a person can see why two entries differ::

    <root>/artifacts/<backend>/<name>-<sha16>/{key.json, <files>}

Entries are built in a temporary directory and renamed into place, so a crashed build never
leaves a half entry that a later run would trust. Nothing is rebuilt unless the key changes or a
rebuild is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ArtifactCache", "CacheEntry", "cache_key"]

KEY_FILE = "key.json"


def cache_key(fields: Mapping[str, Any]) -> str:
    """sha256 (hex) of the JSON of ``fields`` with sorted keys: the same fields, the same key."""
    blob = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One keyed artifact directory."""

    path: Path
    fields: Mapping[str, Any]

    @property
    def ready(self) -> bool:
        """Whether the entry was completely built (its key file is written last)."""
        return (self.path / KEY_FILE).is_file()

    def file(self, name: str) -> Path:
        return self.path / name


class ArtifactCache:
    """Keyed artifact directories under ``<root>/artifacts``.

    Args:
        root: the talkstream cache root (the CLI's ``--cache-dir``); None uses a private
            temporary directory removed with this object (nothing persists: every run rebuilds).
    """

    def __init__(self, root: str | Path | None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="talkstream-artifacts-")
            root = self._tmp.name
        self.root = Path(root) / "artifacts"

    @property
    def persistent(self) -> bool:
        return self._tmp is None

    def entry(self, backend: str, name: str, fields: Mapping[str, Any]) -> CacheEntry:
        """The entry of ``name`` built by ``backend`` for ``fields`` (it may not exist yet)."""
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"artifact name {name!r} must be alphanumeric with - _ .")
        digest = cache_key({"backend": backend, "name": name, **fields})[:16]
        return CacheEntry(self.root / backend / f"{name}-{digest}", dict(fields))

    def get_or_build(
        self,
        entry: CacheEntry,
        build: Callable[[Path], None],
        *,
        rebuild: bool = False,
    ) -> tuple[CacheEntry, bool]:
        """Return ``(entry, built)``: build it with ``build(tmp_dir)`` unless it is ready.

        ``build`` writes the artifact's files into the directory it is given; that directory
        becomes the entry only if ``build`` returns normally.
        """
        if entry.ready and not rebuild:
            return entry, False
        entry.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.path.name}.", dir=entry.path.parent))
        try:
            build(tmp)
            (tmp / KEY_FILE).write_text(json.dumps(dict(entry.fields), indent=2, default=str))
            if entry.path.exists():
                shutil.rmtree(entry.path)
            os.replace(tmp, entry.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return entry, True

    def entries(self) -> Iterator[CacheEntry]:
        """Every complete entry, sorted by path."""
        if not self.root.is_dir():
            return
        for key_file in sorted(self.root.glob(f"*/*/{KEY_FILE}")):
            yield CacheEntry(key_file.parent, json.loads(key_file.read_text()))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
