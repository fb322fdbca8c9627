"""The memory runtime as one object: :class:`Runtime`.

An application opens one runtime over a data directory and calls :meth:`Runtime.chat`::

    with Runtime.open("data", model="smollm2") as rt:
        reply = rt.chat("alice", "My dog is called Biscuit.")
        print(reply.text)

The runtime owns the directory's layout (:mod:`runtime.layout`: ``journals/``, ``kv/``
(chunked checkpoints), ``longterm/``, one ``runtime.lock`` naming the holder's pid), the model
and its context, and its parts: the session pool, the turn engine, long-term memory
(:class:`~runtime.app.recall.Recall`), the housekeeping thread and the stats. It recovers by
itself: a session that is asked for is resumed from its newest valid checkpoint plus the
journal, and long-term memory catches up with any turn a crash kept from it.

One turn of :meth:`Runtime.chat`, in order (the modules it passes through):

1. ``app.facade`` takes the lock and checks the arguments (``arguments``);
   ``session.pool`` resumes the session if it is not resident (``session.resume`` from
   ``chunks`` plus the ``journal``);
2. ``app.recall`` retrieves long-term memories (``longterm``) for this session and global
   ones, skipping items whose turns are still in the session's KV window;
3. ``app.turn`` renders the user turn with the GGUF's own chat template (``template``), the
   memories just before the user's text, and makes room (``session.session``);
4. **the user turn is journalled (fsynced)** (``journal``) with exactly the tokens about to
   be decoded, then only those are decoded: the prefix already in the KV is never
   re-prefilled;
5. the reply is generated (an ``app.batching.Generation``: sample, decode, stop), stepped
   by ``app.batching``'s batcher in one decode with every other session generating now,
   streaming through ``on_token``, and journalled (exactly the tokens decoded);
6. ``app.recall`` writes the user turn into long-term memory (the one ingest path, behind a
   watermark; a near-duplicate is not stored twice);
7. ``session.checkpointer`` checkpoints by policy: only the KV state copy happens on this
   thread, the write goes to the background writer.

Retrieval and rendering read only, so journalling after them loses nothing: what the user
was told is saved is always in the journal, and the journal is the truth for both memories.
"""

from runtime.app.facade import Runtime
from runtime.app.options import (
    DEDUP_SIMILARITY,
    DEFAULT_SYSTEM_PROMPT,
    MEMORY_PREFIX,
    MIN_SIMILARITY,
    QUESTION_PREFIX,
    RuntimeConfig,
)
from runtime.app.stats import read_stats
from runtime.app.turn import MemoryUsed, Reply
from runtime.arguments import MAX_EMBED_TEXTS, MAX_STOP_STRINGS, MAX_TEXT_CHARS, Sampling
from runtime.errors import (
    ContextFullError,
    RuntimeArgumentError,
    SessionLeasedError,
    SessionLimitError,
    SessionNotFoundError,
)

__all__ = [
    "DEDUP_SIMILARITY",
    "DEFAULT_SYSTEM_PROMPT",
    "MAX_EMBED_TEXTS",
    "MAX_STOP_STRINGS",
    "MAX_TEXT_CHARS",
    "MEMORY_PREFIX",
    "MIN_SIMILARITY",
    "QUESTION_PREFIX",
    "ContextFullError",
    "MemoryUsed",
    "Reply",
    "Runtime",
    "RuntimeArgumentError",
    "RuntimeConfig",
    "Sampling",
    "SessionLeasedError",
    "SessionLimitError",
    "SessionNotFoundError",
    "read_stats",
]
