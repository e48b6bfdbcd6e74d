"""Encoder benchmark: the reference BGE-M3 implementation against m3-queue's encoder.

    m3q replica /tmp/replica-small --size small
    python bench/encoder.py --model /tmp/replica-small [--device cpu] [--rounds 2] [--reference pymilvus|flag]

Three paths on the same checkpoint, interleaved in one process so that a noisy machine hurts them alike:
(a) the reference, float32 (``use_fp16=False``, ``passage_max_length=8192``); (b) this encoder in float32;
(c) this encoder in bfloat16 on cpu, float16 on cuda. On cuda a fourth, (a16), is the reference with
``use_fp16=True``, what GPU users of the reference run; (c) is then also compared with it.
The reference is pymilvus' BGEM3EmbeddingFunction (default) or, with ``--reference flag``, FlagEmbedding's
BGEM3FlagModel called directly as pymilvus calls it (batches of 16; queries one at a time, at the
passage length). Prints documents/s, tokens/s and single-query p50 latency, each also as a ratio to (a),
and the largest deviation of each path from (a).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# the repo root, not bench/ (bench/queue.py would shadow the stdlib)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import corpus  # noqa: E402
from worker.encoder import Encoder, Limits  # noqa: E402


def reference_path(model: str, device: str, reference: str = "pymilvus", fp16: bool = False):
    """(encode documents, encode one query) through the reference: pymilvus or FlagEmbedding directly."""
    if reference == "flag":
        return flag_path(model, device, fp16)
    from pymilvus.model.hybrid import BGEM3EmbeddingFunction

    ef = BGEM3EmbeddingFunction(model_name=model, device=device, use_fp16=fp16, passage_max_length=8192)

    def docs(texts):
        out = ef.encode_documents(texts)
        m = out["sparse"]
        rows = [dict(zip(m.indices[m.indptr[i]:m.indptr[i + 1]].tolist(), m.data[m.indptr[i]:m.indptr[i + 1]].tolist()))
                for i in range(m.shape[0])]
        return _pack(out["dense"], rows)
    return docs, lambda q: ef.encode_queries([q])


def flag_path(model: str, device: str, fp16: bool = False):
    """(encode documents, encode one query) through FlagEmbedding's BGEM3FlagModel, with pymilvus' settings."""
    from FlagEmbedding import BGEM3FlagModel

    flag = BGEM3FlagModel(model, devices=device, use_fp16=fp16, passage_max_length=8192)

    def encode(texts):
        return flag.encode(texts, batch_size=16, return_dense=True, return_sparse=True, return_colbert_vecs=False)

    def docs(texts):
        out = encode(texts)
        return _pack(out["dense_vecs"], [{int(k): float(v) for k, v in w.items()} for w in out["lexical_weights"]])
    return docs, lambda q: encode([q])


def our_path(model: str, device: str, dtype: str, max_batch_tokens: int):
    """(encode documents, encode one query) through m3-queue's encoder."""
    enc = Encoder.load(model, device, dtype, Limits(max_batch_tokens=max_batch_tokens))
    def docs(texts):
        items = enc.encode(texts, "documents").items
        return _pack([i.dense for i in items], [i.sparse_dict() for i in items])
    return docs, lambda q: enc.encode([q], "queries"), enc


def _pack(dense, sparse):
    return np.stack([np.asarray(d, dtype=np.float32) for d in dense]), sparse


