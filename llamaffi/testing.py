"""Deterministic random-weight llama models (GGUF) for tests, the demo and benchmarks.

:func:`make_model` writes a llama-architecture GGUF whose weights are random but reproducible:
the same arguments give a byte-identical file (for a given numpy feature release: numpy only
promises stable ``Generator`` streams within one, NEP 19). The tokenizer is copied verbatim
from the real Llama SPM vocabulary that ships with the pinned llama.cpp tree
(``vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf``), so tokenization behaves exactly as
for a real Llama-2-style model while the weights stay small and license-free.

Two presets:

``tiny``
    2 layers, 256 embd, 4 heads, 2 KV heads (GQA), ffn 768, f16: 36.6 MB (18M parameters),
    33 MB of it the 32000 x 256 token embedding and output matrices. For tests and the demo;
    about half a second to write.
``tinyllama-geometry``
    TinyLlama-1.1B's geometry (22 layers, 2048 embd, 32 heads, 4 KV heads, ffn 5632), f16:
    2.2 GB (1.1B parameters). For benchmarks; about 20 s to write, with a peak RSS of about
    240 MB.

The file is generated and written one tensor at a time, so peak memory is one tensor (the
largest is the embedding matrix) rather than the whole model, and it is published atomically.

Command line::

    python -m llamaffi.testing PATH [--preset tiny|tinyllama-geometry] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.resources
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import gguf
import numpy as np
import numpy.typing as npt

from llamaffi.errors import ArgumentError, ArgumentTypeError

__all__ = [
    "CHAT_TEMPLATE",
    "GEMMA_CHAT_TEMPLATE",
    "LLAMA3_CHAT_TEMPLATE",
    "MISTRAL_CHAT_TEMPLATE",
    "PRESETS",
    "VOCAB_ENV",
    "find_vocab",
    "main",
    "make_model",
]

logger = logging.getLogger(__name__)

#: Environment variable that points at the vocabulary GGUF to copy the tokenizer from.
VOCAB_ENV: Final = "LLAMAFFI_VOCAB_GGUF"

_VOCAB_NAME: Final = "ggml-vocab-llama-spm.gguf"


def _default_vocab() -> Path:
    """The vocabulary installed with the package (``llamaffi/lib/``, put there by the build).

    Found through ``importlib.resources`` so that a wheel or sdist install works from any
    directory; a source checkout whose build has not run yet falls back to the fetched tree.
    """
    packaged = Path(str(importlib.resources.files("llamaffi") / "lib" / _VOCAB_NAME))
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "models" / _VOCAB_NAME


_GEOMETRY_KEYS: Final = ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff")

#: Named geometries for :func:`make_model`. Explicit keyword arguments override these values.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 768},
    "tinyllama-geometry": {
        "n_layer": 22,
        "n_embd": 2048,
        "n_head": 32,
        "n_head_kv": 4,
        "n_ff": 5632,
    },
}

# Small enough that activations stay finite through many layers, as in GPT-2's init.
_WEIGHT_STD: Final = 0.02
_RMS_EPS: Final = 1e-5
_ROPE_FREQ_BASE: Final = 10000.0
# Random numbers are drawn in float32 blocks of this many values and cast into the output
# tensor, so that the float32 intermediate never costs more than 16 MiB.
_CHUNK: Final = 1 << 22
_TMP_PREFIX: Final = ".tmp-"

_WTYPES: Final[dict[str, tuple[type[np.floating[Any]], gguf.LlamaFileType]]] = {
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
}

# ChatML: llama.cpp's llama_chat_apply_template recognises it by "<|im_start|>"
# (src/llama-chat.cpp, llm_chat_detect_template), so both the template getter and the
# built-in formatter have something real to work with.
CHAT_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Real templates of other families, copied verbatim from the pinned tree so that tests can
# exercise llama.cpp's other formatters (each is recognised by llm_chat_detect_template).

#: Meta-Llama-3-8B-Instruct, as in ``tests/test-chat-template.cpp`` ("Llama-3"); llama.cpp
#: recognises it by ``<|start_header_id|>`` and formats it as ``llama3``.
LLAMA3_CHAT_TEMPLATE: Final = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

#: Mistral-7B-Instruct (v0.1/v0.2, before Mistral's "v1" tokenizer: ``[INST]`` without a
#: system role), as in ``tests/test-chat-template.cpp``; llama.cpp formats it as ``llama2``.
MISTRAL_CHAT_TEMPLATE: Final = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

#: google/gemma-2-2b-it (``models/templates/google-gemma-2-2b-it.jinja``); no system role:
#: llama.cpp's ``gemma`` formatter folds the system text into the first user turn.
GEMMA_CHAT_TEMPLATE: Final = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclass(frozen=True)
class _Geometry:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    # numpy order (slowest axis first): the reverse of ggml's ne[], which gguf writes for us.
    shape: tuple[int, ...]
    is_norm: bool


def find_vocab(vocab: str | os.PathLike[str] | None = None) -> Path:
    """Return the vocabulary GGUF to copy the tokenizer from.

    The first of: the ``vocab`` argument, ``$LLAMAFFI_VOCAB_GGUF``, and the Llama SPM
    vocabulary installed with the package (``llamaffi/lib/ggml-vocab-llama-spm.gguf``, copied
    there from the pinned tree by the build).

    Raises:
        FileNotFoundError: the chosen file does not exist; the message names the path and how
            to fetch the pinned tree.
    """
    if vocab is not None:
        path, source = Path(vocab), "the vocab argument"
    elif os.environ.get(VOCAB_ENV):
        path, source = Path(os.environ[VOCAB_ENV]), f"${VOCAB_ENV}"
    else:
        path, source = _default_vocab(), "the llamaffi package data"
    if not path.is_file():
        raise FileNotFoundError(
            f"vocabulary GGUF not found: {path} (from {source}). Reinstall llamaffi (the build "
            "copies it from the pinned llama.cpp source; in a source checkout, fetch that with "
            f"`python scripts/fetch_llama_cpp.py`), or point ${VOCAB_ENV} at a copy of "
            f"models/{_VOCAB_NAME}"
        )
    return path


def make_model(
    path: str | os.PathLike[str],
    *,
    preset: str | None = None,
    n_layer: int | None = None,
    n_embd: int | None = None,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    vocab: str | os.PathLike[str] | None = None,
    seed: int = 0,
    wtype: str = "f16",
    n_ctx_train: int = 2048,
    chat_template: str | None = CHAT_TEMPLATE,
) -> Path:
    """Write a deterministic random-weight llama GGUF to ``path`` and return ``path``.

    Args:
        path: Where to write the model. It is replaced atomically; its directory must exist.
        preset: A key of :data:`PRESETS`. Without one, all five geometry arguments are required.
        n_layer, n_embd, n_head, n_head_kv, n_ff: The geometry; each overrides the preset's.
            ``n_embd`` must be a multiple of ``n_head`` with an even head size, and ``n_head``
            a multiple of ``n_head_kv``.
        vocab: The GGUF whose ``tokenizer.ggml.*`` keys are copied (see :func:`find_vocab`).
        seed: Non-negative; tensor ``i`` is drawn from ``numpy.random.default_rng([seed, i])``.
        wtype: ``"f16"`` or ``"f32"`` for the 2-D weights; norm weights are always f32 ones.
        n_ctx_train: Written as ``llama.context_length``.
        chat_template: Written as ``tokenizer.chat_template`` (default: ChatML,
            :data:`CHAT_TEMPLATE`; see also :data:`LLAMA3_CHAT_TEMPLATE`,
            :data:`MISTRAL_CHAT_TEMPLATE`, :data:`GEMMA_CHAT_TEMPLATE`); ``None`` writes none.

    Raises:
        TypeError: a geometry value is missing.
        ValueError: an unknown preset or wtype, or an inconsistent geometry.
        FileNotFoundError: the vocabulary GGUF is missing.
    """
    geometry = _resolve_geometry(
        preset,
        {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv},
        n_ff,
    )
    if wtype not in _WTYPES:
        raise ArgumentError(f"wtype must be one of {sorted(_WTYPES)}, got {wtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ArgumentError(f"seed must be a non-negative int, got {seed!r}")
    _check_positive("n_ctx_train", n_ctx_train)
    if chat_template is not None and not isinstance(chat_template, str):
        raise ArgumentError(f"chat_template must be a str or None, got {chat_template!r}")
    target = Path(path)
    vocab_path = find_vocab(vocab)

    started = time.monotonic()
    name = f"llamaffi-{preset or 'custom'}-seed{seed}"
    with _atomic_target(target) as tmp:
        _write_gguf(tmp, name, geometry, vocab_path, seed, wtype, n_ctx_train, chat_template)
    logger.info(
        "wrote %s (%s, %.1f MB) in %.1f s",
        target,
        name,
        target.stat().st_size / 1e6,
        time.monotonic() - started,
    )
    return target


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(f"{name} must be a positive int, got {value!r}")
    return value


def _resolve_geometry(
    preset: str | None, overrides: dict[str, int | None], n_ff: int | None
) -> _Geometry:
    if preset is None:
        values: dict[str, int] = {}
    elif preset in PRESETS:
        values = dict(PRESETS[preset])
    else:
        raise ArgumentError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    for key, value in {**overrides, "n_ff": n_ff}.items():
        if value is not None:
            values[key] = value
    missing = [key for key in _GEOMETRY_KEYS if key not in values]
    if missing:
        raise ArgumentTypeError(f"make_model() without a preset needs {', '.join(missing)}")
    for key in _GEOMETRY_KEYS:
        _check_positive(key, values[key])
    geometry = _Geometry(**values)
    if geometry.n_embd % geometry.n_head or geometry.head_dim % 2:
        # RoPE rotates pairs of values, so the head size must be even.
        raise ArgumentError(
            f"n_embd ({geometry.n_embd}) must be n_head ({geometry.n_head}) times an even head size"
        )
    if geometry.n_head % geometry.n_head_kv:
        raise ArgumentError(
            f"n_head ({geometry.n_head}) must be a multiple of n_head_kv ({geometry.n_head_kv})"
        )
    return geometry


def _tensor_specs(geometry: _Geometry, n_vocab: int) -> list[_TensorSpec]:
    """The llama tensors in file order, shaped as src/models/llama.cpp creates them."""
    g = geometry
    specs = [
        _TensorSpec("token_embd.weight", (n_vocab, g.n_embd), is_norm=False),
        _TensorSpec("output_norm.weight", (g.n_embd,), is_norm=True),
        _TensorSpec("output.weight", (n_vocab, g.n_embd), is_norm=False),
    ]
    for i in range(g.n_layer):
        blk = f"blk.{i}"
        specs += [
            _TensorSpec(f"{blk}.attn_norm.weight", (g.n_embd,), is_norm=True),
            _TensorSpec(f"{blk}.attn_q.weight", (g.head_dim * g.n_head, g.n_embd), is_norm=False),
            _TensorSpec(f"{blk}.attn_k.weight", (g.n_embd_kv, g.n_embd), is_norm=False),
            _TensorSpec(f"{blk}.attn_v.weight", (g.n_embd_kv, g.n_embd), is_norm=False),
            _TensorSpec(
                f"{blk}.attn_output.weight", (g.n_embd, g.head_dim * g.n_head), is_norm=False
            ),
            _TensorSpec(f"{blk}.ffn_norm.weight", (g.n_embd,), is_norm=True),
            _TensorSpec(f"{blk}.ffn_gate.weight", (g.n_ff, g.n_embd), is_norm=False),
            _TensorSpec(f"{blk}.ffn_down.weight", (g.n_embd, g.n_ff), is_norm=False),
            _TensorSpec(f"{blk}.ffn_up.weight", (g.n_ff, g.n_embd), is_norm=False),
        ]
    return specs


def _random_weight(
    seed: int, index: int, shape: tuple[int, ...], dtype: type[np.floating[Any]]
) -> npt.NDArray[Any]:
    """N(0, 0.02) values for tensor ``index``, independent of every other tensor's."""
    rng = np.random.default_rng([seed, index])
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        stop = min(start + _CHUNK, flat.size)
        block = rng.standard_normal(stop - start, dtype=np.float32)
        block *= _WEIGHT_STD
        flat[start:stop] = block
    return out


