"""The Pythonic context: decode, logits and state get/set (its KV cache view,
:class:`llamaffi.memory.Memory`, is ``Context.memory``)."""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from llamaffi import compute
from llamaffi._capi import _types, backend, batch, context, memory, state
from llamaffi.errors import (
    ArgumentError,
    ClosedError,
    ContextError,
    DecodeError,
    StateError,
)
from llamaffi.memory import Memory

if TYPE_CHECKING:
    from llamaffi.model import Model
    from llamaffi.sampler import Sampler

logger = logging.getLogger(__name__)

_U8P = ctypes.POINTER(ctypes.c_uint8)
_TOKP = ctypes.POINTER(_types.llama_token)
_QUANTIZED = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}
_DECODE_ERRORS = {
    1: "no free KV slot for the batch (the context is full; raise n_ctx or drop tokens)",
    2: "aborted by the abort callback (processed ubatches stay in memory)",
    -1: "invalid batch",
}

Buffer = bytes | bytearray | memoryview | npt.NDArray[np.uint8]
LogitsMode = Literal["last", "all", "none"]


def parse_ggml_type(name: str | int) -> _types.ggml_type:
    """``"f16"``/``"q8_0"``/... (or the enum value) to :class:`ggml_type`."""
    if isinstance(name, int):
        return _types.ggml_type(name)
    try:
        return _types.ggml_type[name.upper()]
    except KeyError:
        allowed = ", ".join(t.name.lower() for t in _types.ggml_type)
        raise ContextError(f"unsupported KV cache type {name!r}; use one of {allowed}") from None


