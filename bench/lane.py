"""Query-stream benchmark: single queries from many blocking threads and from many asyncio tasks, one worker.

    python bench/lane.py [--model tests/data/tiny-bge-m3] [--seconds 15] [--path celery,lane]

Each client shape runs ``--seconds``: ``--threads`` threads of blocking ``Client.encode_queries([q])``, then
``--tasks`` asyncio tasks in one event loop of ``await client.aencode_queries([q])``. Prints q/s, p50, p99,
the client's CPU per query (``time.process_time`` of this process), the worker's (/proc of its pid) and the
most threads this process had. ``--path celery`` is a Celery-native caller's path: each query an
``m3q.encode_queries`` task sent with ``app.send_task`` to the query queue and waited for with Celery's ``get``,
one thread per await (``asyncio.to_thread``); ``--path lane`` is ``encode_queries`` / ``aencode_queries`` on
the query stream. Last, the
in-process rate of the same encoder (its device loop, ``--threads`` threads, no queue) for the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import bench_settings, percentile, start_workers, threads_shape  # noqa: E402
from bench.load import _proc_cpu  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.contract import wire  # noqa: E402


@dataclass
class Shape:
    """What one client shape measured."""

    name: str
    latencies: list[float]
    seconds: float
    client_cpu_s: float
    worker_cpu_s: float
    threads: int

    def line(self) -> str:
        n = max(1, len(self.latencies))
        return (f"{self.name:<44} {len(self.latencies) / self.seconds:8.1f} q/s  "
                f"p50 {statistics.median(self.latencies) * 1e3:7.1f} ms  "
                f"p99 {percentile(self.latencies, 99) * 1e3:7.1f} ms  "
                f"client CPU {self.client_cpu_s / n * 1e3:5.2f} ms/q  "
                f"worker CPU {self.worker_cpu_s / n * 1e3:5.2f} ms/q  "
                f"threads {self.threads}")


class Meter:
    """Client and worker CPU seconds and this process's most threads, from start to stop."""

    def __init__(self, worker_pid: int | None) -> None:
        self.worker = worker_pid
        self.most_threads = threading.active_count()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)  # sleeps nearly all the time

    def _cpu(self) -> tuple[float, float]:
        return time.process_time(), _proc_cpu(self.worker) if self.worker else 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.most_threads = max(self.most_threads, threading.active_count() - 1)  # less the sampler

    def __enter__(self) -> "Meter":
        self.start = self._cpu()
        self._sampler.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sampler.join()
        end = self._cpu()
        self.client_s, self.worker_s = end[0] - self.start[0], end[1] - self.start[1]


def tasks_shape(ask: Callable[[str], Awaitable[object]], texts: list[str], n: int, seconds: float) -> list[float]:
    """Latencies of ``n`` asyncio tasks in one loop each awaiting one query at a time for ``seconds``."""
    latencies: list[float] = []

    async def run(seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await ask(rng.choice(texts))
            latencies.append(time.perf_counter() - started)

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(run(i, deadline) for i in range(n)))

    asyncio.run(main())
    return latencies


def askers(client: Client, path: str) -> tuple[Callable, Callable]:
    """(blocking, awaitable) single-query calls of ``path``."""
    if path == "lane":
        return (lambda q: client.encode_queries([q])), (lambda q: client.aencode_queries([q]))
    # A Celery-native caller: an ordinary task on the query queue, its result read from the backend.
    queue = wire.query_queue(client.settings)

    def old(q: str) -> list:
        result = client.app.send_task(wire.TASK_ENCODE_QUERIES, args=[{"texts": [q]}], queue=queue)
        return [wire.decode_item(d) for d in result.get(timeout=60)["items"]]
    return old, (lambda q: asyncio.to_thread(old, q))


def run_path(args, path: str, texts: list[str]) -> list[Shape]:
    s = bench_settings(model=args.model, dtype=args.dtype)
    (worker,) = start_workers(s, 1, args.device)
    try:
        client = Client(s)
        blocking, awaitable = askers(client, path)
        [blocking(t) for t in texts[:20]]  # warm: connections, the worker's first steps
        shapes = []
        for name, measure in ((f"{path}: {args.threads} threads, blocking", lambda: threads_shape(
                                  blocking, texts, args.threads, args.seconds)),
                              (f"{path}: {args.tasks} asyncio tasks, one loop", lambda: tasks_shape(
                                  awaitable, texts, args.tasks, args.seconds))):
            with Meter(worker.proc.pid) as meter:
                latencies = measure()
            shapes.append(Shape(name, latencies, args.seconds, meter.client_s, meter.worker_s, meter.most_threads))
            print(shapes[-1].line(), flush=True)
    finally:
        worker.stop()
    return shapes


def in_process_rate(args, texts: list[str]) -> float:
    """Single queries per second through the same encoder's device loop in this process (no queue)."""
    from worker.encoder import Encoder, Limits
    from worker.engine import Engine

    engine = Engine(Encoder.load(args.model, args.device, args.dtype, Limits()))
    try:
        [engine.encode([t], "queries") for t in texts[:20]]
        latencies = threads_shape(lambda q: engine.encode([q], "queries"), texts, args.threads, args.seconds)
    finally:
        engine.stop()
    rate = len(latencies) / args.seconds
    print(f"{'in-process device loop, ' + str(args.threads) + ' threads':<44} {rate:8.1f} q/s  "
          f"p50 {statistics.median(latencies) * 1e3:7.1f} ms", flush=True)
    return rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tests/data/tiny-bge-m3")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--tasks", type=int, default=256)
    p.add_argument("--path", default="celery,lane", help="celery, lane, or both (comma-separated)")
    args = p.parse_args(argv)
    texts = corpus.queries(500)
    shapes = [shape for path in args.path.split(",") for shape in run_path(args, path.strip(), texts)]
    rate = in_process_rate(args, texts)
    for shape in shapes:
        print(f"{shape.name}: {len(shape.latencies) / shape.seconds / rate:.2f}x the in-process rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
