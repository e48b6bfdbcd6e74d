"""Load benchmark: many single queries, queries during a bulk index, and scaling across workers.

    python bench/load.py queries --model /tmp/replica-small [--clients 32] [--seconds 60] [--in-process]
    python bench/load.py bulk    --model /tmp/replica-small [--seconds 60]
    python bench/load.py scaling [--workers 1,2,4,8] [--us-per-token 100]
    python bench/load.py engine  --model /tmp/replica-small [--device cpu] [--preempt-ms 0,25]

``queries``: concurrent clients each send one query at a time, with cross-job batching on and then off;
prints throughput, p50 and p99, and the p99 of one query on an idle worker. ``--in-process`` sends them
straight to the device loop, without the queue: what the device alone allows.
``bulk``: the same single queries while the same worker encodes long documents (1,000 to 8,000 tokens);
prints query p50/p99 against the idle p99.
``scaling``: the queue's own scaling with the TEST-ONLY stand-in encoder that sleeps per token (so this
2-core machine's CPU is not what is measured): 1, 2, 4 and 8 workers, throughput against K x one worker's.
``engine``: ``bulk`` without the queue: the device loop in-process, with document steps sliced
(``M3Q_PREEMPT_MS``) and whole; shows what the slicing itself does to query latency and bulk throughput.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import bench_settings, percentile, proc_cpu, redis_cpu, start_workers, threads_shape  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.contract.redis_conn import redis_client  # noqa: E402


def query_load(client: Client, clients: int, seconds: float, texts: list[str]) -> list[float]:
    """Latencies of single queries sent by ``clients`` threads, one at a time each, for ``seconds``."""
    return threads_shape(lambda q: client.encode_queries([q]), texts, clients, seconds)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _line(name: str, latencies: list[float], seconds: float) -> str:
    return (f"{name:<34} {len(latencies) / seconds:8.1f} q/s   p50 {statistics.median(latencies) * 1e3:7.1f} ms"
            f"   p99 {percentile(latencies, 99) * 1e3:7.1f} ms")


class InProcess:
    """The device loop without the queue (``--in-process``): what the device alone allows."""

    def __init__(self, args, batching: bool) -> None:
        from worker.encoder import Encoder, Limits
        from worker.engine import Engine

        self.engine = Engine(Encoder.load(args.model, args.device, args.dtype, Limits()), cross_job_batching=batching)

    def encode_queries(self, texts: list[str]):
        return self.engine.encode(texts, "queries")

    def stop(self) -> None:
        self.engine.stop()


class CpuSeconds:
    """CPU seconds used since creation by the clients (this process), the worker processes and Redis: where
    the queue's own cost per query goes, on a machine where all of them share the cores."""

    def __init__(self, workers: list, s=None) -> None:
        self.pids = [w.proc.pid for w in workers if hasattr(w, "proc")]
        self.redis = redis_client(s) if s is not None else None
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        if not self.pids:  # in-process: clients and device loop share this process
            return {"this process": proc_cpu(os.getpid())}
        now = {"clients": proc_cpu(os.getpid()), "worker": sum(proc_cpu(p) for p in self.pids)}
        if self.redis is not None:
            now["redis"] = redis_cpu(self.redis)
        return now

    def since(self) -> dict[str, float]:
        return {k: v - self.start[k] for k, v in self._now().items()}


def cmd_queries(args) -> None:
    texts = corpus.queries(500)
    results = {}
    for batching in (True, False):
        if args.in_process:
            client = InProcess(args, batching)
            workers = [client]
        else:
            s = bench_settings(model=args.model, dtype=args.dtype, cross_job_batching=batching)
            workers = start_workers(s, 1, args.device)
            client = Client(s)
        try:
            [client.encode_queries([t]) for t in texts[:10]]
            idle = [_timed(lambda: client.encode_queries([t])) for t in texts[:100]]
            cpu = CpuSeconds(workers, s if not args.in_process else None)
            loaded = query_load(client, args.clients, args.seconds, texts)
            cpu = cpu.since()
        finally:
            [w.stop() for w in workers]
        results[batching] = loaded
        print(_line(f"idle, one query at a time (batching {'on' if batching else 'off'})", idle, sum(idle)))
        print(_line(f"{args.clients} clients, batching {'on' if batching else 'off'}", loaded, args.seconds))
        print("  CPU ms per query: " + ", ".join(f"{k} {v / len(loaded) * 1e3:.2f}" for k, v in cpu.items()))
        if batching:
            idle_p99 = percentile(idle, 99)
    on, off = results[True], results[False]
    print(f"throughput with batching / without: {len(on) / max(1, len(off)):.2f}x (target >= 4)")
    print(f"p99 with batching / idle p99: {percentile(on, 99) / idle_p99:.2f}x (target <= 2)")


