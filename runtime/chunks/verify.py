"""Checking a chunk store (every manifest, chunk and reference) and its figures."""

from __future__ import annotations

import os

from runtime import snapshot as snapshot_mod
from runtime.chunks.base import _ChunkStoreState
from runtime.chunks.pending import VerifyReport
from runtime.errors import CorruptManifestError
from runtime.snapshot import CorruptSnapshot, UnsupportedVersion


class _VerifyMixin(_ChunkStoreState):
    """:meth:`verify` and :meth:`stats` of :class:`runtime.chunks.ChunkStore` (both work on a
    read-only store)."""

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check every manifest, every chunk and every reference (works read-only).

        ``deep`` decompresses every chunk (zstd checksums) rather than checking headers and
        digests only. Orphans (chunks no manifest names) are listed, not treated as damage.
        """
        report = VerifyReport()
        referenced: dict[str, list[str]] = {}
        for session in self.sessions():
            for _, path in self._generations(session):
                report.manifests += 1
                try:
                    man = self._read_manifest(path)
                except (CorruptManifestError, OSError) as exc:
                    report.damaged_manifests.append((os.fspath(path), str(exc)))
                    continue
                for key in man.keys:
                    referenced.setdefault(key, []).append(os.fspath(path))
        on_disk: set[str] = set()
        for key, path in self._iter_chunk_files():
            report.chunks += 1
            on_disk.add(key)
            try:
                header = snapshot_mod.verify(path) if deep else snapshot_mod.read(path).header
            except (CorruptSnapshot, UnsupportedVersion, OSError) as exc:
                report.damaged_chunks.append((key, str(exc)))
                continue
            if header.snapshot_id != key:
                report.damaged_chunks.append((key, f"file holds chunk {header.snapshot_id!r}"))
        for key, users in sorted(referenced.items()):
            if key not in on_disk:
                report.missing.extend((user, key) for user in users)
        report.orphans = sorted(on_disk - set(referenced))
        return report

    def stats(self) -> dict[str, int]:
        """Bytes on disk, logical bytes of every session's newest manifest, dedup savings.

        ``chunk_bytes``: chunk files on disk; ``logical_bytes``: the sum over sessions of
        their newest manifest's chunk file sizes (what separate snapshots would store);
        ``dedup_saved_bytes``: the newest manifests' bytes that shared chunks save;
        ``written_bytes``/``written_files``/``gc_files``: counters since open.
        """
        with self._lock:
            chunk_bytes = sum(size for _, size in self._chunks.values())
            sizes = {k: size for k, (_, size) in self._chunks.items()}
            newest = [gens[max(gens)] for gens in self._refs.values() if gens]
            counters = dict(self._counters)
            n_chunks = len(self._chunks)
        logical = sum(sizes.get(k, 0) for keys in newest for k in keys)
        unique = set().union(*newest) if newest else set()
        unique_bytes = sum(sizes.get(k, 0) for k in unique)
        return {
            "chunks": n_chunks,
            "chunk_bytes": chunk_bytes,
            "sessions": len(newest),
            "logical_bytes": logical,
            "dedup_saved_bytes": logical - unique_bytes,
            **counters,
        }