def _tensor_data(
    spec: _TensorSpec, index: int, seed: int, dtype: type[np.floating[Any]]
) -> npt.NDArray[Any]:
    if spec.is_norm:
        # llama.cpp keeps 1-D tensors in f32 (convert_hf_to_gguf does the same).
        return np.ones(spec.shape, dtype=np.float32)
    return _random_weight(seed, index, spec.shape, dtype)


@dataclass(frozen=True)
class _KeyValue:
    key: str
    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None


def _read_tokenizer(vocab_path: Path) -> tuple[tuple[_KeyValue, ...], int]:
    """Every ``tokenizer.ggml.*`` key of ``vocab_path``, in file order, and the vocab size."""
    stat = vocab_path.stat()
    return _read_tokenizer_cached(str(vocab_path.resolve()), stat.st_mtime_ns, stat.st_size)


# Parsing the 32000-entry vocabulary takes about a second, more than writing the tiny model;
# keyed on mtime and size so that an edited file is read again.
@functools.lru_cache(maxsize=4)
def _read_tokenizer_cached(
    path: str, mtime_ns: int, size: int
) -> tuple[tuple[_KeyValue, ...], int]:
    reader = gguf.GGUFReader(path)
    keys: list[_KeyValue] = []
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        keys.append(_KeyValue(key, _field_value(field), vtype, sub_type))
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(field.data)
    if n_vocab == 0:
        raise ArgumentError(f"{path} has no tokenizer.ggml.tokens array")
    return tuple(keys), n_vocab