def cmd_bulk(args) -> None:
    texts = corpus.queries(500)
    s = bench_settings(model=args.model, dtype=args.dtype)
    workers = start_workers(s, 1, args.device)
    try:
        client = Client(s)
        idle = [_timed(lambda: client.encode_queries([t])) for t in texts[:100]]
        rng = random.Random(3)
        long_docs = [" ".join(corpus.queries(rng.randint(60, 500), seed=i)) for i in range(400)]
        stop = threading.Event()

        def bulk() -> None:
            for start in range(0, len(long_docs), 8):
                if stop.is_set():
                    return
                client.encode(long_docs[start:start + 8], "documents")

        indexer = threading.Thread(target=bulk)
        indexer.start()
        time.sleep(2)
        during = query_load(client, 1, args.seconds, texts)
        stop.set()
        indexer.join()
    finally:
        [w.stop() for w in workers]
    print(_line("idle worker", idle, sum(idle)))
    print(_line("during a bulk encode of long docs", during, args.seconds))
    print(f"p99 during bulk / idle p99: {percentile(during, 99) / percentile(idle, 99):.2f}x (target <= 3)")


def cmd_engine(args) -> None:
    from worker.encoder import Encoder, Limits
    from worker.engine import Engine

    encoder = Encoder.load(args.model, args.device, args.dtype, Limits())
    texts = corpus.queries(500)
    rng = random.Random(3)
    docs = [" ".join(corpus.queries(rng.randint(60, 500), seed=i)) for i in range(args.docs // 50 or 8)]
    tokens = sum(len(p.ids) for p in encoder.prepare(docs))
    for preempt_ms in [float(x) for x in args.preempt_ms.split(",")]:
        engine = Engine(encoder, preempt_ms=preempt_ms)
        [engine.encode([t], "queries") for t in texts[:20]]
        idle = [_timed(lambda: engine.encode([t], "queries")) for t in texts[:100]]
        started = time.perf_counter()
        jobs = [engine.submit(docs[i:i + 8], "documents") for i in range(0, len(docs), 8)]
        during = []
        while not all(j.done() for j in jobs):
            during.append(_timed(lambda: engine.encode([rng.choice(texts)], "queries")))
            time.sleep(0.01)
        bulk_s = time.perf_counter() - started
        engine.stop()
        print(f"preempt {preempt_ms:g} ms: bulk {tokens / bulk_s:9.0f} tok/s ({len(docs)} docs, {tokens:,} tokens, "
              f"{bulk_s:.1f} s, {len(during)} queries served meanwhile)")
        print("  " + _line("idle", idle, sum(idle)))
        print("  " + _line("during bulk", during, bulk_s))
        print(f"  p99 during bulk / idle p99: {percentile(during, 99) / percentile(idle, 99):.2f}x", flush=True)


def cmd_scaling(args) -> None:
    model = f"test-stand-in:sleep-us-per-token={args.us_per_token:g}"
    docs = [" ".join(["token"] * 200)] * args.docs
    base = None
    for k in [int(x) for x in args.workers.split(",")]:
        s = bench_settings(model=model, job_texts=16, max_in_flight=4 * k)
        workers = start_workers(s, k)
        try:
            client = Client(s)
            client.encode(docs[:32], "documents")
            started = time.perf_counter()
            client.encode(docs, "documents")
            rate = len(docs) / (time.perf_counter() - started)
        finally:
            [w.stop() for w in workers]
        base = base or rate
        print(f"{k} worker(s): {rate:8.1f} docs/s   {rate / base:5.2f}x one worker   "
              f"efficiency {rate / (k * base):.2f} (target >= 0.9)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["queries", "bulk", "scaling", "engine"])
    p.add_argument("--model", default="tests/data/tiny-bge-m3")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu", help="the worker's device (queries, bulk, engine)")
    p.add_argument("--preempt-ms", default="0,25", help="engine only: slice sizes to compare")
    p.add_argument("--in-process", action="store_true", help="queries only: the device loop without the queue")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--us-per-token", type=float, default=100)
    p.add_argument("--docs", type=int, default=2000)
    args = p.parse_args(argv)
    {"queries": cmd_queries, "bulk": cmd_bulk, "scaling": cmd_scaling, "engine": cmd_engine}[args.scenario](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
