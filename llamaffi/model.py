"""The Pythonic model: load, metadata, tokenizer, fingerprint, and the factory for contexts."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llamaffi._backend import ensure_backend
from llamaffi._capi import _types, vocab
from llamaffi._capi import model as cmodel
from llamaffi._util import cache_root, sha256_file
from llamaffi.errors import ArgumentTypeError, ClosedError, ModelLoadError, TokenizeError

if TYPE_CHECKING:
    from llamaffi.context import Context

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_INT32_MIN = -(2**31)


class _FingerprintCache:
    """sha256 of model files keyed by (device, inode, size, mtime_ns), in memory and on disk.

    Hashing a multi-GB GGUF costs seconds; a restart should not pay it again. The on-disk cache
    is advisory: a missing or damaged file only means we hash again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mem: dict[str, str] = {}

    @staticmethod
    def key(path: Path) -> str:
        """The identity of the file now: (device, inode, size, mtime)."""
        st = path.stat()
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def _file(self) -> Path:
        return cache_root() / "fingerprints.json"

    def _load_disk(self) -> dict[str, str]:
        try:
            data = json.loads(self._file().read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _store_disk(self, key: str, digest: str) -> None:
        entries = self._load_disk()
        entries[key] = digest
        if len(entries) > 256:  # bounded: keep the newest entries only
            entries = dict(list(entries.items())[-256:])
        path = self._file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, path)
        except OSError as exc:
            logger.debug("could not persist fingerprint cache: %s", exc)

    def get(self, path: Path, expected_key: str | None = None) -> str:
        key = self.key(path)
        if expected_key is not None and key != expected_key:
            raise ModelLoadError(
                f"{path} was replaced or modified after it was loaded; its sha256 would not "
                "describe the weights in memory (reload the model)"
            )
        with self._lock:
            if key in self._mem:
                return self._mem[key]
            cached = self._load_disk().get(key)
            if cached is None:
                cached = sha256_file(path)
                if self.key(path) != key:
                    raise ModelLoadError(f"{path} changed while it was being fingerprinted")
                self._store_disk(key, cached)
            self._mem[key] = cached
            return cached


_fingerprints = _FingerprintCache()


def _check_gguf(path: Path) -> None:
    """Fail with the path in the message before C sees a missing or non-GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a regular file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}): {path}")


def _read_string(fn: Any, *args: Any) -> str | None:
    """Call a ``(…, char * buf, size_t size) -> int32 length`` getter, growing the buffer."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = fn(*args, buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1


