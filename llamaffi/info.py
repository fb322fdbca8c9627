"""Build and runtime information: ``python -m llamaffi info``."""

from __future__ import annotations

import importlib.resources
import tomllib
from pathlib import Path
from typing import Any


def _pin() -> dict[str, Any]:
    """The pin installed with the package (``llamaffi/lib/pin.toml``), else the checkout's."""
    candidates = [
        Path(str(importlib.resources.files("llamaffi") / "lib" / "pin.toml")),
        Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "pin.toml",
    ]
    for path in candidates:
        try:
            with path.open("rb") as f:
                return tomllib.load(f)
        except OSError:
            continue
    return {}


def collect() -> dict[str, Any]:
    """Everything ``python -m llamaffi info`` prints, as a dict (loads libllama)."""
    from llamaffi import __version__
    from llamaffi._backend import ensure_backend
    from llamaffi._capi import backend
    from llamaffi._lib import build_info, library_path

    ensure_backend()
    built = build_info()
    pin = _pin()
    devices = []
    for i in range(backend.ggml_backend_dev_count()):
        dev = backend.ggml_backend_dev_get(i)
        if dev:
            name = backend.ggml_backend_dev_name(dev).decode()
            desc = backend.ggml_backend_dev_description(dev).decode()
            devices.append(f"{name} ({desc})")
    backends = []
    for i in range(backend.ggml_backend_reg_count()):
        reg = backend.ggml_backend_reg_get(i)
        if reg:
            backends.append(backend.ggml_backend_reg_name(reg).decode())
    return {
        "llamaffi": __version__,
        "build_number": built.get("build_number", pin.get("upstream", {}).get("build_number")),
        "commit": built.get("commit", pin.get("upstream", {}).get("commit")),
        "pin": built.get("pin", pin.get("sdist", {})),
        "library": str(library_path()),
        "ggml_native": built.get("ggml_native"),
        "ggml_cuda": built.get("ggml_cuda"),
        "compiler": built.get("compiler"),
        "system_info": backend.llama_print_system_info().decode().strip(),
        "backends": backends,
        "devices": devices,
        "max_parallel_sequences": int(backend.llama_max_parallel_sequences()),
        "supports_gpu_offload": bool(backend.llama_supports_gpu_offload()),
        "supports_mmap": bool(backend.llama_supports_mmap()),
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`collect`."""
    pin = info.get("pin") or {}
    lines = [
        f"llamaffi        {info['llamaffi']}",
        f"llama.cpp       b{info['build_number']} ({info['commit']})",
        f"pin             {pin.get('package')}=={pin.get('version')} sha256:{pin.get('sha256')}",
        f"library         {info['library']}",
        f"build options   GGML_NATIVE={info['ggml_native']} GGML_CUDA={info['ggml_cuda']} "
        f"({info['compiler']})",
        f"cpu features    {info['system_info']}",
        f"backends        {', '.join(info['backends']) or '-'}",
        f"devices         {'; '.join(info['devices']) or '-'}",
        f"gpu offload     {info['supports_gpu_offload']}",
        f"max sequences   {info['max_parallel_sequences']}",
    ]
    return "\n".join(lines)
