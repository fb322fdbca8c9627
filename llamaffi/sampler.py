"""The Pythonic sampler: a llama.cpp sampler chain built step by step."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from llamaffi._capi import _types, backend, sampler
from llamaffi.errors import ArgumentError, ClosedError, LlamaError

if TYPE_CHECKING:
    from llamaffi.context import Context


class Sampler:
    """A chain of samplers, applied in the order they were added.

    Example::

        s = Sampler().penalties(model.n_vocab, 64, 1.1).top_k(40).top_p(0.95).temp(0.8).dist(42)
        token = s.sample(ctx)

    The chain must end with a selecting sampler (:meth:`greedy` or :meth:`dist`).
    """

    def __init__(self) -> None:
        params = backend.llama_sampler_chain_default_params()
        params.no_perf = True
        ptr = sampler.llama_sampler_chain_init(params)
        if not ptr:
            raise LlamaError(
                "could not create a sampler chain", function="llama_sampler_chain_init"
            )
        self._ptr: int | None = ptr
        self._finalizer = weakref.finalize(self, sampler.llama_sampler_free, ptr)
        self.steps: list[str] = []

    @classmethod
    def greedy(cls) -> Sampler:
        """A chain with only the argmax sampler."""
        return cls().add_greedy()

    def _handle(self) -> int:
        if self._ptr is None:
            raise ClosedError("sampler is closed")
        return self._ptr

    def _add(self, name: str, child: int | None) -> Sampler:
        chain = self._handle()
        if not child:
            raise LlamaError(
                f"could not create the {name} sampler", function=f"llama_sampler_init_{name}"
            )
        sampler.llama_sampler_chain_add(chain, child)  # the chain owns it from here
        self.steps.append(name)
        return self

    def add_greedy(self) -> Sampler:
        """Pick the most likely token."""
        return self._add("greedy", sampler.llama_sampler_init_greedy())

    def dist(self, seed: int = _types.LLAMA_DEFAULT_SEED) -> Sampler:
        """Pick at random from the distribution, with ``seed`` (reproducible unless default)."""
        if not 0 <= seed <= 0xFFFFFFFF:
            raise ArgumentError("seed must fit in uint32")
        return self._add("dist", sampler.llama_sampler_init_dist(seed))

    def temp(self, t: float) -> Sampler:
        """Divide logits by ``t`` (``t <= 0`` keeps only the best token)."""
        return self._add("temp", sampler.llama_sampler_init_temp(t))

    def top_k(self, k: int) -> Sampler:
        """Keep the ``k`` best tokens."""
        if k < 0:
            raise ArgumentError("k must be >= 0")
        return self._add("top_k", sampler.llama_sampler_init_top_k(k))

    def top_p(self, p: float, min_keep: int = 1) -> Sampler:
        """Keep the smallest set of tokens whose probability reaches ``p``."""
        if not 0.0 <= p <= 1.0:
            raise ArgumentError("p must be in [0, 1]")
        return self._add("top_p", sampler.llama_sampler_init_top_p(p, min_keep))

    def min_p(self, p: float, min_keep: int = 1) -> Sampler:
        """Drop tokens less likely than ``p`` times the best one."""
        if not 0.0 <= p <= 1.0:
            raise ArgumentError("p must be in [0, 1]")
        return self._add("min_p", sampler.llama_sampler_init_min_p(p, min_keep))

    def penalties(
        self,
        n_vocab: int,
        last_n: int = 64,
        repeat: float = 1.0,
        freq: float = 0.0,
        present: float = 0.0,
    ) -> Sampler:
        """Repetition/frequency/presence penalties over the last ``last_n`` accepted tokens.

        ``n_vocab`` is the model's vocabulary size (:attr:`Model.n_vocab`).
        """
        if n_vocab <= 0:
            raise ArgumentError("n_vocab must be > 0")
        if repeat <= 0:
            raise ArgumentError("repeat penalty must be > 0 (1.0 disables it)")
        return self._add(
            "penalties",
            sampler.llama_sampler_init_penalties(n_vocab, last_n, repeat, freq, present),
        )

    def sample(self, ctx: Context, idx: int = -1) -> int:
        """Sample a token from output ``idx`` of ``ctx``'s last decode, and accept it."""
        chain = self._handle()
        if not self.steps or self.steps[-1] not in ("greedy", "dist"):
            raise LlamaError("the chain must end with greedy() or dist()")
        ctx.check_output(idx)
        return int(sampler.llama_sampler_sample(chain, ctx._handle(), idx))

    def accept(self, token: int) -> None:
        """Record ``token`` as chosen (for penalties) without sampling."""
        sampler.llama_sampler_accept(self._handle(), token)

    def reset(self) -> None:
        """Forget accepted tokens and reseed."""
        sampler.llama_sampler_reset(self._handle())

    def close(self) -> None:
        """Free the chain. Safe to call more than once."""
        self._ptr = None
        self._finalizer()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