def _field_value(field: Any) -> Any:
    """A reader field's value in the form GGUFWriter packs back to the same bytes."""
    string = gguf.GGUFValueType.STRING
    if field.types == [string]:
        # Raw bytes rather than str: copy the token text without a decode/encode round trip.
        return bytes(field.parts[-1].tobytes())
    if field.types == [gguf.GGUFValueType.ARRAY, string]:
        return tuple(bytes(field.parts[i].tobytes()) for i in field.data)
    value = field.contents()
    # Tuples, not lists: the cached value is shared between calls and must not change.
    return tuple(value) if isinstance(value, list) else value


def _write_gguf(
    path: Path,
    name: str,
    geometry: _Geometry,
    vocab_path: Path,
    seed: int,
    wtype: str,
    n_ctx_train: int,
    chat_template: str | None,
) -> None:
    dtype, file_type = _WTYPES[wtype]
    writer = gguf.GGUFWriter(path, arch="llama")
    try:
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        n_vocab = _add_metadata(writer, geometry, vocab_path, n_ctx_train, chat_template)
        specs = _tensor_specs(geometry, n_vocab)
        for spec in specs:
            spec_dtype = np.dtype(np.float32 if spec.is_norm else dtype)
            nbytes = int(np.prod(spec.shape)) * spec_dtype.itemsize
            writer.add_tensor_info(spec.name, spec.shape, spec_dtype, nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # One tensor in memory at a time: GGUFWriter.add_tensor would keep them all until the
        # final write_tensors_to_file.
        for index, spec in enumerate(specs):
            writer.write_tensor_data(_tensor_data(spec, index, seed, dtype))
        writer.flush()
        for fout in writer.fout or ():
            os.fsync(fout.fileno())
    finally:
        writer.close()


def _add_metadata(
    writer: gguf.GGUFWriter,
    geometry: _Geometry,
    vocab_path: Path,
    n_ctx_train: int,
    chat_template: str | None,
) -> int:
    """Add the llama hyperparameters and the tokenizer; return the vocabulary size."""
    tokenizer, n_vocab = _read_tokenizer(vocab_path)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(geometry.n_embd)
    writer.add_block_count(geometry.n_layer)
    writer.add_feed_forward_length(geometry.n_ff)
    writer.add_head_count(geometry.n_head)
    writer.add_head_count_kv(geometry.n_head_kv)
    writer.add_rope_dimension_count(geometry.head_dim)
    writer.add_rope_freq_base(_ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(_RMS_EPS)
    writer.add_vocab_size(n_vocab)
    for kv in tokenizer:
        writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return n_vocab


@contextlib.contextmanager
def _atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; publish it over ``target`` if the block succeeds.

    The block must write and fsync the temp file. On success it is renamed over ``target``
    and the directory is fsynced; on any exception it is removed and ``target`` is untouched.
    (llamaffi cannot use runtime.fsutil: the dependency only goes runtime -> llamaffi.)
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{_TMP_PREFIX}{target.name}.{secrets.token_hex(4)}")
    # Reserve the name with O_EXCL; GGUFWriter reopens it with "wb".
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m llamaffi.testing PATH [--preset P] [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m llamaffi.testing",
        description="Write a deterministic random-weight llama GGUF model.",
    )
    parser.add_argument("path", type=Path, help="output file (replaced atomically)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wtype", choices=sorted(_WTYPES), default="f16")
    parser.add_argument("--n-ctx-train", type=int, default=2048)
    for key in _GEOMETRY_KEYS:
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=int, default=None, help="override the preset"
        )
    parser.add_argument("--vocab", type=Path, default=None, help=f"default: ${VOCAB_ENV} or pin")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    try:
        path = make_model(
            args.path,
            preset=args.preset,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            n_head_kv=args.n_head_kv,
            n_ff=args.n_ff,
            vocab=args.vocab,
            seed=args.seed,
            wtype=args.wtype,
            n_ctx_train=args.n_ctx_train,
        )
    except (OSError, TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = path.stat().st_size
    print(f"{path}: {size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
