"""The local storage: :class:`LocalBlobStore` (chunks and manifests in a directory) and
:class:`LocalJournals` (each session's journal files in ``journals/``)."""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from runtime.errors import ArgumentError, ClosedError, ReadOnlyError
from runtime.fsutil import (
    DirLock,
    atomic_write_all,
    atomic_write_bytes,
    ensure_dir,
    fsync_dir,
    own_subdirs,
    private_dir,
    remove_stale_temps,
    remove_tree,
)
from runtime.journal import Journal, journal_files_of, journal_sessions
from runtime.layout import JOURNAL_DIR, QUARANTINE_DIR, journal_path, validate_session_id
from runtime.snapshot.format import FILE_SUFFIX

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_SUFFIX", "MANIFEST_SUFFIX", "LocalBlobStore", "LocalJournals"]


#: Suffix of chunk files (the snapshot format's) and of manifest files.
CHUNK_SUFFIX = FILE_SUFFIX
MANIFEST_SUFFIX = ".kvman"
#: A chunk key: 32 hex digits (BLAKE2b-128, runtime.chunks.keys); nothing else is a blob name.
_KEY_RE = re.compile(r"[0-9a-f]{32}")
_GEN_RE = re.compile(r"(\d{12})" + re.escape(MANIFEST_SUFFIX))


