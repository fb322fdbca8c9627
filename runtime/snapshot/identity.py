"""What ties a KV blob to the context that can load it: :class:`CacheIdentity`."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamaffi import Context

_lock = threading.Lock()
#: per context, computed once: none of it can change while the context lives
_identities: weakref.WeakKeyDictionary[Any, CacheIdentity] = weakref.WeakKeyDictionary()
_build: list[int] = []


def _build_number() -> int:
    # llamaffi.build_info() parses the build string on every call; one process has one build.
    if not _build:
        import llamaffi

        _build.append(int(llamaffi.build_info()["build_number"]))
    return _build[0]


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that decides whether a KV blob can be loaded into a context."""

    build_number: int
    model_fingerprint: str  #: sha256 hex of the GGUF file
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_seq_max: int
    type_k: str
    type_v: str
    flash_attn: bool
    kv_unified: bool

    @property
    def v_trans(self) -> bool:
        """Whether V is stored transposed (llama.cpp does so when flash attention is off)."""
        return not self.flash_attn

    @classmethod
    def from_context(cls, ctx: Context) -> CacheIdentity:
        """The identity of a live context (and its model and llama.cpp build).

        Computed once per context and cached: none of it can change while the context lives.
        """
        with _lock:
            found = _identities.get(ctx)
        if found is None:
            found = cls._compute(ctx)
            with _lock:
                _identities[ctx] = found
        return found

    @classmethod
    def _compute(cls, ctx: Context) -> CacheIdentity:
        model = ctx.model
        return cls(
            build_number=_build_number(),
            model_fingerprint=str(model.fingerprint),
            n_layer=int(model.n_layer),
            n_embd=int(model.n_embd),
            n_head=int(model.n_head),
            n_head_kv=int(model.n_head_kv),
            n_seq_max=int(ctx.n_seq_max),
            type_k=str(ctx.type_k),
            type_v=str(ctx.type_v),
            flash_attn=bool(ctx.flash_attn),
            kv_unified=bool(ctx.kv_unified),
        )

    def differences(
        self, target: CacheIdentity, *, allow_build_mismatch: bool = False
    ) -> list[tuple[str, object, object]]:
        """List ``(field, self value, target value)`` for every field that must match.

        ``n_seq_max`` only matters for a non-unified cache (one KV stream per sequence).
        """
        names = [
            "model_fingerprint",
            "n_layer",
            "n_embd",
            "n_head",
            "n_head_kv",
            "type_k",
            "type_v",
            "flash_attn",
            "kv_unified",
        ]
        if not allow_build_mismatch:
            names.insert(0, "build_number")
        if not (self.kv_unified and target.kv_unified):
            names.append("n_seq_max")
        out: list[tuple[str, object, object]] = []
        for name in names:
            mine, theirs = getattr(self, name), getattr(target, name)
            if mine != theirs:
                out.append((name, mine, theirs))
        return out
