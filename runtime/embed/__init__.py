"""The sentence embedder of the long-term memory: one module per part.

* :mod:`runtime.embed.export`: all-MiniLM-L6-v2 from safetensors to ONNX (and int8), cached;
* :mod:`runtime.embed.embedder`: :class:`Embedder`, which runs such an export, and the
  :class:`TextEmbedder` protocol the memory store needs.

Every public name of the former single module ``runtime.embed`` is importable from here.
"""

from __future__ import annotations

from runtime.embed.embedder import (
    DEFAULT_BATCH_SIZE,
    MAX_TEXTS_PER_CALL,
    Embedder,
    Embeddings,
    EmbedStats,
    FloatArray,
    TextEmbedder,
)
from runtime.embed.export import (
    CACHE_CONFIG,
    DEFAULT_MODEL_ID,
    DEFAULT_PACKAGE,
    EXPORTER_VERSION,
    INT8_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    BertConfig,
    build_bert_onnx,
    default_source_dir,
    export_minilm,
    quantize_int8,
    read_safetensors,
)
from runtime.errors import EmbedderError
from runtime.fsutil import cache_root, sha256_file

__all__ = [
    "CACHE_CONFIG",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MODEL_ID",
    "DEFAULT_PACKAGE",
    "EXPORTER_VERSION",
    "INT8_FILE",
    "MAX_TEXTS_PER_CALL",
    "MODEL_FILE",
    "TOKENIZER_FILE",
    "BertConfig",
    "EmbedStats",
    "Embedder",
    "EmbedderError",
    "Embeddings",
    "FloatArray",
    "TextEmbedder",
    "build_bert_onnx",
    "cache_root",
    "default_source_dir",
    "export_minilm",
    "quantize_int8",
    "read_safetensors",
    "sha256_file",
]
