"""Write tests/data/golden.npz: FlagEmbedding's own BGE-M3 output on the tiny checkpoint, the reference
that tests/test_encoder.py compares our encoder against without needing FlagEmbedding installed.

Run by hand (not collected by pytest), from the repository root, with FlagEmbedding 1.4.2 installed:

    .venv/bin/python tests/make_golden.py            # writes tests/data/golden.npz
    .venv/bin/python tests/make_golden.py OUT.npz    # somewhere else

It runs ``BGEM3FlagModel(tests/data/tiny-bge-m3, use_fp16=False, devices="cpu", passage_max_length=8192,
query_max_length=512)`` in float32 on the fixed texts below: documents through ``encode_corpus`` (max length
8192) and queries through ``encode_queries`` (max length 512; one query is longer, so truncation matters),
each list as ONE call, i.e. one padded mixed-length batch, with dense, sparse and ColBERT outputs.

Layout of the file (all arrays; no pickles), for KIND in ``documents`` and ``queries``:

- ``KIND_texts``: the texts (unicode array), ``KIND_max_length``: the max length used;
- ``KIND_dense``: float32 [N, hidden];
- ``KIND_sparse_ids`` int64 / ``KIND_sparse_weights`` float32, concatenated over texts, each text's slice
  given by ``KIND_sparse_offsets`` [N + 1] (ids sorted ascending within a text);
- ``KIND_colbert``: float32 [sum of rows, hidden], sliced by ``KIND_colbert_offsets`` [N + 1];
- ``versions``: "FlagEmbedding=..", "transformers=..", "torch=..".

Regenerate it only when the tiny checkpoint or the texts change; never from our own encoder.
"""
from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-bge-m3"
OUT = ROOT / "tests" / "data" / "golden.npz"

# Sentences in several scripts; the long texts below are built from them deterministically.
SENTENCES = [
    "The small library at the end of our street opens at nine in the morning.",
    "Die Bibliothek am Ende unserer Straße öffnet um neun Uhr morgens.",
    "Библиотека в конце нашей улицы открывается в девять часов утра.",
    "我们街道尽头的小图书馆早上九点开门。",
    "私たちの通りの端にある小さな図書館は朝九時に開きます。",
    "تفتح المكتبة الصغيرة في نهاية شارعنا في الساعة التاسعة صباحا.",
    "हमारी गली के अंत में छोटा पुस्तकालय सुबह नौ बजे खुलता है।",
    "Each worker takes a batch of texts from the queue 🚀 and writes the results back ✅.",
]


def long_text(n_sentences: int, offset: int = 0) -> str:
    """A deterministic multilingual text of about 20 tokens per sentence."""
    return " ".join(f"{SENTENCES[(i + offset) % len(SENTENCES)]} ({i})" for i in range(n_sentences))


DOCUMENTS = [
    "Hello world",
    SENTENCES[0],
    SENTENCES[1],
    SENTENCES[2],
    SENTENCES[3],
    SENTENCES[4],
    SENTENCES[5],
    SENTENCES[6],
    "🚀🌍✨ launch day! 🎉🎉",
    "a",
    "Hi",
    "?",
    "𓀀𓀁𓀂",  # only unknown characters: '▁' plus <unk>
    "know𓀀𓀁",  # '▁know' plus <unk>; '▁know' gets a negative sparse pre-activation: an empty sparse vector
    " ".join(SENTENCES),  # ~150 tokens
    long_text(40, offset=3),  # > 512 tokens: past the query limit, within the document limit
    " ".join(f"Paragraph {i}. {SENTENCES[0]} {SENTENCES[7]}" for i in range(70)),  # ~3000 tokens, English
]

QUERIES = [
    "library opening hours",
    "Wann öffnet die Bibliothek?",
    "Когда открывается библиотека?",
    "图书馆几点开门?",
    "図書館は何時に開きますか?",
    "متى تفتح المكتبة؟",
    "पुस्तकालय कब खुलता है?",
    "🚀 queue workers?",
    "a",
    "know𓀀𓀁",
    long_text(45, offset=1),  # > 512 tokens: truncated to 512
]


def pack(rows: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate variable-length rows; offsets[i]:offsets[i+1] is row i."""
    offsets = np.cumsum([0, *(len(r) for r in rows)]).astype(np.int64)
    flat = np.concatenate(rows).astype(dtype) if rows else np.zeros(0, dtype)
    return flat, offsets


def flag_outputs(model, kind: str, texts: list[str]) -> dict[str, np.ndarray]:
    """FlagEmbedding's dense, sparse and ColBERT outputs for one kind, packed into arrays."""
    run = model.encode_corpus if kind == "documents" else model.encode_queries
    max_length = 8192 if kind == "documents" else 512
    out = run(texts, max_length=max_length, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    ids, weights = [], []
    for lexical in out["lexical_weights"]:  # {str(token id): weight}
        pairs = sorted((int(k), float(v)) for k, v in lexical.items())
        ids.append(np.array([p[0] for p in pairs], np.int64))
        weights.append(np.array([p[1] for p in pairs], np.float32))
    sparse_ids, sparse_offsets = pack(ids, np.int64)
    sparse_weights, _ = pack(weights, np.float32)
    colbert = [np.asarray(c, np.float32) for c in out["colbert_vecs"]]
    colbert_flat = np.concatenate(colbert).astype(np.float32)
    colbert_offsets = np.cumsum([0, *(len(c) for c in colbert)]).astype(np.int64)
    return {
        f"{kind}_texts": np.array(texts, dtype=str),
        f"{kind}_max_length": np.array(max_length),
        f"{kind}_dense": np.asarray(out["dense_vecs"], np.float32),
        f"{kind}_sparse_ids": sparse_ids,
        f"{kind}_sparse_weights": sparse_weights,
        f"{kind}_sparse_offsets": sparse_offsets,
        f"{kind}_colbert": colbert_flat,
        f"{kind}_colbert_offsets": colbert_offsets,
    }


def main(argv: list[str]) -> int:
    import torch
    from FlagEmbedding import BGEM3FlagModel

    out_path = Path(argv[0]) if argv else OUT
    torch.manual_seed(0)
    model = BGEM3FlagModel(str(TINY), use_fp16=False, devices="cpu", passage_max_length=8192,
                           query_max_length=512)
    arrays = {**flag_outputs(model, "documents", DOCUMENTS), **flag_outputs(model, "queries", QUERIES)}
    arrays["versions"] = np.array([f"{name}={version(name)}" for name in ("FlagEmbedding", "transformers", "torch")])
    np.savez_compressed(out_path, **arrays)
    for kind, texts in (("documents", DOCUMENTS), ("queries", QUERIES)):
        lengths = [len(model.tokenizer(t)["input_ids"]) for t in texts]
        print(f"{kind}: {len(texts)} texts, untruncated token counts {lengths}")
    print(f"wrote {out_path} ({out_path.stat().st_size:,} bytes): {', '.join(arrays['versions'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
