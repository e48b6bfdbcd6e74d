"""Indexing benchmark: a file indexed end to end (file -> producer -> Redis -> worker -> Milvus Lite) against
the encoder alone (in-process ``Encoder.encode`` on the same documents, same dtype).

    m3q replica /tmp/replica-small --size small
    python bench/index.py --model /tmp/replica-small [--dtype float32] [--docs 300] [--rounds 3]

It starts its own Milvus Lite server (on a free port, data in a temporary folder) and one worker subprocess,
on a fresh queue prefix of the Redis in M3Q_BROKER_URL. Rounds alternate the two paths so that a noisy
machine hurts both alike, after one untimed pass of each; the best round of each is reported (on a
shared 2-core machine single rounds vary by 2x or more). Prints documents/s and tokens/s of both and
their ratio (target >= 0.9).

    python bench/index.py --model /tmp/replica-small --docs 2000 --rerun

times instead the same file indexed twice into a new collection: the first run encodes every document, the
second finds them stored unchanged and skips them all (it checks both).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import bench_settings, start_workers  # noqa: E402
from producer import milvus_lite  # noqa: E402
from producer.contract import milvus  # noqa: E402
from producer.contract.settings import Settings  # noqa: E402
from producer.indexing import index_file  # noqa: E402
from worker.runtime import load_encoder  # noqa: E402

WARMUP_DOCS = 8
"""Documents indexed into each round's collection before its clock starts (this creates the collection)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. an `m3q replica`)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--docs", type=int, default=300)
    p.add_argument("--tokens", type=int, default=30_000, help="total tokens of the corpus (about)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rerun", action="store_true", help="Time a first and a second run of the same file instead")
    args = p.parse_args(argv)

    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model  # the worker's too
    s = bench_settings(model=model, dtype=args.dtype, device=args.device)
    encoder = load_encoder(s)
    docs = corpus.documents(args.docs, args.tokens, encoder.tokenizer)
    tokens = sum(len(p.ids) for p in encoder.prepare(docs, "documents"))
    print(f"corpus: {len(docs)} documents, {tokens:,} tokens; model {args.model}, {args.device}, {args.dtype}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="m3q-bench-index-") as tmp:
        source = _write(Path(tmp) / "docs.jsonl", docs, "doc")
        warmup = _write(Path(tmp) / "warmup.jsonl", docs[:WARMUP_DOCS], "warmup")
        with milvus_lite.LiteServer(Path(tmp) / "milvus", _free_port()) as server:
            s = s.replace(milvus_uri=server.uri)
            workers = start_workers(s, 1, args.device)
            try:
                if args.rerun:
                    return _rerun(s, source, len(docs))
                alone_s, e2e_s = _rounds(s, encoder, docs, source, warmup, args.rounds)
            finally:
                for w in workers:
                    w.stop()
    _report(len(docs), tokens, min(alone_s), min(e2e_s))
    return 0


def _rerun(s: Settings, source: Path, n_docs: int) -> int:
    """Index ``source`` twice into a new collection: seconds of each run, each run's report checked."""
    times = []
    for run, expected in (("first", (n_docs, 0)), ("second", (0, n_docs))):
        started = time.perf_counter()
        report = index_file(s, source, "bench_index_rerun", progress=False)
        times.append(time.perf_counter() - started)
        if (report.stored, report.skipped) != expected:
            raise RuntimeError(f"{run} run: stored {report.stored}, skipped {report.skipped}, expected {expected}")
        print(f"  {run} run: {times[-1]:7.2f} s   stored {report.stored}, skipped {report.skipped} (unchanged)",
              flush=True)
    print(f"second run / first run: {times[1] / times[0]:.3f}")
    return 0


def _rounds(s: Settings, encoder, docs: list[str], source: Path, warmup: Path, rounds: int) -> tuple[list, list]:
    """Seconds of each round of each path, after one untimed pass of each; checks every document was stored."""
    mc = milvus.connect(s)
    print("  warm-up: one untimed pass of each path", flush=True)
    encoder.encode(docs, "documents")  # the first pass over each shape pays one-off allocation costs
    _index_round(s, mc, source, warmup, "bench_index_warmup", len(docs))
    alone_s, e2e_s = [], []
    for r in range(rounds):
        for path in ("alone", "e2e") if r % 2 else ("e2e", "alone"):  # alternate which goes first
            if path == "e2e":
                e2e_s.append(_index_round(s, mc, source, warmup, f"bench_index_{r}", len(docs)))
            else:
                started = time.perf_counter()
                encoder.encode(docs, "documents")
                alone_s.append(time.perf_counter() - started)
        print(f"  round {r + 1}: end to end {e2e_s[-1]:7.2f} s   encoder alone {alone_s[-1]:7.2f} s   "
              f"ratio {alone_s[-1] / e2e_s[-1]:.3f}", flush=True)
    mc.close()
    return alone_s, e2e_s


def _index_round(s: Settings, mc, source: Path, warmup: Path, collection: str, n_docs: int) -> float:
    """Seconds to index ``source`` into ``collection`` (created beforehand by indexing ``warmup``)."""
    index_file(s, warmup, collection, progress=False)
    started = time.perf_counter()
    report = index_file(s, source, collection, progress=False)
    seconds = time.perf_counter() - started
    stored = milvus.count(mc, collection)
    if report.stored != n_docs or stored != n_docs + WARMUP_DOCS:
        raise RuntimeError(f"{collection}: stored {report.stored} ({stored} rows in Milvus) of {n_docs}:\n"
                           f"{report.summary()}")
    return seconds


def _write(path: Path, docs: list[str], prefix: str) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"{prefix}-{i}", "text": text}) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _report(n_docs: int, tokens: int, alone_s: float, e2e_s: float) -> None:
    print(f"\n{'path':<40} {'docs/s':>8} {'tokens/s':>9}")
    print(f"{'encoder alone (in-process)':<40} {n_docs / alone_s:8.1f} {tokens / alone_s:9.0f}")
    print(f"{'end to end (file -> queue -> Milvus)':<40} {n_docs / e2e_s:8.1f} {tokens / e2e_s:9.0f}")
    print(f"ratio end to end / encoder alone: {alone_s / e2e_s:.3f} (target >= 0.9)")


if __name__ == "__main__":
    sys.exit(main())
