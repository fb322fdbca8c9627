"""Snapshots of real llama.cpp state: round trips, corruption, mismatches (needs libllama)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import snapshot as S

llamaffi = pytest.importorskip("llamaffi")

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
CTX_ARGS: dict[str, Any] = {"n_ctx": 256, "n_batch": 256, "n_seq_max": 4, "n_threads": 2}


@pytest.fixture(scope="module")
def other_model(other_model_path: Path) -> Iterator[Any]:
    with llamaffi.Model(other_model_path) as m:
        yield m


@pytest.fixture(scope="module")
def tokens(model: Any) -> list[int]:
    toks = list(model.tokenize(PROMPT))
    assert len(toks) > 8
    return toks


@dataclasses.dataclass
class Source:
    """A prefilled context, its snapshot of seq 0 (all tokens but the last) and the logits."""

    ctx: Any
    snap: S.Snapshot
    blob: bytes
    logits: np.ndarray


def _prefill(ctx: Any, tokens: list[int], seq_id: int = 0) -> None:
    ctx.decode(tokens[:-1], seq_id=seq_id)


@pytest.fixture(scope="module")
def source(model: Any, tokens: list[int]) -> Iterator[Source]:
    with model.context(**CTX_ARGS) as ctx:
        _prefill(ctx, tokens)
        snap = S.capture(ctx, 0, tokens[:-1], session_id="s1")
        ctx.decode(tokens[-1:], seq_id=0)
        logits = ctx.logits()
        ctx.memory.seq_rm(0, -1, -1)
        yield Source(ctx, snap, snap.to_bytes(), logits)


@pytest.fixture(scope="module")
def victim(model: Any) -> Iterator[Any]:
    """One context shared by the corruption tests (they must leave it usable)."""
    with model.context(**CTX_ARGS) as ctx:
        yield ctx


def _next_logits(ctx: Any, tokens: list[int], seq_id: int) -> np.ndarray:
    ctx.decode(tokens[-1:], seq_id=seq_id)
    out: np.ndarray = ctx.logits()
    return out


def _is_empty(ctx: Any, seq_id: int) -> bool:
    return bool(ctx.memory.pos_max(seq_id) == -1 and ctx.memory.pos_min(seq_id) == -1)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_id", [0, 3])
def test_round_trip_bit_exact(
    tmp_path: Path, model: Any, tokens: list[int], source: Source, seq_id: int
) -> None:
    path = tmp_path / "s.kvsnap"
    S.write(path, source.snap)
    back = S.read(path)
    assert back.tokens == tuple(tokens[:-1])
    assert (back.header.pos_min, back.header.pos_max) == (0, len(tokens) - 2)
    with model.context(**CTX_ARGS) as fresh:
        S.restore(fresh, back, seq_id)
        assert fresh.memory.pos_max(seq_id) == len(tokens) - 2
        logits = _next_logits(fresh, tokens, seq_id)
    assert logits.dtype == np.float32
    assert np.array_equal(logits.view(np.uint32), source.logits.view(np.uint32))


def test_round_trip_into_busy_context(model: Any, tokens: list[int], source: Source) -> None:
    """Restore next to another live sequence; the other one is left alone."""
    with model.context(**CTX_ARGS) as ctx:
        ctx.decode(tokens[:5], seq_id=1)
        S.restore(ctx, source.snap, 2)
        assert ctx.memory.pos_max(1) == 4
        logits = _next_logits(ctx, tokens, 2)
    np.testing.assert_allclose(logits, source.logits, rtol=1e-4, atol=1e-4)


def test_payload_is_llama_blob(tmp_path: Path, source: Source, tokens: list[int]) -> None:
    """Known answer: our payload decodes to exactly what llama_state_seq_save_file stores."""
    with source.ctx.model.context(**CTX_ARGS) as ctx:
        _prefill(ctx, tokens)
        ref = tmp_path / "ref.bin"
        ctx.seq_state_save_file(ref, 0, tokens[:-1])
    raw = S.decode(source.snap)
    ref_bytes = ref.read_bytes()
    # llama's file: magic, version, n_tokens, tokens, then the blob without get_data's
    # 8-byte prefix (io magic + seq id).
    skip = 12 + 4 * (len(tokens) - 1)
    assert raw[8:].tobytes() == ref_bytes[skip:]


def test_all_codecs_restore(model: Any, tokens: list[int], source: Source) -> None:
    raw = S.decode(source.snap)
    codecs = (
        S.Codec(filter=S.Filter.NONE),
        S.Codec(filter=S.Filter.SHUFFLE2),
        S.Codec(filter=S.Filter.PLANES2, level=19, chunk_size=4096),
    )
    for codec in codecs:
        snap = S.encode(
            raw,
            identity=source.snap.header.identity,
            tokens=source.snap.tokens,
            seq_id=0,
            pos_min=source.snap.header.pos_min,
            pos_max=source.snap.header.pos_max,
            codec=codec,
        )
        with model.context(**CTX_ARGS) as ctx:
            S.restore(ctx, S.Snapshot.from_bytes(snap.to_bytes()), 1)
            assert np.array_equal(_next_logits(ctx, tokens, 1), source.logits)


def test_empty_sequence(model: Any) -> None:
    with model.context(**CTX_ARGS) as ctx:
        snap = S.capture(ctx, 0, [])
        assert (snap.header.pos_min, snap.header.pos_max) == (-1, -1)
        S.restore(ctx, S.Snapshot.from_bytes(snap.to_bytes()), 1)
        assert _is_empty(ctx, 1)


def test_whole_context_round_trip(model: Any, tokens: list[int]) -> None:
    with model.context(**CTX_ARGS) as ctx:
        ctx.decode(tokens[:-1], seq_id=0)
        ctx.decode(tokens[:5], seq_id=2)
        snap = S.capture(ctx, -1, tokens[:-1])
        assert snap.header.kind is S.StateKind.CONTEXT
        ctx.decode(tokens[-1:], seq_id=0)
        reference = ctx.logits()
    with model.context(**CTX_ARGS) as ctx:
        S.restore(ctx, S.Snapshot.from_bytes(snap.to_bytes()), -1)
        assert ctx.memory.pos_max(2) == 4
        assert np.array_equal(_next_logits(ctx, tokens, 0), reference)
        with pytest.raises(ValueError):
            S.restore(ctx, snap, 0)  # a whole-context snapshot goes into -1 only


def test_bad_seq_ids(source: Source, victim: Any) -> None:
    with pytest.raises(ValueError):
        S.capture(victim, 4, [])
    with pytest.raises(ValueError):
        S.restore(victim, source.snap, -1)
    with pytest.raises(ValueError):
        S.restore(victim, source.snap, 99)


# -- corruption -------------------------------------------------------------------------------

TYPED = (S.CorruptSnapshotError, S.UnsupportedVersionError)


def _expect_refused(victim: Any, data: bytes | bytearray) -> S.SnapshotError:
    with pytest.raises(TYPED) as info:
        S.restore(victim, S.Snapshot.from_bytes(data), 1)
    assert _is_empty(victim, 1)
    return info.value


def test_every_header_byte_flip(source: Source, victim: Any) -> None:
    buf = bytearray(source.blob)
    rng = np.random.default_rng(0)
    for offset in range(source.snap.header.header_len):
        buf[offset] ^= int(rng.integers(1, 256))
        _expect_refused(victim, buf)
        buf[offset] = source.blob[offset]


def test_payload_flips(source: Source, victim: Any) -> None:
    """2,000 single-byte flips across the payload of one in-memory snapshot."""
    buf = bytearray(source.blob)
    rng = np.random.default_rng(1)
    start = source.snap.header.header_len
    offsets = rng.integers(start, len(buf), 2000)
    fields = set()
    for offset in offsets:
        buf[offset] ^= int(rng.integers(1, 256))
        fields.add(getattr(_expect_refused(victim, buf), "field", ""))
        buf[offset] = source.blob[offset]
    assert all(f.startswith("chunk[") and f.endswith(".checksum") for f in fields)


def test_truncations(source: Source, victim: Any) -> None:
    header_len = source.snap.header.header_len
    cuts = list(range(header_len + 1))
    cuts += np.linspace(header_len + 1, len(source.blob) - 1, 100).astype(int).tolist()
    for n in cuts:
        _expect_refused(victim, source.blob[:n])


def test_zero_length_and_garbage_files(tmp_path: Path, victim: Any) -> None:
    empty = tmp_path / "empty.kvsnap"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.kvsnap"
    garbage.write_bytes(os.urandom(1 << 16))
    for path in (empty, garbage):
        with pytest.raises(S.CorruptSnapshotError):
            S.restore(victim, S.read(path), 1)
        with pytest.raises(S.CorruptSnapshotError):
            S.inspect(path)
    assert _is_empty(victim, 1)


def test_valid_header_foreign_payload(
    tmp_path: Path, source: Source, other_model: Any, tokens: list[int], victim: Any
) -> None:
    with other_model.context(**CTX_ARGS) as ctx:
        _prefill(ctx, tokens)
        foreign = S.capture(ctx, 0, tokens[:-1])
    mixed = source.snap.header.pack() + b"".join(bytes(c) for c in foreign.chunks)
    path = tmp_path / "mixed.kvsnap"
    path.write_bytes(mixed)
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.restore(victim, S.read(path), 1)
    assert info.value.field in {"file_size", "chunk[0].checksum"}
    assert _is_empty(victim, 1)


def _forge(source: Source, raw: np.ndarray) -> S.Snapshot:
    """A snapshot of ``raw`` with valid checksums: it gets past us and reaches llama.cpp."""
    h = source.snap.header
    return S.encode(
        raw,
        identity=h.identity,
        tokens=h.tokens,
        seq_id=0,
        pos_min=h.pos_min,
        pos_max=h.pos_max,
    )


def test_llama_rejects_damaged_blob_and_seq_is_cleared(source: Source, victim: Any) -> None:
    """Past every checksum, a truncated blob must still fail cleanly with an empty seq."""
    raw = S.decode(source.snap)
    victim.decode([1, 2, 3], seq_id=1)  # something to be replaced
    for n in (1, 8, 12, 16, 40, raw.size // 2, raw.size - 1):
        with pytest.raises(S.RestoreError):
            S.restore(victim, _forge(source, raw[:n]), 1)
        assert _is_empty(victim, 1)


def test_position_check_clears_seq(source: Source, victim: Any) -> None:
    h = source.snap.header
    lying = dataclasses.replace(h, pos_max=h.pos_max + 1)
    snap = S.Snapshot(lying, source.snap.chunks)
    with pytest.raises(S.RestoreError, match="positions"):
        S.restore(victim, snap, 1)
    assert _is_empty(victim, 1)


def test_context_still_works_after_abuse(source: Source, victim: Any, tokens: list[int]) -> None:
    S.restore(victim, S.Snapshot.from_bytes(source.blob), 1)
    assert np.array_equal(_next_logits(victim, tokens, 1), source.logits)
    victim.memory.seq_rm(1, -1, -1)


# -- mismatches -------------------------------------------------------------------------------


@pytest.fixture
def c_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> int:
        raise AssertionError("llama.cpp saw a blob our checks should have refused")

    monkeypatch.setattr(llamaffi.Context, "seq_state_set", boom)


def _diff_fields(exc: S.IncompatibleSnapshotError) -> set[str]:
    return {field for field, _, _ in exc.differences}


def test_other_model_refused(source: Source, other_model: Any, c_never_called: None) -> None:
    with other_model.context(**CTX_ARGS) as ctx, pytest.raises(S.IncompatibleSnapshotError) as info:
        S.restore(ctx, source.snap, 0)
    assert _diff_fields(info.value) == {"model_fingerprint"}
    assert "model_fingerprint" in str(info.value)


@pytest.mark.parametrize(
    ("src_args", "dst_args", "field"),
    [
        ({"type_k": "q8_0"}, {}, "type_k"),
        ({"flash_attn": True}, {"flash_attn": False}, "flash_attn"),
        ({"flash_attn": False}, {"flash_attn": True}, "flash_attn"),
        ({"kv_unified": False}, {"kv_unified": True}, "kv_unified"),
    ],
)
def test_cache_layout_mismatch_refused(
    model: Any,
    tokens: list[int],
    src_args: dict[str, Any],
    dst_args: dict[str, Any],
    field: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with model.context(**{**CTX_ARGS, **src_args}) as ctx:
        _prefill(ctx, tokens)
        snap = S.Snapshot.from_bytes(S.capture(ctx, 0, tokens[:-1]).to_bytes())
    with model.context(**{**CTX_ARGS, **dst_args}) as ctx:
        calls: list[object] = []
        monkeypatch.setattr(llamaffi.Context, "seq_state_set", lambda *a, **k: calls.append(a))
        with pytest.raises(S.IncompatibleSnapshotError) as info:
            S.restore(ctx, snap, 0)
        assert field in _diff_fields(info.value)
        assert calls == []
        assert _is_empty(ctx, 0)


def test_same_layout_other_flash_setting_restores(model: Any, tokens: list[int]) -> None:
    """The positive control for the mismatch tests: same settings restore fine."""
    args = {**CTX_ARGS, "type_k": "q8_0", "flash_attn": True}
    with model.context(**args) as ctx:
        _prefill(ctx, tokens)
        snap = S.capture(ctx, 0, tokens[:-1])
        expected = _next_logits(ctx, tokens, 0)
    with model.context(**args) as ctx:
        S.restore(ctx, snap, 0)
        assert np.array_equal(_next_logits(ctx, tokens, 0), expected)


def test_other_build_refused_unless_allowed(model: Any, source: Source, tokens: list[int]) -> None:
    h = source.snap.header
    older = dataclasses.replace(h.identity, build_number=h.identity.build_number - 1)
    snap = S.Snapshot(dataclasses.replace(h, identity=older), source.snap.chunks)
    snap = S.Snapshot.from_bytes(snap.to_bytes())
    with model.context(**CTX_ARGS) as ctx:
        with pytest.raises(S.IncompatibleSnapshotError) as info:
            S.restore(ctx, snap, 0)
        assert _diff_fields(info.value) == {"build_number"}
        S.restore(ctx, snap, 0, allow_build_mismatch=True)
        assert np.array_equal(_next_logits(ctx, tokens, 0), source.logits)


def test_fingerprint_is_file_sha256(model: Any, source: Source) -> None:
    digest = hashlib.sha256(Path(model.path).read_bytes()).hexdigest()
    assert source.snap.header.identity.model_fingerprint == digest


# -- two-phase capture -------------------------------------------------------------------------


def test_two_phase_capture_encodes_the_state_as_it_was_copied(
    model: Any, tokens: list[int], source: Source
) -> None:
    with model.context(**CTX_ARGS) as ctx:
        _prefill(ctx, tokens)
        copy = S.copy_state(ctx, 0, tokens[:-1])
        ctx.decode(tokens[-1:], seq_id=0)  # the context moves on before the encode
        snap = copy.encode(session_id="s1", journal_seq=3)
        assert snap.header.journal_seq == 3 and snap.header.session_id == "s1"
        assert (snap.header.pos_min, snap.header.pos_max) == (0, len(tokens) - 2)
        assert snap.tokens == tuple(tokens[:-1])
        assert S.decode(snap).tobytes() == S.decode(source.snap).tobytes()
        assert snap.header.identity == S.identity_of(ctx)
        ctx.memory.seq_rm(0, -1, -1)
        S.restore(ctx, snap, 1)
        assert np.array_equal(_next_logits(ctx, tokens, 1), source.logits)