class LocalBlobStore:
    """A :class:`runtime.storage.BlobStore` in a local directory.

    Layout::

        <root>/.lock                                   single-writer lock (flock)
        <root>/chunks/<key[:2]>/<key>.kvsnap           blobs
        <root>/manifests/<session>/<generation>.kvman  manifests
        <root>/manifests/<session>/quarantine/         damaged manifests moved aside
        <root>/quarantine/                             damaged blobs moved aside

    Every file is written to a temp file in its directory, fsynced, renamed into place and the
    directory fsynced (:func:`runtime.fsutil.atomic_writer`; for several chunks
    :func:`runtime.fsutil.atomic_write_all`), so :meth:`put_all` and
    :meth:`switch_manifest` are durable on return. The store's own directories are never
    symlinks and always 0700; nothing is ever followed through a symlink (one in place of a
    session's directory is removed itself, never its target); every file is 0600.

    Args:
        root: the directory (created 0700).
        readonly: no lock, no writing, no temp-file cleanup.
        lock: take ``<root>/.lock`` (False when the caller holds a lock covering it).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True
    ) -> None:
        self.root = Path(root)
        self.readonly = readonly
        self.fetch_ahead = 0  # reads are memory maps
        self._closed = False
        self._dirlock: DirLock | None = None
        if not readonly:
            ensure_dir(self.root)
            if lock:
                self._dirlock = DirLock(self.root).acquire()
            self._remove_temps()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock; safe to call twice."""
        self._closed = True
        if self._dirlock is not None:
            self._dirlock.release()
            self._dirlock = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _require_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"chunk store {self.root} was opened read-only")
        if self._closed:
            raise ClosedError(f"chunk store {self.root} is closed")

    def _remove_temps(self) -> None:
        removed = 0
        for directory in (*own_subdirs(self.chunk_dir), *own_subdirs(self.manifest_dir)):
            removed += remove_stale_temps(directory)
        if removed:
            logger.warning("removed %d temp file(s) left by an interrupted write", removed)

    # -- layout ---------------------------------------------------------------------------------

    @property
    def chunk_dir(self) -> Path:
        """``<root>/chunks``."""
        return self.root / "chunks"

    @property
    def manifest_dir(self) -> Path:
        """``<root>/manifests``."""
        return self.root / "manifests"

    def path(self, key: str) -> Path:
        """Where blob ``key`` lives."""
        if not _KEY_RE.fullmatch(key):
            raise ArgumentError(f"not a chunk key: {key!r}")
        return self.chunk_dir / key[:2] / f"{key}{CHUNK_SUFFIX}"

    def manifest_path(self, session_id: str, generation: int) -> Path:
        """Where manifest ``generation`` of the session lives."""
        return self.session_dir(session_id) / f"{generation:012d}{MANIFEST_SUFFIX}"

    def session_dir(self, session_id: str) -> Path:
        """The session's manifest directory (validated; not created)."""
        return self.manifest_dir / validate_session_id(session_id)

    # -- blobs ----------------------------------------------------------------------------------

    def put_all(self, blobs: Sequence[tuple[str, Callable[[BinaryIO], int]]]) -> list[int]:
        """Write each blob not there yet atomically and durably (one
        :func:`runtime.fsutil.atomic_write_all`: each file fsynced while the next is
        written); return the stored sizes."""
        self._require_writable()
        sizes: dict[int, int] = {}
        jobs = []
        for i, (key, write) in enumerate(blobs):
            path = self.path(key)
            try:
                sizes[i] = os.stat(path).st_size
                continue
            except FileNotFoundError:
                pass
            private_dir(path.parent)
            jobs.append((i, path, write))
        written = atomic_write_all([(path, write) for _, path, write in jobs])
        sizes.update((i, n) for (i, _, _), n in zip(jobs, written, strict=True))
        return [sizes[i] for i in range(len(blobs))]

    def get(self, key: str) -> memoryview:
        """A read-only map of blob ``key`` (not copied; valid while the view lives). Files
        here are never changed in place (they are replaced by rename), so the map stays
        consistent."""
        path = self.path(key)
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:  # mmap cannot map an empty file
                return memoryview(b"")
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return memoryview(mm)

    def has(self, key: str) -> bool:
        """Whether blob ``key`` is stored."""
        return self.path(key).is_file()

    def describe(self, key: str) -> str:
        """The blob's path."""
        return os.fspath(self.path(key))

    def describe_manifest(self, session_id: str, generation: int) -> str:
        """The manifest's path."""
        return os.fspath(self.manifest_path(session_id, generation))

    def list_keys(self) -> Iterator[str]:
        """Every stored blob key (temp files and strays skipped)."""
        for sub in own_subdirs(self.chunk_dir):
            for p in sub.iterdir():
                key = p.name[: -len(CHUNK_SUFFIX)] if p.name.endswith(CHUNK_SUFFIX) else ""
                if _KEY_RE.fullmatch(key) and not p.is_symlink() and p.is_file():
                    yield key

    def delete(self, key: str) -> None:
        """Delete blob ``key`` (its directory is fsynced by :meth:`sync_deletes`)."""
        self._require_writable()
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def sync_deletes(self, keys: Collection[str]) -> None:
        """Make the deletes of ``keys`` durable (one fsync per directory)."""
        for directory in {self.path(key).parent for key in keys}:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(directory)

    def quarantine(self, key: str, reason: str) -> None:
        """Move blob ``key`` to ``<root>/quarantine`` with a ``.reason`` file."""
        if self.readonly or self._closed:
            return
        path = self.path(key)
        qdir = private_dir(self.root / QUARANTINE_DIR)
        try:
            os.replace(path, qdir / f"{path.name}.{time.time_ns()}")
        except FileNotFoundError:
            return
        atomic_write_bytes(qdir / f"{key}.reason", f"{reason}\n".encode())
        fsync_dir(path.parent)

    # -- manifests ------------------------------------------------------------------------------

    def sessions(self) -> list[str]:
        """Session ids with a manifest directory (symlinks are not ours: never listed)."""
        out = []
        for p in own_subdirs(self.manifest_dir):
            try:
                out.append(validate_session_id(p.name))
            except ValueError:
                continue
        return out

    def generations(self, session_id: str) -> list[int]:
        """The session's manifest generations, newest first (nothing through a symlink)."""
        directory = self.session_dir(session_id)
        if directory.is_symlink() or not directory.is_dir():
            return []
        found = []
        for child in directory.iterdir():
            match = _GEN_RE.fullmatch(child.name)
            if match and not child.is_symlink() and child.is_file():
                found.append(int(match.group(1)))
        return sorted(found, reverse=True)

    def get_manifest(self, session_id: str, generation: int, max_size: int) -> bytes:
        """The manifest's bytes, its size checked against ``max_size`` before reading."""
        with open(self.manifest_path(session_id, generation), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_size:
                raise ValueError(f"{size} bytes is too large")
            return f.read(size)

    def switch_manifest(self, session_id: str, generation: int, data: bytes) -> None:
        """Write the manifest under its new generation's name (temp, fsync, rename, fsync of
        the directory): the switch is one rename."""
        self._require_writable()
        private_dir(self.session_dir(session_id))
        atomic_write_bytes(self.manifest_path(session_id, generation), data)

    def delete_manifest(self, session_id: str, generation: int) -> None:
        """Delete one manifest and fsync its directory."""
        self._require_writable()
        path = self.manifest_path(session_id, generation)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def quarantine_manifest(self, session_id: str, generation: int, reason: str) -> None:
        """Move the manifest to the session's ``quarantine/`` with a ``.reason`` file."""
        if self.readonly or self._closed:
            return
        path = self.manifest_path(session_id, generation)
        qdir = private_dir(path.parent / QUARANTINE_DIR)
        target = qdir / f"{path.name}.{time.time_ns()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        atomic_write_bytes(target.with_name(target.name + ".reason"), f"{reason}\n".encode())
        fsync_dir(path.parent)

    def delete_session(self, session_id: str) -> None:
        """Remove the session's manifest directory, following nothing."""
        self._require_writable()
        try:
            remove_tree(self.session_dir(session_id))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


class LocalJournals:
    """A :class:`runtime.storage.JournalStore` in a data directory: ``journals/<id>.log``
    and its segments (:class:`runtime.journal.Journal`), one writer per file (flock).

    Args:
        root: the data directory (the journals are under ``root/journals``).
        fsync: fsync every append (off only for tests).
        segment_entries: entries per sealed segment.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool, segment_entries: int) -> None:
        self.root = Path(root)
        self._fsync = fsync
        self._segment_entries = segment_entries
        self.directory = private_dir(ensure_dir(self.root / JOURNAL_DIR))

    def open(self, session_id: str, *, readonly: bool = False) -> Journal:
        """The session's journal file (``readonly``: without the writer's lock)."""
        path = journal_path(self.root, session_id)
        if readonly:
            return Journal(path, readonly=True)
        return Journal(path, fsync=self._fsync, segment_entries=self._segment_entries)

    def _files(self, session_ids: Sequence[str]) -> dict[str, list[Path]]:
        names = {journal_path(self.root, s).name: s for s in session_ids}
        found = journal_files_of(self.directory, list(names))
        return {names[name]: files for name, files in found.items()}

    def exists(self, session_id: str) -> bool:
        """Whether the session has journal files."""
        return bool(self._files([session_id]))

    def sessions(self) -> list[str]:
        """Every session with a journal file, sorted."""
        return journal_sessions(self.directory)

    def usage(self, session_ids: Sequence[str]) -> dict[str, tuple[int, float]]:
        """Bytes and newest modification time of each session's journal files (one
        listing)."""
        out: dict[str, tuple[int, float]] = {}
        for sid, files in self._files(session_ids).items():
            size, last = 0, 0.0
            for f in files:
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    st = f.stat()
                    size, last = size + st.st_size, max(last, st.st_mtime)
            out[sid] = (size, last)
        return out

    def delete(self, session_id: str) -> None:
        """Delete the session's journal files (the active file, segments, rescue files)."""
        Journal.remove_files(journal_path(self.root, session_id))

    def total_bytes(self) -> int:
        """Bytes under ``journals/``."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def describe(self) -> str:
        """The journals directory."""
        return str(self.directory)

    def close(self) -> None:
        """Nothing to release (each journal holds its own lock)."""
