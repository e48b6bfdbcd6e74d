"""Query-stream benchmark: single queries from many blocking threads and from many asyncio tasks, one worker.

    python bench/lane.py [--model tests/data/tiny-bge-m3] [--seconds 15] [--path celery,lane]

Each client shape runs ``--seconds``: ``--threads`` threads of blocking ``Client.encode_queries([q])``, then
``--tasks`` asyncio tasks in one event loop of ``await client.aencode_queries([q])``. Prints q/s, p50, p99,
the client's CPU per query (``time.process_time`` of this process), the worker's (/proc of its pid) and the
most threads this process had. ``--path celery`` is a Celery-native caller's path: each query an
``m3q.encode_queries`` task sent with ``app.send_task`` to the query queue and waited for with Celery's ``get``,
one thread per await (``asyncio.to_thread``); ``--path lane`` is ``encode_queries`` / ``aencode_queries`` on
the query stream. Last, the in-process rate of the same encoder (its device loop, ``--threads`` threads, no
queue) for the ratio.

The worker's CPU is split by its threads: the query stream's reader and writer (the queue's own cost), the
device loop (the forward pass and its batching) and the rest; Redis's own CPU comes from ``INFO cpu``.

``--ceiling`` sizes the most queries one worker can ever serve, however fast its device: the TEST-ONLY
stand-in encoder with no forward pass (``M3Q_MODEL=test-stand-in:sleep-us-per-token=0``, which loads only
with ``M3Q_TESTING=1``: the benchmark's workers set it) behind the real query stream, ``--tasks`` asyncio
tasks. Its tokenizer is a hash of each word, not the checkpoint's.
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
from typing import Any, Awaitable, Callable

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import bench_settings, percentile, proc_cpu, redis_cpu, start_workers, stat_cpu, threads_shape  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.contract import redis_conn, wire  # noqa: E402
from worker import threads  # noqa: E402

CEILING_MODEL = "test-stand-in:sleep-us-per-token=0"
"""``--ceiling``'s encoder: no forward pass at all, so what is left is the queue's own cost."""


@dataclass
class Shape:
    """What one client shape measured."""

    name: str
    latencies: list[float]
    seconds: float
    client_cpu_s: float
    worker_cpu_s: dict[str, float]
    redis_cpu_s: float
    threads: int

    def line(self) -> str:
        n = max(1, len(self.latencies))
        ms = {part: seconds / n * 1e3 for part, seconds in self.worker_cpu_s.items()}
        return (f"{self.name:<44} {len(self.latencies) / self.seconds:8.1f} q/s  "
                f"p50 {statistics.median(self.latencies) * 1e3:7.1f} ms  "
                f"p99 {percentile(self.latencies, 99) * 1e3:7.1f} ms  threads {self.threads}\n"
                f"{'':<4}CPU per query: client {self.client_cpu_s / n * 1e3:.3f} ms, "
                f"worker {sum(ms.values()):.3f} ms (query stream {ms['stream']:.3f}, "
                f"device loop {ms['device']:.3f}, torch's threads {ms['torch']:.3f}, rest {ms['rest']:.3f}), "
                f"Redis {self.redis_cpu_s / n * 1e3:.3f} ms")


class Meter:
    """CPU seconds of this process (the clients), the worker (by thread: :func:`worker_threads_cpu`) and Redis,
    and this process's most threads, from start to stop."""

    def __init__(self, worker_pid: int, redis: Any) -> None:
        self.worker, self.redis = worker_pid, redis
        self.most_threads = threading.active_count()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)  # sleeps nearly all the time

    def _cpu(self) -> tuple[float, dict[str, float], float]:
        return time.process_time(), worker_threads_cpu(self.worker), redis_cpu(self.redis)

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
        self.client_s, self.redis_s = end[0] - self.start[0], end[2] - self.start[2]
        self.worker_s = {part: end[1][part] - self.start[1][part] for part in end[1]}


def worker_threads_cpu(pid: int) -> dict[str, float]:
    """A worker's CPU seconds so far, by the OS names of its threads (:mod:`worker.threads`): ``stream`` (the
    query stream's reader and writer: the queue's own cost), ``device`` (the device loop's own thread: the
    forward pass's Python and its batching), ``torch`` (torch's intra-op threads: they inherit the device
    loop's name, and are told from it by starting later) and ``rest`` (Celery's main thread, the heartbeat,
    threads that ended)."""
    parts = dict.fromkeys(("stream", "device", "torch", "rest"), 0.0)
    live, device = 0.0, []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, stat = (task / "comm").read_text().strip(), task / "stat"
            seconds, started = stat_cpu(stat, children=False), _started(stat)
        except OSError:  # the thread ended meanwhile: its time is in the process's total
            continue
        live += seconds
        if name == threads.DEVICE:
            device.append((started, int(task.name), seconds))
        else:
            parts["stream" if name in (threads.STREAM_READER, threads.STREAM_WRITER) else "rest"] += seconds
    for i, (_, _, seconds) in enumerate(sorted(device)):  # the first to start is the device loop's
        parts["torch" if i else "device"] += seconds
    parts["rest"] += max(0.0, proc_cpu(pid) - live)
    return parts


def _started(stat: Path) -> int:
    # Field 22 of /proc/PID/task/TID/stat, after the command name in parentheses: when the thread started.
    return int(stat.read_text().rsplit(")", 1)[1].split()[19])


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
        shapes, r = [], redis_conn.redis_client(s)
        measures = [(f"{path}: {args.threads} threads, blocking", lambda: threads_shape(
                        blocking, texts, args.threads, args.seconds)),
                    (f"{path}: {args.tasks} asyncio tasks, one loop", lambda: tasks_shape(
                        awaitable, texts, args.tasks, args.seconds))]
        for name, measure in measures[1:] if args.ceiling else measures:
            with Meter(worker.proc.pid, r) as meter:
                latencies = measure()
            shapes.append(Shape(name, latencies, args.seconds, meter.client_s, meter.worker_s, meter.redis_s,
                                meter.most_threads))
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
    p.add_argument("--ceiling", action="store_true",
                   help=f"one worker's ceiling: the TEST-ONLY stand-in encoder at zero cost ({CEILING_MODEL}) "
                        "behind the real query stream, --tasks asyncio tasks (sets --model and --path lane)")
    args = p.parse_args(argv)
    texts = corpus.queries(500)
    if args.ceiling:
        args.model, args.path = CEILING_MODEL, "lane"
        run_path(args, "lane", texts)
        return 0
    shapes = [shape for path in args.path.split(",") for shape in run_path(args, path.strip(), texts)]
    rate = in_process_rate(args, texts)
    for shape in shapes:
        print(f"{shape.name}: {len(shape.latencies) / shape.seconds / rate:.2f}x the in-process rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
