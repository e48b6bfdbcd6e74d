"""Queue benchmark: the same documents through producer -> Redis -> worker -> result backend, and in-process.

    python bench/queue.py --model /tmp/replica-small [--dtype float32] [--docs 200]

Prints the ratio of the two throughputs (target >= 0.95), and single-query round-trip latency through the
queue (p50, p99) beside the reference's in-process ``encode_queries`` latency (target: p50 at or below it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# the repo root, not bench/ (bench/queue.py would shadow the stdlib)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import corpus  # noqa: E402
from bench.infra import bench_settings, percentile, start_workers  # noqa: E402
from producer.client import Client  # noqa: E402
from worker.runtime import load_encoder  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--tokens", type=int, default=60_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-reference", action="store_true")
    args = p.parse_args(argv)

    s = bench_settings(model=args.model, dtype=args.dtype)
    encoder = load_encoder(s)
    docs = corpus.documents(args.docs, args.tokens, encoder.tokenizer)
    queries = corpus.queries(args.queries)
    workers = start_workers(s, 1)
    try:
        client = Client(s)
        client.encode(docs[:8], "documents")  # warm-up both paths
        encoder.encode(docs[:8], "documents")
        queue_s, local_s = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            client.encode(docs, "documents")
            queue_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            encoder.encode(docs, "documents")
            local_s.append(time.perf_counter() - started)
        latency = []
        for q in queries:
            started = time.perf_counter()
            client.encode_queries([q])
            latency.append(time.perf_counter() - started)
    finally:
        for w in workers:
            w.stop()
    ref = _reference_latency(args.model, queries) if not args.skip_reference else []
    print(f"{len(docs)} documents, {args.rounds} rounds, dtype {args.dtype}")
    print(f"through the queue: {len(docs) / min(queue_s):7.1f} docs/s   "
          f"in-process: {len(docs) / min(local_s):7.1f} docs/s"
          f"   ratio {min(local_s) / min(queue_s):.3f}  (target >= 0.95)")
    line = (f"single query through the queue: p50 {statistics.median(latency) * 1e3:.1f} ms  "
            f"p99 {percentile(latency, 99) * 1e3:.1f} ms")
    if ref:
        line += (f"   reference in-process encode_queries: p50 {statistics.median(ref) * 1e3:.1f} ms"
                 f"   ratio {statistics.median(latency) / statistics.median(ref):.2f} (target <= 1)")
    print(line)
    return 0


def _reference_latency(model: str, queries: list[str]) -> list[float]:
    from pymilvus.model.hybrid import BGEM3EmbeddingFunction

    ef = BGEM3EmbeddingFunction(model_name=model, device="cpu", use_fp16=False)
    ef.encode_queries([queries[0]])
    out = []
    for q in queries:
        started = time.perf_counter()
        ef.encode_queries([q])
        out.append(time.perf_counter() - started)
    return out


if __name__ == "__main__":
    sys.exit(main())
