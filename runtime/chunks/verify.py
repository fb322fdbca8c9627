"""Checking a chunk store: every manifest, every chunk and every reference (works on a
read-only store)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from runtime import snapshot as snapshot_mod
from runtime.chunks.manifest import Manifest
from runtime.chunks.pending import VerifyReport
from runtime.errors import CorruptSnapshotError, UnsupportedVersionError

if TYPE_CHECKING:
    from runtime.storage import BlobStore


def verify_store(
    blobs: BlobStore,
    read_manifest: Callable[[str, int], Manifest],
    *,
    deep: bool = True,
) -> VerifyReport:
    """Check every manifest (``read_manifest(session, generation)``), every chunk and every
    reference.

    ``deep`` also decodes every chunk (zstd's checks; a stored chunk has only its digests),
    rather than checking headers and digests only.
    Orphans (chunks no manifest names) are listed, not treated as damage.
    """
    report = VerifyReport()
    referenced: dict[str, list[str]] = {}
    for session in blobs.sessions():
        for generation in blobs.generations(session):
            report.manifests += 1
            name = blobs.describe_manifest(session, generation)
            try:
                man = read_manifest(session, generation)
            except (CorruptSnapshotError, OSError) as exc:
                report.damaged_manifests.append((name, str(exc)))
                continue
            for key in man.keys:
                referenced.setdefault(key, []).append(name)
    on_disk: set[str] = set()
    for key in blobs.list_keys():
        report.chunks += 1
        on_disk.add(key)
        source = blobs.describe(key)
        try:
            snap = snapshot_mod.Snapshot.from_buffer(blobs.get(key), source=source)
            header = snapshot_mod.verify_snapshot(snap, source=source) if deep else snap.header
        except (CorruptSnapshotError, UnsupportedVersionError, OSError) as exc:
            report.damaged_chunks.append((key, str(exc)))
            continue
        if header.snapshot_id != key:
            report.damaged_chunks.append((key, f"file holds chunk {header.snapshot_id!r}"))
    for key, users in sorted(referenced.items()):
        if key not in on_disk:
            report.missing.extend((user, key) for user in users)
    report.orphans = sorted(on_disk - set(referenced))
    return report
