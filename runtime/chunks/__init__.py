"""Chunked KV checkpoints (being split into one module per concept; see store.py)."""

from runtime.chunks.store import *  # noqa: F403
from runtime.chunks.store import __all__  # noqa: F401
