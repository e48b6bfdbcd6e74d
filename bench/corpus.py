"""The benchmarks' deterministic corpus: documents with log-normal token lengths, and short single queries."""
from __future__ import annotations

import random
from pathlib import Path

_CORPUS = Path(__file__).resolve().parent.parent / "worker" / "replica" / "corpus.txt"
_WORDS = _CORPUS.read_text(encoding="utf-8").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def documents(n: int = 400, target_tokens: int = 130_000, tokenizer=None, seed: int = 7,
              max_tokens: int = 8000) -> list[str]:
    """``n`` documents whose token lengths are log-normal and sum to about ``target_tokens``."""
    rng = random.Random(seed)
    lengths = [min(max_tokens, max(8, int(rng.lognormvariate(5.3, 0.9)))) for _ in range(n)]
    scale = target_tokens / sum(lengths)
    docs = [_text(rng, max(4, int(length * scale / 1.4))) for length in lengths]
    if tokenizer is not None:  # correct the words-per-token guess with the real tokenizer
        real = sum(len(ids) for ids in tokenizer.encode(docs))
        factor = target_tokens / real
        rng = random.Random(seed)
        docs = [_text(rng, max(4, int(len(d.split()) * factor))) for d in docs]
    return docs


def queries(n: int = 200, seed: int = 11) -> list[str]:
    """``n`` single queries of 4 to 16 words."""
    rng = random.Random(seed)
    return [_text(rng, rng.randint(4, 16)) + "?" for _ in range(n)]
