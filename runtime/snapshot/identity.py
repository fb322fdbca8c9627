"""What ties a KV blob to the context that can load it: :class:`CacheIdentity`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamaffi import Context


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

        Computed once per context and cached (:func:`identity_of`): none of it can change
        while the context lives.
        """
        from runtime.snapshot.live import identity_of

        return identity_of(ctx)

    @classmethod
    def _compute(cls, ctx: Context) -> CacheIdentity:
        from runtime.snapshot.live import _build_number

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
