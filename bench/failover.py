"""Redis Sentinel: what a failover costs, and what Sentinel costs when nothing fails.

    python bench/failover.py [--model tests/data/tiny-bge-m3] [--seconds 30] [--gap-docs 30000] [--docs 5000]
                             [--rounds 2]

A local Sentinel stack (a primary, a replica, three Sentinels: producer.devstack.SentinelStack, failing over
after ``down-after-milliseconds`` 1000) and Milvus Lite.

1. The gap: two workers; single queries from ``--threads`` blocking threads and ``--tasks`` asyncio tasks for
   ``--seconds``, and an index of ``--gap-docs`` documents (enough to outlast the kill), while the primary
   is SIGKILLed a third of the way in. Prints the Sentinels' failover (the kill to a new primary that
   answers as one), the query gap (the kill to the first answer to a query sent after it), the longest time
   without any answer, the index gap (the kill to the first batch stored after it), and every error.
2. The steady cost: one worker on a fresh stack, reached through the Sentinels and directly
   (``redis://`` to the same primary), alternated ``--rounds`` times: both query shapes (q/s) and an index
   of ``--docs`` documents (docs/s).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import bench_settings, start_workers, threads_shape  # noqa: E402
from bench.lane import tasks_shape  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.contract.settings import Settings  # noqa: E402
from producer.devstack import SentinelStack, free_port  # noqa: E402
from producer.milvus_lite import start_lite_server, stop_lite_server  # noqa: E402

MASTER = "m3qbench"


class Timeline:
    """(sent, answered) of every query, the time of every stored batch, and every error."""

    def __init__(self) -> None:
        self.queries: list[tuple[float, float]] = []
        self.batches: list[float] = []
        self.errors: list[str] = []

    def ask(self, call) -> None:
        sent = time.monotonic()
        try:
            call()
            self.queries.append((sent, time.monotonic()))
        except Exception as e:  # noqa: BLE001 - counted and printed
            self.errors.append(f"{type(e).__name__}: {e}")

    async def aask(self, call) -> None:
        sent = time.monotonic()
        try:
            await call()
            self.queries.append((sent, time.monotonic()))
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{type(e).__name__}: {e}")


def load(s: Settings, timeline: Timeline, seconds: float, threads: int, tasks: int, docs: list[str]) -> None:
    """Queries from threads and tasks, and one index, all at once, for ``seconds`` (the index may run longer)."""
    client, texts = Client(s), corpus.queries(500)
    ids = [f"doc-{i}" for i in range(len(docs))]
    def index() -> None:
        try:
            client.index("failover_" + uuid.uuid4().hex[:8], docs, ids,
                         progress=lambda n: timeline.batches.append(time.monotonic()))
        except Exception as e:  # noqa: BLE001 - counted and printed
            timeline.errors.append(f"index: {type(e).__name__}: {e}")
    indexer = threading.Thread(target=index)
    indexer.start()

    async def one_task(n: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            await timeline.aask(lambda: client.aencode_queries([texts[n % len(texts)]]))

    async def all_tasks() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(one_task(n, deadline) for n in range(tasks)))
        await client.aclose()

    loop = threading.Thread(target=asyncio.run, args=(all_tasks(),))
    loop.start()
    threads_shape(lambda q: timeline.ask(lambda: client.encode_queries([q])), texts, threads, seconds)
    loop.join()
    indexer.join()
    client.close()


def gap(args, folder: Path, milvus_uri: str, docs: list[str]) -> None:
    stack = SentinelStack(folder / "gap", master=MASTER).start()
    s = bench_settings(model=args.model, broker_url=stack.url(), sentinel_master=MASTER, milvus_uri=milvus_uri)
    workers = start_workers(s, 2)
    timeline, failover = Timeline(), {}

    def kill() -> None:
        old = stack.kill_primary()
        failover["killed"] = time.monotonic()
        stack.wait_failover(old)
        failover["promoted"] = time.monotonic()
    killer = threading.Timer(args.seconds / 3, kill)
    try:
        killer.start()
        load(s, timeline, args.seconds, args.threads, args.tasks, docs)
        killer.join()
    finally:
        [w.stop() for w in workers]
        stack.stop()
    report_gap(timeline, failover["killed"], failover["promoted"])


def report_gap(timeline: Timeline, killed: float, promoted: float) -> None:
    answered = sorted(done for _sent, done in timeline.queries)
    first_after = min((done for sent, done in timeline.queries if sent > killed), default=float("nan"))
    longest = max((b - a for a, b in zip(answered, answered[1:])), default=float("nan"))
    batch_after = min((t for t in timeline.batches if t > killed), default=float("nan"))
    print(f"failover (kill to a new primary):            {promoted - killed:6.2f} s")
    print(f"query gap (kill to first answer sent after):  {first_after - killed:6.2f} s")
    print(f"longest time without an answer:              {longest:6.2f} s")
    print(f"index gap (kill to next batch stored):       {batch_after - killed:6.2f} s")
    print(f"queries answered: {len(answered)}; batches stored: {len(timeline.batches)}; "
          f"errors: {len(timeline.errors)}")
    for error in timeline.errors[:10]:
        print("  error:", error[:300])


def steady(args, folder: Path, milvus_uri: str, docs: list[str]) -> None:
    stack = SentinelStack(folder / "steady", master=MASTER).start()
    urls = {"sentinel": stack.url(), "direct": f"redis://127.0.0.1:{stack.primary().port}/0"}
    s = bench_settings(model=args.model, broker_url=urls["sentinel"], sentinel_master=MASTER, milvus_uri=milvus_uri)
    (worker,) = start_workers(s, 1)
    texts, rows = corpus.queries(500), {name: [] for name in urls}
    try:
        for _ in range(args.rounds):
            for name, url in urls.items():
                client = Client(s.replace(broker_url=url))
                [client.encode_queries([t]) for t in texts[:20]]
                threaded = len(threads_shape(lambda q: client.encode_queries([q]), texts, args.threads,
                                             args.seconds)) / args.seconds
                tasked = len(tasks_shape(lambda q: client.aencode_queries([q]), texts, args.tasks,
                                         args.seconds)) / args.seconds
                started = time.monotonic()
                client.index("steady_" + uuid.uuid4().hex[:8], docs, [f"d{i}" for i in range(len(docs))])
                indexed = len(docs) / (time.monotonic() - started)
                client.close()
                rows[name].append((threaded, tasked, indexed))
                print(f"{name:<9} {args.threads} threads {threaded:8.1f} q/s   {args.tasks} tasks {tasked:8.1f} q/s"
                      f"   index {indexed:7.1f} docs/s", flush=True)
    finally:
        worker.stop()
        stack.stop()
    for column, what in enumerate(("threads", "tasks", "index")):
        mean = {name: statistics.mean(r[column] for r in rows[name]) for name in rows}
        ratio = mean["sentinel"] / mean["direct"]
        print(f"{what}: sentinel / direct = {ratio:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tests/data/tiny-bge-m3")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--tasks", type=int, default=256)
    p.add_argument("--docs", type=int, default=5000, help="documents of each steady-state index")
    p.add_argument("--gap-docs", type=int, default=30000, help="documents of the index the kill interrupts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", choices=["gap", "steady"], default=None)
    args = p.parse_args(argv)
    texts = corpus.queries(max(args.docs, args.gap_docs), seed=3)
    docs = [f"document {i}: {text}" for i, text in enumerate(texts)]
    folder = Path(tempfile.mkdtemp(prefix="m3q-failover-"))
    milvus = start_lite_server(str(folder / "milvus"), port := free_port())
    try:
        if args.only in (None, "gap"):
            gap(args, folder, f"http://127.0.0.1:{port}", docs[:args.gap_docs])
        if args.only in (None, "steady"):
            steady(args, folder, f"http://127.0.0.1:{port}", docs[:args.docs])
    finally:
        stop_lite_server(milvus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
