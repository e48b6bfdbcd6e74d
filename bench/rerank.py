"""BGE-M3's three-signal rerank: through the queue against FlagEmbedding in-process, and search mode m3.

    m3q replica /tmp/replica-small --size small
    flock /tmp/m3q-cpu.lock python bench/rerank.py --model /tmp/replica-small [--passages 100] [--tokens 200]

Part 1, side by side in one run, the same checkpoint, device and dtype: one query and ``--passages``
passages of about ``--tokens`` tokens each, scored ``--rounds`` times (a new query each round) by
``Client.rerank`` through the queue (one worker) and by FlagEmbedding's ``BGEM3FlagModel.compute_score``
in this process (which encodes the query once per pair and scores every pair of its batch against every
other). Prints the median of each, their ratio, and the largest difference of their scores.

Part 2: ``Searcher.search`` p50 in modes ``hybrid`` and ``m3`` (recall ``--candidates``, then the rerank) over
``--docs`` documents in Milvus Lite (skip it with ``--no-search``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import bench_settings, start_workers  # noqa: E402
from producer import milvus_lite  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.contract.settings import Settings  # noqa: E402
from producer.devstack import free_port  # noqa: E402
from producer.rerank import RERANK_WEIGHTS  # noqa: E402


def passages(n: int, tokens: int, tokenizer, seed: int = 3) -> list[str]:
    """``n`` passages of about ``tokens`` tokens each (checked with the checkpoint's tokenizer)."""
    import random

    rng = random.Random(seed)
    words = corpus._WORDS
    texts = [" ".join(rng.choice(words) for _ in range(tokens)) for _ in range(n)]
    factor = tokens / (sum(len(ids) for ids in tokenizer.encode(texts)) / n)
    return [" ".join(t.split()[:max(1, int(len(t.split()) * factor))]) for t in texts]


def timed(call, rounds: int) -> tuple[list[float], object]:
    """Seconds of each round of ``call(round)``, and the last result."""
    times, result = [], None
    for r in range(rounds):
        started = time.perf_counter()
        result = call(r)
        times.append(time.perf_counter() - started)
    return times, result


def queue_vs_flag(s: Settings, args, texts: list[str], queries: list[str]) -> None:
    client = Client(s)
    client.rerank(queries[-1], texts)  # warm: connections, the worker's first steps at these lengths
    queue_s, ranked = timed(lambda r: client.rerank(queries[r], texts), args.rounds)
    from FlagEmbedding import BGEM3FlagModel

    flag = BGEM3FlagModel(s.model, use_fp16=False, devices=args.device, query_max_length=512,
                          passage_max_length=8192)
    pairs = lambda r: [(queries[r], t) for t in texts]  # noqa: E731
    flag.compute_score(pairs(-1), weights_for_different_modes=list(RERANK_WEIGHTS))  # warm
    flag_s, flag_scores = timed(lambda r: flag.compute_score(pairs(r), weights_for_different_modes=list(
        RERANK_WEIGHTS)), args.rounds)
    reference = flag_scores["colbert+sparse+dense"]
    worst = max(abs(score - reference[i]) for i, score in ranked)
    q, f = statistics.median(queue_s), statistics.median(flag_s)
    print(f"rerank {len(texts)} passages: queue p50 {q * 1e3:8.1f} ms (min {min(queue_s) * 1e3:.1f})   "
          f"FlagEmbedding compute_score p50 {f * 1e3:8.1f} ms (min {min(flag_s) * 1e3:.1f})   ratio {f / q:5.2f}x   "
          f"(max |score difference| {worst:.2g}; rounds {args.rounds})", flush=True)


def search_modes(s: Settings, args, encoder, queries: list[str]) -> None:
    from producer.search import Searcher

    docs = corpus.documents(args.docs, args.docs * 250, encoder.tokenizer)
    client = Client(s)
    client.index("bench_rerank", docs, [f"doc-{i}" for i in range(len(docs))])
    searcher = Searcher(s, client=client)
    recalled = [h.text for h in searcher.search(queries[0], "bench_rerank", mode="hybrid", k=s.rerank_candidates)]
    tokens = sum(len(x.ids) for x in encoder.prepare(recalled, "documents"))
    print(f"the {len(recalled)} candidates of one query hold {tokens:,} tokens", flush=True)
    for mode in ("hybrid", "m3"):
        searcher.search(queries[-1], "bench_rerank", mode=mode)  # warm
        times, _ = timed(lambda r: searcher.search(queries[r], "bench_rerank", mode=mode), args.rounds)
        print(f"search --mode {mode:<6} p50 {statistics.median(times) * 1e3:8.1f} ms   "
              f"(N={s.rerank_candidates} candidates for m3; {len(docs)} documents; rounds {args.rounds})", flush=True)
    searcher.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. an `m3q replica`)")
    p.add_argument("--dtype", default="float32", help="the worker's; FlagEmbedding runs float32 (use_fp16=False)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--passages", type=int, default=100)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--docs", type=int, default=300)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--no-search", action="store_true")
    args = p.parse_args(argv)
    from worker.encoder import Encoder

    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    s = bench_settings(model=model, dtype=args.dtype, device=args.device, rerank_candidates=args.candidates)
    encoder = Encoder.load(model, "cpu", "float32")
    texts = passages(args.passages, args.tokens, encoder.tokenizer)
    queries = corpus.queries(args.rounds + 1)
    tokens = sum(len(x.ids) for x in encoder.prepare(texts, "documents")) / len(texts)
    print(f"model {args.model}, {args.device}, {args.dtype}; {len(texts)} passages of {tokens:.0f} tokens on "
          "average", flush=True)
    with tempfile.TemporaryDirectory(prefix="m3q-bench-rerank-") as tmp:
        with milvus_lite.LiteServer(Path(tmp) / "milvus", free_port()) as server:
            s = s.replace(milvus_uri=server.uri)
            workers = start_workers(s, 1, args.device)
            try:
                queue_vs_flag(s, args, texts, queries)
                if not args.no_search:
                    search_modes(s, args, encoder, queries)
            finally:
                for w in workers:
                    w.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
