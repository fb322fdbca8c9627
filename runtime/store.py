"""A crash-safe directory of KV snapshots: one sub-directory per session.

Layout::

    <root>/.lock                       single-writer lock (flock; dropped by the kernel on crash)
    <root>/<session>/000000000042.kvsnap  snapshots, numbered by generation (newest = highest)
    <root>/<session>/quarantine/       damaged files moved aside by latest_valid, with a .reason

Session and quarantine directories are the store's own: never followed when they are symlinks
(writing into one, or deleting it, raises :class:`runtime.errors.UnsafePathError`, except that
:meth:`SnapshotStore.delete_session` removes a symlinked session entry itself, never its
target), and always mode 0700; every file is 0600.

A new snapshot is always written under a new name (temp file, fsync, rename, fsync of the
directory), so the last good snapshot is never replaced; old generations are deleted only
after the new one is durable, keeping the newest ``keep`` per session.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from runtime import snapshot as snapshot_mod
from runtime.errors import (
    ArgumentError,
    InvalidNameError,
    StoreError,
    StoreWriteError,
    UnsafePathError,
)
from runtime.fsutil import (
    TMP_PREFIX,
    DirLock,
    atomic_write_bytes,
    ensure_dir,
    fsync_dir,
    private_dir,
    remove_stale_temps,
    warn_if_exposed,
)
from runtime.snapshot import CorruptSnapshot, Snapshot, UnsupportedVersion

__all__ = [
    "DEFAULT_KEEP",
    "QUARANTINE_DIR",
    "SnapshotStore",
    "StoreError",
    "StoreWriteError",
    "StoredSnapshot",
    "validate_session_id",
]

logger = logging.getLogger(__name__)

#: Snapshots kept per session unless the store is opened with another ``keep``.
DEFAULT_KEEP = 3
#: Quarantined files kept per session (newest first); each is a whole KV snapshot.
QUARANTINE_KEEP = 4
#: Name of the per-session directory that receives damaged files.
QUARANTINE_DIR = "quarantine"

_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FILE_RE = re.compile(r"(\d{12})" + re.escape(snapshot_mod.FILE_SUFFIX))


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is safe as a directory name, else raise InvalidNameError.

    Allowed: 1-128 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit, so no
    path separators, no ``..``, no hidden names and nothing the store uses itself.
    """
    if not isinstance(session_id, str) or not _SESSION_RE.fullmatch(session_id):
        raise InvalidNameError(
            f"invalid session id {session_id!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    if ".." in session_id or session_id == QUARANTINE_DIR:
        raise InvalidNameError(f"invalid session id {session_id!r}: reserved or path-like")
    return session_id


@dataclass(frozen=True)
class StoredSnapshot:
    """A verified snapshot and where it lives."""

    path: Path
    generation: int
    snapshot: Snapshot


class SnapshotStore:
    """Snapshots per session under ``root``, written atomically, with bounded retention.

    Args:
        root: the store directory (created with mode 0700 if missing).
        keep: how many snapshots to keep per session (at least 1).
        readonly: open without taking the writer lock; writing, pruning and quarantining are
            then refused (``latest_valid`` still skips damaged files, but leaves them).

    A writable store holds ``<root>/.lock`` until :meth:`close`; a second writer gets
    :class:`runtime.errors.LockedError`. Opening a writable store removes temp files left by
    a writer that died mid-write.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, keep: int = DEFAULT_KEEP, readonly: bool = False
    ) -> None:
        if keep < 1:
            raise ArgumentError("keep must be at least 1")
        self.root = Path(root)
        self.keep = keep
        self.readonly = readonly
        self._lock: DirLock | None = None
        if not readonly:
            self._lock = DirLock(ensure_dir(self.root)).acquire()
            warn_if_exposed(self.root)
            self._remove_temps()

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the writer lock; safe to call twice."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"snapshot store {self.root} was opened read-only")
        if self._lock is None:
            raise StoreError(f"snapshot store {self.root} is closed")

    def _remove_temps(self) -> None:
        removed = remove_stale_temps(self.root)
        for session in self.sessions():
            removed += remove_stale_temps(self.root / session)
        if removed:
            logger.warning("removed %d temp file(s) left by an interrupted write", removed)

    # -- listing ----------------------------------------------------------------------------

    def session_dir(self, session_id: str) -> Path:
        """The directory of ``session_id`` (validated; not created)."""
        return self.root / validate_session_id(session_id)

    def _own_dir(self, session_id: str) -> Path:
        """:meth:`session_dir`, refusing a symlink there (:class:`UnsafePathError`)."""
        directory = self.session_dir(session_id)
        if directory.is_symlink():
            raise UnsafePathError(
                errno.ELOOP,
                f"snapshot directory of session {session_id!r} is a symlink; the store never "
                "follows one (remove it)",
                str(directory),
            )
        return directory

    def sessions(self) -> list[str]:
        """Session ids that have a directory in the store, sorted."""
        if not self.root.is_dir():
            return []
        out = []
        for child in self.root.iterdir():
            if child.is_symlink():
                continue  # not ours: never followed
            if child.is_dir() and _SESSION_RE.fullmatch(child.name) and ".." not in child.name:
                out.append(child.name)
        return sorted(out)

    def generations(self, session_id: str) -> list[tuple[int, Path]]:
        """``(generation, path)`` of every snapshot file of the session, newest first."""
        directory = self._own_dir(session_id)
        if not directory.is_dir():
            return []
        found = []
        for child in directory.iterdir():
            match = _FILE_RE.fullmatch(child.name)
            if match and not child.is_symlink() and child.is_file():
                found.append((int(match.group(1)), child))
        return sorted(found, reverse=True)

    # -- writing ----------------------------------------------------------------------------

    def save(self, session_id: str, snapshot: Snapshot) -> Path:
        """Write ``snapshot`` as the session's newest generation and prune old ones.

        The file appears under its final name only once it is complete and fsynced; on any
        error (:class:`StoreWriteError`, e.g. ENOSPC) the temp file is removed and the existing
        snapshots are untouched.
        """
        self._require_writable()
        validate_session_id(session_id)
        own = snapshot.header.session_id
        if own and own != session_id:
            raise StoreError(f"snapshot belongs to session {own!r}, not {session_id!r}")
        directory = private_dir(self._own_dir(session_id))
        remove_stale_temps(directory)
        existing = self.generations(session_id)
        generation = existing[0][0] + 1 if existing else 1
        path = directory / f"{generation:012d}{snapshot_mod.FILE_SUFFIX}"
        try:
            snapshot_mod.write(path, snapshot)
        except OSError as exc:
            raise StoreWriteError(
                exc.errno or 0,
                f"could not write snapshot {path.name} of session {session_id!r}: "
                f"{exc.strerror or exc}; earlier snapshots are untouched",
            ) from exc
        logger.debug("saved %s (%d bytes)", path, snapshot.header.file_size)
        self.prune(session_id)
        return path

    def prune(self, session_id: str) -> list[Path]:
        """Delete all but the newest ``keep`` snapshots of the session; return what went."""
        self._require_writable()
        removed = []
        for _, path in self.generations(session_id)[self.keep :]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        if removed:
            fsync_dir(self.session_dir(session_id))
        return removed

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a damaged file to the session's quarantine directory, with a ``.reason`` file."""
        self._require_writable()
        qdir = private_dir(path.parent / QUARANTINE_DIR)
        target = qdir / f"{path.name}.{time.time_ns()}"
        os.replace(path, target)
        atomic_write_bytes(target.with_name(target.name + ".reason"), f"{reason}\n".encode())
        fsync_dir(path.parent)
        self._prune_quarantine(qdir)
        return target

    @staticmethod
    def _prune_quarantine(qdir: Path) -> None:
        """Keep the newest :data:`QUARANTINE_KEEP` quarantined files: disk stays bounded."""
        # Quarantined names end in ".<time_ns>"; zero-padding makes the string order numeric.
        kept = sorted(
            (p for p in qdir.iterdir() if not p.name.endswith(".reason")),
            key=lambda p: p.name.rsplit(".", 1)[-1].zfill(24),
            reverse=True,
        )
        for old in kept[QUARANTINE_KEEP:]:
            for victim in (old, old.with_name(old.name + ".reason")):
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()

    def delete_session(self, session_id: str) -> int:
        """Delete every snapshot (and quarantined file) of the session; returns files removed.

        Nothing is followed: a symlink in place of the session directory is removed itself
        (with a warning) and its target is left alone; inside, the walk goes by directory file
        descriptors with ``O_NOFOLLOW``, so a link (or a directory swapped for one) there is
        unlinked, never entered.
        """
        self._require_writable()
        directory = self.session_dir(session_id)
        if directory.is_symlink():
            logger.warning(
                "snapshot directory %s is a symlink: removing the link only, not its target",
                directory,
            )
            directory.unlink()
            fsync_dir(self.root)
            return 0
        if not directory.is_dir():
            return 0
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            removed = _remove_tree(root_fd, directory.name)
            os.fsync(root_fd)
        finally:
            os.close(root_fd)
        return removed

    # -- reading ----------------------------------------------------------------------------

    def latest_valid(self, session_id: str, *, deep: bool = False) -> StoredSnapshot | None:
        """The newest snapshot of the session that passes every check, or None.

        Damaged files are logged with the field that failed and, in a writable store, moved to
        quarantine; the search goes on with older generations. A file of an unknown (newer)
        format version is skipped but left in place. ``deep=True`` also decompresses the
        payload (zstd content checksums) before accepting a file.
        """
        for generation, path in self.generations(session_id):
            try:
                snap = snapshot_mod.read(path)
                if deep:
                    snapshot_mod.decode(snap)
            except UnsupportedVersion as exc:
                logger.warning("skipping %s: %s", path, exc)
                continue
            except CorruptSnapshot as exc:
                # the message already names the file and the field that failed
                logger.warning("skipping damaged snapshot: %s", exc)
                if not self.readonly and self._lock is not None:
                    moved = self.quarantine(path, f"{exc.field}: {exc}")
                    logger.warning("moved %s to %s", path.name, moved.parent)
                continue
            except FileNotFoundError:
                continue
            return StoredSnapshot(path=path, generation=generation, snapshot=snap)
        return None

    def temp_files(self, session_id: str) -> list[Path]:
        """Temp files in the session directory (left by an interrupted write)."""
        directory = self.session_dir(session_id)
        return sorted(directory.glob(f"{TMP_PREFIX}*")) if directory.is_dir() else []


def _remove_tree(parent_fd: int, name: str) -> int:
    """Remove directory ``name`` under ``parent_fd`` and everything in it, following nothing.

    Returns how many non-directory entries were removed.
    """
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    removed = 0
    try:
        with os.scandir(fd) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                removed += _remove_tree(fd, entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
                removed += 1
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)
    return removed
