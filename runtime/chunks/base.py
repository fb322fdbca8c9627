"""What every part of a chunk store shares: the state it keeps, the directory layout, and
reading a manifest file."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from runtime import snapshot as snapshot_mod
from runtime.chunks.keys import _KEY_RE
from runtime.chunks.manifest import _GEN_RE, _MAN_HEADER_LEN, MAX_MANIFEST_BODY, Manifest
from runtime.errors import ChunkStoreError, CorruptManifestError
from runtime.fsutil import DirLock
from runtime.layout import validate_session_id
from runtime.snapshot import Codec


class _ChunkStoreState:
    """The state :class:`runtime.chunks.ChunkStore` keeps, shared by its parts (capture and
    commit, restore, verify), and the layout of its directory."""

    root: Path
    chunk_tokens: int
    codec: Codec
    keep: int
    dedup: Literal["global", "session"]
    readonly: bool
    threads: int
    _lock: threading.RLock
    _commit_lock: threading.Lock
    _dirlock: DirLock | None
    _closed: bool
    #: key -> (raw_size, file_size) of every chunk file on disk
    _chunks: dict[str, tuple[int, int]]
    #: session -> {generation: keys} of every manifest on disk
    _refs: dict[str, dict[int, frozenset[str]]]
    _pins: dict[int, frozenset[str]]
    _next_pin: int
    _counters: dict[str, int]
    _pool: concurrent.futures.ThreadPoolExecutor | None

    def manifests(self, session_id: str) -> list[Manifest]:
        raise NotImplementedError

    def _quarantine_chunk(self, key: str, reason: str) -> None:
        raise NotImplementedError

    def _require_writable(self) -> None:
        if self.readonly:
            raise ChunkStoreError(f"chunk store {self.root} was opened read-only")
        if self._closed:
            raise ChunkStoreError(f"chunk store {self.root} is closed")

    # -- layout -----------------------------------------------------------------------------

    @property
    def chunk_dir(self) -> Path:
        """``<root>/chunks``."""
        return self.root / "chunks"

    @property
    def manifest_dir(self) -> Path:
        """``<root>/manifests``."""
        return self.root / "manifests"

    def chunk_path(self, key: str) -> Path:
        """Where chunk ``key`` lives."""
        return self.chunk_dir / key[:2] / f"{key}{snapshot_mod.FILE_SUFFIX}"

    def _session_manifest_dir(self, session_id: str) -> Path:
        return self.manifest_dir / validate_session_id(session_id)

    def _chunk_subdirs(self) -> list[Path]:
        if not self.chunk_dir.is_dir():
            return []
        return sorted(p for p in self.chunk_dir.iterdir() if p.is_dir())

    def _manifest_subdirs(self) -> list[Path]:
        if not self.manifest_dir.is_dir():
            return []
        return sorted(p for p in self.manifest_dir.iterdir() if p.is_dir())

    def _iter_chunk_files(self) -> Iterable[tuple[str, Path]]:
        suffix = snapshot_mod.FILE_SUFFIX
        for sub in self._chunk_subdirs():
            for p in sub.iterdir():
                key = p.name[: -len(suffix)] if p.name.endswith(suffix) else ""
                if _KEY_RE.fullmatch(key) and p.is_file():
                    yield key, p

    def sessions(self) -> list[str]:
        """Session ids that have a manifest directory, sorted."""
        out = []
        for p in self._manifest_subdirs():
            try:
                out.append(validate_session_id(p.name))
            except ValueError:
                continue
        return out

    def _generations(self, session_id: str) -> list[tuple[int, Path]]:
        directory = self._session_manifest_dir(session_id)
        if not directory.is_dir():
            return []
        found = []
        for child in directory.iterdir():
            match = _GEN_RE.fullmatch(child.name)
            if match and child.is_file():
                found.append((int(match.group(1)), child))
        return sorted(found, reverse=True)

    @staticmethod
    def _read_manifest(path: Path) -> Manifest:
        source = os.fspath(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAN_HEADER_LEN + MAX_MANIFEST_BODY:
                raise CorruptManifestError("file_size", f"{size} bytes is too large", source=source)
            data = f.read(size)
        man = Manifest.from_bytes(data, source=source)
        expected = _GEN_RE.fullmatch(path.name)
        if expected is None or int(expected.group(1)) != man.generation:
            raise CorruptManifestError("generation", "file name and body disagree", source=source)
        if man.session_id != path.parent.name:
            raise CorruptManifestError("session_id", "directory and body disagree", source=source)
        return man
