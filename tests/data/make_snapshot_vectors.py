"""Write the known-answer snapshot files of ``tests/data`` (format version 1).

Three small snapshots of the same synthetic f16-like blob, one per filter (planes + zstd 1,
the default; shuffle + zstd 3; no filter + zstd -1 without content checksums, the chunk
codec), and ``snapshot-v1.json`` with each file's sha256 and the sha256 of the blob it must
decode to. ``tests/runtime/test_snapshot_decode.py`` reads them back, so a reader change that
stops reading version 1 files fails there. The planes and shuffle files were written with the
encoder as of commit 9a896fd (before the ``checksum`` option existed), which produces the same
bytes as the current one for those codecs; run from the repository root::

    .venv/bin/python tests/data/make_snapshot_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from runtime import snapshot as S  # noqa: E402

IDENTITY = S.CacheIdentity(
    build_number=11312,
    model_fingerprint="ab" * 32,
    n_layer=2,
    n_embd=64,
    n_head=4,
    n_head_kv=2,
    n_seq_max=4,
    type_k="f16",
    type_v="f16",
    flash_attn=False,
    kv_unified=True,
)

CODECS = {
    "planes-zstd1": S.Codec(level=1, chunk_size=16 << 10),
    "shuffle-zstd3": S.Codec(level=3, filter=S.Filter.SHUFFLE2, chunk_size=16 << 10),
    "none-zstd-1-nock": S.Codec(
        level=-1, filter=S.Filter.NONE, chunk_size=16 << 10, checksum=False
    ),
}


def blob() -> np.ndarray:
    """40,001 bytes: f16 normals, then an odd trailing byte."""
    rng = np.random.default_rng(2026)
    words = rng.standard_normal(20_000).astype(np.float16).view(np.uint8)
    return np.concatenate([words, np.array([7], dtype=np.uint8)])


def main() -> int:
    """Write the files and the JSON index next to this script."""
    raw = blob()
    index: dict[str, dict[str, str]] = {}
    for name, codec in CODECS.items():
        snap = S.encode(
            raw,
            identity=IDENTITY,
            tokens=list(range(1, 33)),
            seq_id=0,
            pos_min=0,
            pos_max=31,
            n_ctx=512,
            session_id="kat",
            snapshot_id=f"kat-{name}",
            created_ns=1_764_633_600_000_000_000,
            codec=codec,
        )
        data = snap.to_bytes()
        (HERE / f"snapshot-v1-{name}.kvsnap").write_bytes(data)
        index[name] = {
            "file_sha256": hashlib.sha256(data).hexdigest(),
            "raw_sha256": hashlib.sha256(raw.tobytes()).hexdigest(),
        }
    (HERE / "snapshot-v1.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