class Model:
    """A GGUF model loaded by llama.cpp.

    Use as a context manager or call :meth:`close`. Closing a model first closes every
    :class:`~llamaffi.context.Context` made from it; a context keeps its model alive.

    Args:
        path: the GGUF file.
        n_gpu_layers: layers to offload to a GPU backend (0: CPU only, -1: all).
        use_mmap: map the file instead of reading it (lets idle processes drop the pages).
        vocab_only: load only the vocabulary (fast; no contexts can be made).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_gpu_layers: int = 0,
        *,
        use_mmap: bool = True,
        vocab_only: bool = False,
    ) -> None:
        self.path = Path(path)
        _check_gguf(self.path)
        file_key = _FingerprintCache.key(self.path)
        ensure_backend()
        params = _backend_model_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.load_mode = _types.llama_load_mode.MMAP if use_mmap else _types.llama_load_mode.NONE
        params.vocab_only = bool(vocab_only)
        ptr = cmodel.llama_model_load_from_file(os.fsencode(self.path), params)
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp rejected the model file {self.path} (see the llamaffi.llama_cpp "
                "log for its reason)",
                function="llama_model_load_from_file",
            )
        if _FingerprintCache.key(self.path) != file_key:
            cmodel.llama_model_free(ptr)
            raise ModelLoadError(f"{self.path} changed while it was being loaded")
        # The identity of the file the weights came from: the fingerprint is only ever
        # computed for this exact file, so a GGUF replaced on disk later cannot lend its sha256
        # to snapshots of the model still in memory.
        self._file_key = file_key
        self._ptr: int | None = ptr
        self._vocab: int = cmodel.llama_model_get_vocab(ptr) or 0
        self._children: weakref.WeakSet[Context] = weakref.WeakSet()
        self._finalizer = weakref.finalize(self, cmodel.llama_model_free, ptr)
        self.vocab_only = bool(vocab_only)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model (after closing its contexts). Safe to call more than once."""
        for child in list(self._children):
            child.close()
        self._ptr = None
        self._vocab = 0
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._ptr is None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.n_params:,} params"
        return f"<Model {self.path.name!r} {state}>"

    def _handle(self) -> int:
        if self._ptr is None:
            raise ClosedError(f"model {self.path.name!r} is closed")
        return self._ptr

    def _vocab_handle(self) -> int:
        self._handle()
        return self._vocab

    def _adopt(self, child: Context) -> None:
        self._children.add(child)

    # -- identity & metadata ----------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the whole GGUF file; cached by (inode, size, mtime).

        Raises :class:`ModelLoadError` if the file was replaced or modified since the model was
        loaded (the hash would then describe other weights).
        """
        return _fingerprints.get(self.path, self._file_key)

    @property
    def desc(self) -> str:
        """llama.cpp's short description, e.g. ``llama ?B F16``."""
        return _read_string(cmodel.llama_model_desc, self._handle()) or ""

    @property
    def size(self) -> int:
        """Bytes of tensor data."""
        return int(cmodel.llama_model_size(self._handle()))

    @property
    def n_params(self) -> int:
        """Number of parameters."""
        return int(cmodel.llama_model_n_params(self._handle()))

    @property
    def n_layer(self) -> int:
        """Number of layers."""
        return int(cmodel.llama_model_n_layer(self._handle()))

    @property
    def n_embd(self) -> int:
        """Embedding width."""
        return int(cmodel.llama_model_n_embd(self._handle()))

    @property
    def n_head(self) -> int:
        """Attention heads."""
        return int(cmodel.llama_model_n_head(self._handle()))

    @property
    def n_head_kv(self) -> int:
        """KV heads (fewer than :attr:`n_head` under GQA)."""
        return int(cmodel.llama_model_n_head_kv(self._handle()))

    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained with."""
        return int(cmodel.llama_model_n_ctx_train(self._handle()))

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return int(vocab.llama_vocab_n_tokens(self._vocab_handle()))

    def meta_val_str(self, key: str) -> str | None:
        """A GGUF metadata value rendered as a string, or ``None`` if the key is absent."""
        return _read_string(cmodel.llama_model_meta_val_str, self._handle(), key.encode())

    def metadata(self) -> dict[str, str]:
        """All scalar GGUF metadata (arrays are not exposed by llama.cpp)."""
        ptr = self._handle()
        out: dict[str, str] = {}
        for i in range(cmodel.llama_model_meta_count(ptr)):
            key = _read_string(cmodel.llama_model_meta_key_by_index, ptr, i)
            val = _read_string(cmodel.llama_model_meta_val_str_by_index, ptr, i)
            if key is not None and val is not None:
                out[key] = val
        return out

    def chat_template(self, name: str | None = None) -> str | None:
        """The default (or named) chat template, or ``None``."""
        raw = cmodel.llama_model_chat_template(self._handle(), name.encode() if name else None)
        return raw.decode("utf-8", "replace") if raw else None

    # -- vocabulary --------------------------------------------------------------------------

    @property
    def bos(self) -> int:
        """Beginning-of-sequence token id (-1 if none)."""
        return int(vocab.llama_vocab_bos(self._vocab_handle()))

    @property
    def eos(self) -> int:
        """End-of-sequence token id (-1 if none)."""
        return int(vocab.llama_vocab_eos(self._vocab_handle()))

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation."""
        self._check_token(token)
        return bool(vocab.llama_vocab_is_eog(self._vocab, token))

    def _check_token(self, token: int) -> None:
        n_vocab = self.n_vocab
        if not 0 <= token < n_vocab:
            raise TokenizeError(f"token id {token} out of range [0, {n_vocab})")

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Text to token ids. ``add_special`` adds BOS/EOS as the model asks."""
        if not isinstance(text, str):
            raise ArgumentTypeError(f"text must be str, not {type(text).__name__}")
        raw = text.encode("utf-8")
        if len(raw) >= 2**31 - 1:
            raise TokenizeError(f"text too long to tokenize ({len(raw)} bytes)")
        handle = self._vocab_handle()
        capacity = len(raw) + 2 * int(add_special) + 1
        for _ in range(2):
            out = (_types.llama_token * capacity)()
            n = vocab.llama_tokenize(
                handle, raw, len(raw), out, capacity, add_special, parse_special
            )
            if n == _INT32_MIN:
                raise TokenizeError("token count overflows int32", function="llama_tokenize")
            if n >= 0:
                return list(out[:n])
            capacity = -n  # C told us the size it needs
        raise TokenizeError("buffer size negotiation failed", function="llama_tokenize", code=n)

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (may be a partial UTF-8 sequence)."""
        self._check_token(token)
        size = 32
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = vocab.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n
        raise TokenizeError("buffer size negotiation failed", function="llama_token_to_piece")

    def detokenize(
        self,
        tokens: Sequence[int],
        remove_special: bool = False,
        unparse_special: bool = False,
    ) -> str:
        """Token ids to text (invalid UTF-8 is replaced with U+FFFD)."""
        handle = self._vocab_handle()
        arr = np.asarray(tokens, dtype=np.int32)
        if arr.ndim != 1:
            raise TokenizeError("tokens must be a flat sequence of ints")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            raise TokenizeError(f"token ids out of range [0, {self.n_vocab})")
        tok_p = arr.ctypes.data_as(ctypes.POINTER(_types.llama_token))
        size = max(16, arr.size * 8)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = vocab.llama_detokenize(
                handle, tok_p, arr.size, buf, size, remove_special, unparse_special
            )
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n
        raise TokenizeError("buffer size negotiation failed", function="llama_detokenize")

    # -- contexts ----------------------------------------------------------------------------

    def context(self, **kwargs: Any) -> Context:
        """Create a :class:`~llamaffi.context.Context`; see its constructor for arguments."""
        from llamaffi.context import Context

        return Context(self, **kwargs)


def _backend_model_params() -> _types.llama_model_params:
    from llamaffi._capi.backend import llama_model_default_params

    return llama_model_default_params()
