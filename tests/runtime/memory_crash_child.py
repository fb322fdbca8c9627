"""Child process for the kill -9 test: add memories forever, printing each id after commit.

Usage: python memory_crash_child.py DIR START. Prints ``ready`` once the store is open, then
one ``<id>\t<text>`` line per acknowledged add, flushed before the next add starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.longterm import MemoryStore
from tests.runtime.memory_helpers import HashEmbedder


def main() -> None:
    directory, start = sys.argv[1], int(sys.argv[2])
    # save often, so that kills also land in the middle of index saves
    store = MemoryStore(directory, HashEmbedder(), save_every=7)  # type: ignore[arg-type]
    print("ready", flush=True)
    i = start
    while True:
        if i % 5 == 4:
            texts = [f"batch item {i}-{j}" for j in range(3)]
            ids = store.add_many(texts, kind="turn", session=f"s{i % 3}")
        else:
            texts = [f"memory number {i}"]
            ids = [store.add(texts[0], importance=(i % 10) / 10)]
        for item_id, text in zip(ids, texts, strict=True):
            sys.stdout.write(f"{item_id}\t{text}\n")
        sys.stdout.flush()
        i += 1


if __name__ == "__main__":
    main()