def deviation(ref, other) -> tuple[float, float, bool]:
    """(max |dense diff|, max |sparse weight diff| over shared ids, sparse id sets equal)."""
    dense = float(np.abs(ref[0] - other[0]).max())
    weights, same = 0.0, True
    for a, b in zip(ref[1], other[1]):
        same &= set(a) == set(b)
        weights = max([weights] + [abs(a[k] - b[k]) for k in a.keys() & b.keys()])
    return dense, weights, same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. an `m3q replica`)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--tokens", type=int, default=130_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--skip-reference", action="store_true", help="only our paths (ratios then unavailable)")
    p.add_argument("--reference", choices=("pymilvus", "flag"), default="pymilvus",
                   help="pymilvus' BGEM3EmbeddingFunction, or FlagEmbedding's BGEM3FlagModel directly")
    args = p.parse_args(argv)

    low = "bfloat16" if args.device == "cpu" else "float16"
    paths = {}
    if not args.skip_reference:
        paths["(a) reference fp32"] = reference_path(args.model, args.device, args.reference)
        if args.device.startswith("cuda"):
            paths["(a16) reference fp16"] = reference_path(args.model, args.device, args.reference, fp16=True)
    b_docs, b_query, enc = our_path(args.model, args.device, "float32", args.max_batch_tokens)
    paths["(b) m3q float32"] = (b_docs, b_query)
    c_docs, c_query, _ = our_path(args.model, args.device, low, args.max_batch_tokens)
    paths[f"(c) m3q {low}"] = (c_docs, c_query)

    docs = corpus.documents(args.docs, args.tokens, enc.tokenizer)
    queries = corpus.queries(args.queries)
    tokens = sum(len(p.ids) for p in enc.prepare(docs, "documents"))
    print(f"corpus: {len(docs)} documents, {tokens:,} tokens (longest "
          f"{max(len(p.ids) for p in enc.prepare(docs, 'documents')):,}); {len(queries)} single queries; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          f"{' (' + torch.cuda.get_device_name(args.device) + ')' if args.device.startswith('cuda') else ''}; "
          f"reference {'none' if args.skip_reference else args.reference}")

    for _, (run_docs, run_query) in paths.items():  # warm-up: first calls pay one-off costs
        run_docs(docs[:8])
        run_query(queries[0])

    seconds = {name: [] for name in paths}
    outputs = {}
    for r in range(args.rounds):
        for name, (run_docs, _) in paths.items():
            started = time.perf_counter()
            outputs[name] = run_docs(docs)
            seconds[name].append(time.perf_counter() - started)
            print(f"  round {r + 1}: {name:<22} {seconds[name][-1]:7.2f} s", flush=True)

    latency = {name: [] for name in paths}
    for q in queries:
        for name, (_, run_query) in paths.items():
            started = time.perf_counter()
            run_query(q)
            latency[name].append(time.perf_counter() - started)

    report(paths, seconds, latency, outputs, len(docs), tokens)
    return 0


def report(paths, seconds, latency, outputs, n_docs, tokens) -> None:
    names = list(paths)
    ref = names[0] if names[0].startswith("(a)") else None
    best = {n: min(seconds[n]) for n in names}
    p50 = {n: statistics.median(latency[n]) * 1000 for n in names}
    p99 = {n: float(np.percentile(latency[n], 99)) * 1000 for n in names}
    print(f"\n{'path':<22} {'docs/s':>8} {'tokens/s':>9} {'x ref':>6} {'query p50 ms':>13} {'x ref':>6} {'p99 ms':>7}"
          f"  max dev from (a): dense / sparse / same ids")
    for n in names:
        speed = best[ref] / best[n] if ref else float("nan")
        lat = p50[n] / p50[ref] if ref else float("nan")
        dev = deviation(outputs[ref], outputs[n]) if ref else (float("nan"),) * 3
        print(f"{n:<22} {n_docs / best[n]:8.1f} {tokens / best[n]:9.0f} {speed:6.2f} {p50[n]:13.2f} {lat:6.2f} "
              f"{p99[n]:7.2f}  {dev[0]:.1e} / {dev[1]:.1e} / {dev[2]}")
    ref16 = next((n for n in names if n.startswith("(a16)")), None)
    for n in names if ref16 else ():  # our low-precision path against the reference's fp16
        if n.startswith("(c)"):
            dev = deviation(outputs[ref16], outputs[n])
            print(f"{n} against {ref16}: x ref16 {best[ref16] / best[n]:.2f} (speed), query p50 x ref16 "
                  f"{p50[n] / p50[ref16]:.2f}; max dev dense / sparse / same ids "
                  f"{dev[0]:.1e} / {dev[1]:.1e} / {dev[2]}")


if __name__ == "__main__":
    sys.exit(main())
