"""The mapped read path (``read(mapped=True)``, ``restore_file``): same checks, same bytes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import snapshot as S

llamaffi = pytest.importorskip("llamaffi")


@pytest.fixture(scope="module")
def ctx(model: Any) -> Iterator[Any]:
    with model.context(n_ctx=512, n_batch=256, n_seq_max=2, n_threads=2) as c:
        yield c


@pytest.fixture()
def saved(ctx: Any, model: Any, tmp_path: Path) -> tuple[Path, list[int], np.ndarray]:
    tokens = list(model.tokenize("The quick brown fox jumps over the lazy dog. " * 6))
    ctx.memory.clear()
    ctx.decode(tokens, seq_id=0, logits="none")
    path = tmp_path / "s.kvsnap"
    S.write(path, S.capture(ctx, 0, tokens, codec=S.Codec(chunk_size=4096)))
    blob = ctx.seq_state_get(0)
    ctx.memory.seq_rm(0)
    return path, tokens, blob


def test_restore_file_round_trip(ctx: Any, saved: tuple[Path, list[int], np.ndarray]) -> None:
    path, tokens, blob = saved
    header = S.restore_file(ctx, path, 0)
    assert header.tokens == tuple(tokens)
    assert ctx.seq_state_get(0).tobytes() == blob.tobytes()
    mapped, copied = S.read(path, mapped=True), S.read(path)
    assert mapped.header == copied.header
    assert [bytes(c) for c in mapped.chunks] == [bytes(c) for c in copied.chunks]


@pytest.mark.parametrize("where", [0.2, 0.5, 0.99])
def test_mapped_read_detects_flips(saved: tuple[Path, list[int], np.ndarray], where: float) -> None:
    path = saved[0]
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(S.CorruptSnapshotError):
        S.read(path, mapped=True)


@pytest.mark.parametrize("size", [0, 10, 300, -1])
def test_mapped_read_detects_truncation(
    saved: tuple[Path, list[int], np.ndarray], size: int
) -> None:
    path = saved[0]
    data = path.read_bytes()
    path.write_bytes(data[:size] if size >= 0 else data + b"\0")
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.read(path, mapped=True)
    assert info.value.field in {"file_size", "header_len", "magic"}


def test_failed_restore_file_leaves_seq_empty(
    ctx: Any, saved: tuple[Path, list[int], np.ndarray]
) -> None:
    path = saved[0]
    ctx.decode([5, 6, 7], seq_id=1, logits="none")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(S.CorruptSnapshotError):
        S.restore_file(ctx, path, 1)
    assert ctx.memory.pos_max(1) == 2  # refused before llama.cpp saw a byte: untouched
    ctx.memory.seq_rm(1)
