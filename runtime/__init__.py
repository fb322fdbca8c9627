"""The memory runtime: short-term (KV snapshots) and long-term (embedded items) memory.

One module per concept: :mod:`runtime.snapshot` (file format), :mod:`runtime.store`
(crash-safe snapshot directory), :mod:`runtime.embed` (ONNX MiniLM embedder),
:mod:`runtime.index` (persisted hnswlib index), :mod:`runtime.memory` (long-term memory store),
:mod:`runtime.fsutil` (atomic files and locks), :mod:`runtime.cli` (command line).
"""

__all__: list[str] = []
