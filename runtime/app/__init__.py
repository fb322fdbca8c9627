"""The memory runtime as one object: :class:`Runtime`.

An application opens one runtime over a data directory and calls :meth:`Runtime.chat`::

    with Runtime.open("data", model="smollm2") as rt:
        reply = rt.chat("alice", "My dog is called Biscuit.")
        print(reply.text)

The runtime owns the directory's layout (``journals/``, ``kv/`` (chunked checkpoints),
``snapshots/`` (whole-sequence snapshots, with ``chunked=False``), ``longterm/``, one
``runtime.lock`` naming the holder's pid), the model and its context, the session pool, the
long-term memory store and the embedder. It recovers by itself: a session that is asked for
is resumed from its newest valid snapshot plus the journal, and long-term memory catches up
with any turn a crash kept from it.

One turn of :meth:`Runtime.chat`, in order:

1. retrieve long-term memories for this session and global ones, skipping items whose turns
   are still in the session's KV window (the model already sees them);
2. render the user turn with the GGUF's own chat template, the memories just before the
   user's text (never in the system prompt, so the KV prefix stays reusable);
3. **journal the user turn (fsynced)**, with exactly the tokens about to be decoded, then
   decode only those tokens: the prefix already in the KV is never re-prefilled;
4. generate, streaming through ``on_token``; stop at end-of-generation, the template's
   end-of-turn and the caller's ``stop`` strings;
5. journal the reply (exactly the tokens decoded);
6. write the user turn into long-term memory (a near-duplicate is not stored twice);
7. checkpoint by policy: only the KV state copy happens on this thread, the write goes to a
   background writer.

Retrieval and rendering read only, so journalling after them loses nothing: what the user
was told is saved is always in the journal, and the journal is the truth for both memories.
"""

from runtime.app.facade import Runtime
from runtime.app.options import (
    CHUNK_DIR,
    DEDUP_SIMILARITY,
    DEFAULT_SYSTEM_PROMPT,
    LOCK_NAME,
    LONGTERM_DIR,
    MARK_EVERY,
    MAX_EMBED_TEXTS,
    MAX_STOP_STRINGS,
    MAX_TEXT_CHARS,
    MEMORY_PREFIX,
    MIN_SIMILARITY,
    QUESTION_PREFIX,
    SNAPSHOT_DIR,
    STATS_FILE,
    MemoryUsed,
    Reply,
    Sampling,
)
from runtime.app.stats import read_stats
from runtime.errors import RuntimeArgumentError, RuntimeClosedError
from runtime.session import JOURNAL_DIR, ContextFullError

__all__ = [
    "CHUNK_DIR",
    "DEDUP_SIMILARITY",
    "DEFAULT_SYSTEM_PROMPT",
    "JOURNAL_DIR",
    "LOCK_NAME",
    "LONGTERM_DIR",
    "MARK_EVERY",
    "MAX_EMBED_TEXTS",
    "MAX_STOP_STRINGS",
    "MAX_TEXT_CHARS",
    "MEMORY_PREFIX",
    "MIN_SIMILARITY",
    "QUESTION_PREFIX",
    "SNAPSHOT_DIR",
    "STATS_FILE",
    "ContextFullError",
    "MemoryUsed",
    "Reply",
    "Runtime",
    "RuntimeArgumentError",
    "RuntimeClosedError",
    "Sampling",
    "read_stats",
]