def _free_context(ctx_ptr: int, batch_obj: _types.llama_batch) -> None:
    batch.llama_batch_free(batch_obj)
    context.llama_free(ctx_ptr)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Context:
    """A llama.cpp context: a KV cache of ``n_seq_max`` sequences over one :class:`Model`.

    Args:
        model: the model (kept alive by this context).
        n_ctx: KV cache size in tokens, shared by all sequences (0: the model's training size).
        n_batch: the most tokens one ``llama_decode`` call takes; longer inputs are split.
        n_ubatch: physical batch size (default: ``n_batch``).
        n_seq_max: number of sequences (sessions) the cache holds.
        n_threads: threads for generation and for prompt processing (default: all usable CPUs).
        type_k, type_v: KV cache types (``"f16"``, ``"q8_0"``, ...). A quantized V cache needs
            ``flash_attn=True``.
        flash_attn: flash attention on or off. Always explicit (no "auto"), because it decides
            the V layout of the cache and hence whether a saved state can be restored.
        kv_unified: one KV buffer shared by all sequences.
        embeddings: also extract embeddings.

    A context is not thread-safe (nor is llama.cpp's): use it from one thread at a time, and
    do not close its model while another thread decodes.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        type_k: str | int = "f16",
        type_v: str | int = "f16",
        flash_attn: bool = False,
        kv_unified: bool = True,
        embeddings: bool = False,
    ) -> None:
        model_ptr = model._handle()
        if model.vocab_only:
            raise ContextError(f"model {model.path.name!r} was loaded with vocab_only=True")
        max_seq = int(backend.llama_max_parallel_sequences())
        if not 1 <= n_seq_max <= max_seq:
            raise ContextError(f"n_seq_max must be in [1, {max_seq}], got {n_seq_max}")
        if n_ctx < 0 or n_batch < 1 or (n_ubatch is not None and n_ubatch < 1):
            raise ContextError(f"invalid sizes n_ctx={n_ctx} n_batch={n_batch}")
        if not isinstance(flash_attn, bool):
            raise ContextError("flash_attn must be True or False (it fixes the V cache layout)")
        tk, tv = parse_ggml_type(type_k), parse_ggml_type(type_v)
        if tv.name.lower() in _QUANTIZED and not flash_attn:
            raise ContextError(f"a quantized V cache ({tv.name.lower()}) needs flash_attn=True")
        threads = n_threads or _default_threads()

        params = backend.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch or n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = int(tk)
        params.type_v = int(tv)
        params.flash_attn_type = int(
            _types.llama_flash_attn_type.ENABLED
            if flash_attn
            else _types.llama_flash_attn_type.DISABLED
        )
        params.kv_unified = kv_unified
        params.embeddings = embeddings
        params.no_perf = True
        ptr = context.llama_init_from_model(model_ptr, params)
        if not ptr:
            raise ContextError(
                "llama.cpp could not create the context (see the llamaffi.llama_cpp log)",
                function="llama_init_from_model",
            )
        self._ptr: int | None = ptr
        self._model = model  # keeps the model alive as long as this context
        self._mem: int = context.llama_get_memory(ptr) or 0
        self.n_ctx = int(context.llama_n_ctx(ptr))
        self.n_batch = int(context.llama_n_batch(ptr))
        self.n_seq_max = int(context.llama_n_seq_max(ptr))
        self.n_vocab = model.n_vocab
        self.type_k = tk.name.lower()
        self.type_v = tv.name.lower()
        self.flash_attn = flash_attn
        self.kv_unified = bool(kv_unified)
        self.n_threads = threads
        self._batch = batch.llama_batch_init(self.n_batch, 0, 1)
        self._batch_seq = -1  # the seq id currently written into every batch slot
        self._n_outputs = 0
        self._kept: frozenset[int] | None = None  # the last decode's places with logits
        self._finalizer = weakref.finalize(self, _free_context, ptr, self._batch)
        self.memory = Memory(self)
        model._adopt(self)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and its KV cache. Safe to call more than once."""
        self._ptr = None
        self._mem = 0
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether the context (or its model) was closed."""
        return self._ptr is None

    @property
    def model(self) -> Model:
        """The model this context was made from."""
        return self._model

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<Context closed>"
        kv = f"{self.type_k}/{self.type_v}"
        return f"<Context n_ctx={self.n_ctx} n_seq_max={self.n_seq_max} kv={kv}>"

    def _handle(self) -> int:
        if self._ptr is None:
            raise ClosedError("context is closed")
        return self._ptr

    def _check_seq(self, seq_id: int, allow_all: bool = False) -> None:
        low = -1 if allow_all else 0
        if not isinstance(seq_id, int) or not low <= seq_id < self.n_seq_max:
            raise ArgumentError(
                f"seq_id must be an int in [{low}, {self.n_seq_max}), got {seq_id!r}"
            )

    # -- decoding ---------------------------------------------------------------------------

    def decode(
        self,
        tokens: Sequence[int] | npt.NDArray[np.integer],
        seq_id: int = 0,
        pos: int | None = None,
        logits: LogitsMode = "last",
    ) -> None:
        """Append ``tokens`` to sequence ``seq_id`` and run the model over them.

        Args:
            tokens: token ids; split into ``n_batch`` chunks as needed.
            seq_id: the sequence.
            pos: position of the first token; ``None`` continues after the sequence's last one.
            logits: which outputs to keep: the ``"last"`` token's, ``"all"`` (only when the
                tokens fit one batch), or ``"none"``.

        Raises:
            DecodeError: llama.cpp failed; ``code`` is its return value. On code 1 (no KV slot)
                the sequence is as it was before the failing chunk.
        """
        ptr = self._handle()
        self._check_seq(seq_id)
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
            raise ArgumentError("tokens must be a non-empty flat sequence of ints")
        if arr.min() < 0 or arr.max() >= self.n_vocab:
            raise ArgumentError(f"token ids must be in [0, {self.n_vocab})")
        if logits not in ("last", "all", "none"):
            raise ArgumentError(f"logits must be 'last', 'all' or 'none', not {logits!r}")
        if logits == "all" and arr.size > self.n_batch:
            raise ArgumentError(f"logits='all' needs len(tokens) <= n_batch ({self.n_batch})")
        start = self.memory.pos_max(seq_id) + 1 if pos is None else pos
        if start < 0:
            raise ArgumentError(f"pos must be >= 0, got {start}")
        if start + arr.size > self.n_ctx:
            raise DecodeError(
                f"{arr.size} tokens at position {start} exceed n_ctx={self.n_ctx}",
                function="llama_decode",
            )
        b = self._batch
        tok_view = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
        pos_view = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
        nseq_view = np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))
        out_view = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
        if self._batch_seq != seq_id:
            for i in range(self.n_batch):
                b.seq_id[i][0] = seq_id
            self._batch_seq = seq_id
        for off in range(0, arr.size, self.n_batch):
            chunk = arr[off : off + self.n_batch]
            n = chunk.size
            tok_view[:n] = chunk
            pos_view[:n] = np.arange(start + off, start + off + n, dtype=np.int32)
            nseq_view[:n] = 1
            out_view[:n] = 0
            is_last = off + n == arr.size
            if logits == "all":
                out_view[:n] = 1
            elif logits == "last" and is_last:
                out_view[n - 1] = 1
            b.n_tokens = n
            self._n_outputs = 0  # until this decode is known to have finished
            rc = compute.run(batch.llama_decode, ptr, b)  # one thread decodes: see compute
            if rc != 0:
                reason = _DECODE_ERRORS.get(rc, "fatal error")
                raise DecodeError(reason, function="llama_decode", code=rc)
            self._n_outputs = int(out_view[:n].sum())
            self._kept = frozenset(np.flatnonzero(out_view[:n]).tolist())

    def decode_batch(
        self,
        seq_ids: Sequence[int],
        tokens: Sequence[int],
        pos: Sequence[int],
        outputs: Sequence[bool] | None = None,
    ) -> None:
        """One ``llama_decode`` of tokens of several sequences: token ``i`` goes to sequence
        ``seq_ids[i]`` at position ``pos[i]``. At most ``n_batch`` tokens.

        Without ``outputs``, one token per sequence, and each keeps its logits as output
        ``i`` (read with :meth:`logits` or a :class:`Sampler`). With ``outputs`` (a flag per
        token), a sequence may have several tokens at consecutive positions (a slice of a
        prompt beside other sequences' next tokens), and only the flagged tokens keep their
        logits: read token ``i``'s with index ``i`` (its place in the batch), or ``-1`` for
        the last flagged one.

        Raises:
            DecodeError: llama.cpp failed; ``code`` is its return value (on code 1, no KV
                slot, no sequence changed).
        """
        ptr = self._handle()
        n = len(tokens)
        if not 0 < n <= self.n_batch or len(seq_ids) != n or len(pos) != n:
            raise ArgumentError(f"need 1 to {self.n_batch} tokens, one seq id and pos each")
        if outputs is None and len(set(seq_ids)) != n:
            raise ArgumentError("one token per sequence in a batch (or give outputs)")
        if outputs is not None and len(outputs) != n:
            raise ArgumentError("outputs needs one flag per token")
        for seq_id in set(seq_ids):
            self._check_seq(seq_id)
        arr = np.asarray(tokens)
        if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= self.n_vocab:
            raise ArgumentError(f"token ids must be ints in [0, {self.n_vocab})")
        where = np.asarray(pos)
        if where.min() < 0 or where.max() >= self.n_ctx:
            raise ArgumentError(f"positions must be in [0, {self.n_ctx})")
        keep = np.ones(n, dtype=np.int8) if outputs is None else np.asarray(outputs, np.int8)
        b = self._batch
        np.ctypeslib.as_array(b.token, shape=(self.n_batch,))[:n] = arr
        np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))[:n] = where
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:n] = 1
        np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))[:n] = keep
        for i, seq_id in enumerate(seq_ids):
            b.seq_id[i][0] = seq_id
        self._batch_seq = -1  # the slots hold several sequences now
        b.n_tokens = n
        self._n_outputs = 0  # until this decode is known to have finished
        rc = compute.run(batch.llama_decode, ptr, b)  # one thread decodes: see compute
        if rc != 0:
            raise DecodeError(
                _DECODE_ERRORS.get(rc, "fatal error"), function="llama_decode", code=rc
            )
        self._n_outputs = int(keep.sum())
        self._kept = frozenset(np.flatnonzero(keep).tolist())

    def check_output(self, i: int) -> None:
        """Raise IndexError unless the last decode kept the logits of its token ``i`` (its place
        in the batch, or negative: the kept outputs counted from the end). llama.cpp aborts
        the process on a row it does not have, so every reader checks here first."""
        n, kept = self._n_outputs, self._kept
        if i >= 0 and n:  # a place in the last decode's batch (llama_get_logits_ith's i)
            if kept is None or i not in kept:
                raise IndexError(f"token {i} of the last decode kept no logits")
            return
        if not -n <= i < n:
            raise IndexError(f"output index {i} out of range: the last decode kept {n} outputs")

    def logits(self, i: int = -1) -> npt.NDArray[np.float32]:
        """A copy of the logits of output ``i`` of the last decode (``-1``: the last one)."""
        ptr = self._handle()
        self.check_output(i)
        row = batch.llama_get_logits_ith(ptr, i)
        if not row:
            raise DecodeError(f"no logits for output {i}", function="llama_get_logits_ith")
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()

    def generate(
        self,
        tokens: Sequence[int],
        n_predict: int,
        sampler: Sampler | None = None,
        seq_id: int = 0,
    ) -> list[int]:
        """Decode ``tokens`` (may be empty to continue), then sample up to ``n_predict`` tokens.

        Stops early at an end-of-generation token (which is returned but not decoded).
        Uses a greedy sampler when none is given.
        """
        from llamaffi.sampler import Sampler

        own = sampler is None
        smpl = Sampler.greedy() if sampler is None else sampler
        try:
            if len(tokens):
                self.decode(tokens, seq_id=seq_id)
            elif self._n_outputs == 0:
                raise ArgumentError("nothing to continue from: pass tokens or decode first")
            out: list[int] = []
            for _ in range(n_predict):
                tok = smpl.sample(self, -1)
                out.append(tok)
                if self._model.is_eog(tok):
                    break
                self.decode([tok], seq_id=seq_id)
            return out
        finally:
            if own:
                smpl.close()

    # -- state ------------------------------------------------------------------------------

    def state_get(self) -> npt.NDArray[np.uint8]:
        """The whole context state (all sequences, logits) as a new uint8 array."""
        ptr = self._handle()
        size = int(state.llama_state_get_size(ptr))
        out = np.empty(size, dtype=np.uint8)
        n = state.llama_state_get_data(ptr, out.ctypes.data_as(_U8P), size)
        if n == 0 and size:
            raise StateError("could not copy the state", function="llama_state_get_data")
        return out[:n]

    def state_set(self, buf: Buffer) -> int:
        """Load a whole-context state; on failure the memory is cleared and StateError raised."""
        ptr = self._handle()
        src = _as_u8(buf)
        n = state.llama_state_set_data(ptr, src.ctypes.data_as(_U8P), src.size)
        if n == 0:
            self.memory.clear()
            raise StateError(
                f"state of {src.size} bytes rejected; memory cleared",
                function="llama_state_set_data",
            )
        self._n_outputs = 0
        return int(n)

    def seq_state_size(self, seq_id: int, flags: int = 0) -> int:
        """Exact bytes :meth:`seq_state_get` will produce for ``seq_id`` (-1: every seq)."""
        ptr = self._handle()
        self._check_seq(seq_id, allow_all=True)
        return int(state.llama_state_seq_get_size_ext(ptr, seq_id, flags))

    def seq_state_get(
        self, seq_id: int, flags: int = 0, out: npt.NDArray[np.uint8] | None = None
    ) -> npt.NDArray[np.uint8]:
        """The state of one sequence (-1: all of them), copied once into a Python-owned array.

        Pass ``out`` (a writable, contiguous uint8 array at least :meth:`seq_state_size` long)
        to reuse a buffer; the returned array is then a view of it.
        """
        ptr = self._handle()
        self._check_seq(seq_id, allow_all=True)
        size = int(state.llama_state_seq_get_size_ext(ptr, seq_id, flags))
        if out is None:
            out = np.empty(size, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous:
            raise StateError("out must be a 1-D contiguous uint8 array")
        elif not out.flags.writeable or out.size < size:
            raise StateError(f"out must be writable and hold {size} bytes, has {out.size}")
        n = state.llama_state_seq_get_data_ext(ptr, out.ctypes.data_as(_U8P), size, seq_id, flags)
        if n != size:
            raise StateError(
                f"copied {n} of {size} bytes", function="llama_state_seq_get_data_ext", code=n
            )
        return out[:n]

    def seq_state_set(self, buf: Buffer, seq_id: int, flags: int = 0) -> int:
        """Load a sequence state (from :meth:`seq_state_get`) into ``seq_id`` (-1: all).

        Returns the bytes read. On failure the sequence (for -1: the whole memory) is left
        **empty**, never half-filled, and :class:`StateError` is raised.
        """
        ptr = self._handle()
        self._check_seq(seq_id, allow_all=True)
        src = _as_u8(buf)
        n = 0
        if src.size:
            # An empty buffer is never a valid state (llama.cpp #14434, #9173: short inputs):
            # it is refused without calling C, with the same outcome as any failed restore.
            n = state.llama_state_seq_set_data_ext(
                ptr, src.ctypes.data_as(_U8P), src.size, seq_id, flags
            )
        if n == 0:
            # llama.cpp #27068: a failed restore can leave cells behind; empty the sequence.
            if seq_id == -1:
                memory.llama_memory_clear(self._mem, True)
            else:
                memory.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            raise StateError(
                f"sequence state of {src.size} bytes rejected; seq {seq_id} cleared",
                function="llama_state_seq_set_data_ext",
            )
        self._n_outputs = 0
        return int(n)

    def seq_state_save_file(
        self, path: str | os.PathLike[str], seq_id: int, tokens: Sequence[int]
    ) -> int:
        """llama.cpp's own sequence file (no checksum, no model identity); bytes written."""
        ptr = self._handle()
        self._check_seq(seq_id)
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        n = state.llama_state_seq_save_file(
            ptr, os.fsencode(path), seq_id, toks.ctypes.data_as(_TOKP), toks.size
        )
        if n == 0:
            raise StateError(f"could not write {path}", function="llama_state_seq_save_file")
        return int(n)

    def seq_state_load_file(
        self, path: str | os.PathLike[str], seq_id: int, n_token_capacity: int
    ) -> list[int]:
        """Load a file written by :meth:`seq_state_save_file`; returns its tokens."""
        ptr = self._handle()
        self._check_seq(seq_id)
        toks = np.empty(max(1, n_token_capacity), dtype=np.int32)
        count = ctypes.c_size_t(0)
        n = state.llama_state_seq_load_file(
            ptr,
            os.fsencode(path),
            seq_id,
            toks.ctypes.data_as(_TOKP),
            toks.size,
            ctypes.byref(count),
        )
        if n == 0:
            memory.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            raise StateError(f"could not load {path}", function="llama_state_seq_load_file")
        self._n_outputs = 0
        return [int(t) for t in toks[: count.value]]

    def state_save_file(self, path: str | os.PathLike[str], tokens: Sequence[int]) -> None:
        """llama.cpp's whole-context session file."""
        ptr = self._handle()
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        if not state.llama_state_save_file(
            ptr, os.fsencode(path), toks.ctypes.data_as(_TOKP), toks.size
        ):
            raise StateError(f"could not write {path}", function="llama_state_save_file")

    def state_load_file(self, path: str | os.PathLike[str], n_token_capacity: int) -> list[int]:
        """Load a whole-context session file; returns its tokens."""
        ptr = self._handle()
        toks = np.empty(max(1, n_token_capacity), dtype=np.int32)
        count = ctypes.c_size_t(0)
        ok = state.llama_state_load_file(
            ptr, os.fsencode(path), toks.ctypes.data_as(_TOKP), toks.size, ctypes.byref(count)
        )
        if not ok:
            self.memory.clear()
            raise StateError(f"could not load {path}", function="llama_state_load_file")
        self._n_outputs = 0
        return [int(t) for t in toks[: count.value]]


def _as_u8(buf: Buffer) -> npt.NDArray[np.uint8]:
    """A zero-copy uint8 view of any contiguous buffer."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise StateError("state buffer must be contiguous")
        return buf.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise StateError(f"not a usable state buffer: {exc}") from exc
