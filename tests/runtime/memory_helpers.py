"""Test helpers for the long-term memory tests (also imported by the crash-test child).

:class:`HashEmbedder` maps each text to a fixed pseudo-random unit vector (seeded by its
sha256), so a text always finds itself with similarity 1.0 and nothing loads onnxruntime:
the store's durability tests run fast and do not depend on the model.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt


class HashEmbedder:
    """A deterministic stand-in for :class:`runtime.embed.Embedder`."""

    def __init__(self, dim: int = 32, model_id: str = "hash-test") -> None:
        self.dim = dim
        self.model_id = model_id
        self.max_length = 256

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out
