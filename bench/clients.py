"""The query stream, two checkouts against each other: one worker and client processes from each checkout, or
with ``--workers`` a worker from each and client processes of this checkout.

    python bench/clients.py BEFORE [AFTER] [--workers] [--shapes threads:32,tasks:256,threads:1,tasks:1]
                            [--seconds 6] [--rounds 3] [--model tests/data/tiny-bge-m3]

``BEFORE`` and ``AFTER`` (default: this checkout) are checkouts of m3-queue, e.g. a ``git worktree`` of the
commit before a change. One worker of this checkout serves every run, so only the client differs. Each shape
runs in a fresh client process of each checkout in the order before, after, after, before (the next round
the other way round), for ``--seconds`` each: on a shared machine, runs made this close together are the
ones that compare. ``threads:N`` is N threads of blocking ``Client.encode_queries([q])``, ``tasks:N`` N
asyncio tasks of ``await client.aencode_queries([q])`` on one loop. Prints each run, then per checkout and
shape the median q/s and the median CPU of the client process per query (``time.process_time``).

``--workers`` compares the worker side: both checkouts' workers run from the start, each on a queue prefix
of its own, and each run's client (this checkout's) asks one of them, in the same order. Each run also
prints the serving worker's CPU per query, split as ``bench/lane.py`` splits it: the query stream's threads
(the queue's own cost), the device loop, the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import Worker, bench_settings  # noqa: E402
from bench.lane import worker_threads_cpu  # noqa: E402

CLIENT = r"""
import asyncio, json, os, random, sys, threading, time
sys.path.insert(0, os.getcwd())
from producer.client import Client
from producer.contract.settings import Settings

prefix, shape, n, seconds, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
texts = json.load(sys.stdin)
client = Client(Settings.from_env(queue_prefix=prefix, model=model))
done = []

def threads():
    [client.encode_queries([t]) for t in texts[:20]]
    deadline = time.monotonic() + seconds
    def run(seed):
        rng, k = random.Random(seed), 0
        while time.monotonic() < deadline:
            client.encode_queries([rng.choice(texts)])
            k += 1
        done.append(k)
    workers = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    [w.start() for w in workers]
    [w.join() for w in workers]

async def tasks():
    [await client.aencode_queries([t]) for t in texts[:20]]
    deadline = time.monotonic() + seconds
    async def run(seed):
        rng, k = random.Random(seed), 0
        while time.monotonic() < deadline:
            await client.aencode_queries([rng.choice(texts)])
            k += 1
        done.append(k)
    await asyncio.gather(*(run(i) for i in range(n)))

cpu, wall = time.process_time(), time.perf_counter()
threads() if shape == "threads" else asyncio.run(tasks())
queries, cpu, wall = sum(done), time.process_time() - cpu, time.perf_counter() - wall
print(json.dumps({"qps": queries / wall, "cpu_ms": cpu / queries * 1e3, "queries": queries + 20}))
client.close()
"""


def run_client(tree: Path, prefix: str, shape: str, n: int, args, texts: list[str]) -> dict:
    """One client process of ``tree``: its figures (q/s, CPU per query). The warm-up counts in neither."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CLIENT, prefix, shape, str(n), str(args.seconds), args.model],
                         cwd=tree, env=env, input=json.dumps(texts), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"the client of {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured(tree: Path, worker: Worker, kind: str, n: int, args, texts: list[str]) -> dict:
    """One run of ``tree``'s client on ``worker``: the client's figures and the worker's CPU per query by part."""
    before = worker_threads_cpu(worker.pid)
    got = run_client(tree, worker.settings.queue_prefix, kind, n, args, texts)
    after = worker_threads_cpu(worker.pid)
    return {**got, **{part: (after[part] - before[part]) / got["queries"] * 1e3 for part in after}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path, nargs="?", default=Path(sys.path[0]))
    p.add_argument("--workers", action="store_true", help="compare the checkouts' workers, not their clients")
    p.add_argument("--shapes", default="threads:32,tasks:256,threads:1,tasks:1")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="tests/data/tiny-bge-m3")
    args = p.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "producer" / "client.py").is_file():
            p.error(f"{name}: {tree} is not a checkout of m3-queue (no producer/client.py)")
    shapes = [(kind, int(n)) for kind, n in (s.split(":") for s in args.shapes.split(","))]
    here = Path(sys.path[0])
    workers = {name: Worker(bench_settings(model=args.model), tree=trees[name] if args.workers else here)
               for name in (trees if args.workers else ["before"])}
    try:
        [w.wait_ready() for w in workers.values()]
        runs = compare(trees, workers, shapes, args, corpus.queries(500))
    finally:
        [w.stop() for w in workers.values()]
    print(f"\nbefore: {trees['before']}\nafter:  {trees['after']}")
    for (name, kind, n), got in runs.items():
        cpu = [g["cpu_ms"] for g in got]
        print(f"{kind + ':' + str(n):<12} {name:<6} median {statistics.median(g['qps'] for g in got):8.1f} q/s, client "
              f"{statistics.median(cpu):.3f} ms a query ({' '.join(f'{c:.3f}' for c in cpu)})")
        if args.workers:
            stream = [g["stream"] for g in got]
            print(f"{'':<19} worker: query stream {statistics.median(stream):.3f} ms a query "
                  f"({' '.join(f'{c:.3f}' for c in stream)}), device loop "
                  f"{statistics.median(g['device'] for g in got):.3f} ms")
    return 0


def compare(trees: dict[str, Path], workers: dict[str, Worker], shapes: list[tuple[str, int]], args,
            texts: list[str]) -> dict[tuple[str, str, int], list[dict]]:
    """Every shape's runs, alternated between the checkouts: their clients on one worker, or (``--workers``)
    this checkout's client on their workers."""
    runs: dict[tuple[str, str, int], list[dict]] = {}
    for kind, n in shapes:
        for r in range(args.rounds):
            for name in ("before", "after", "after", "before")[::1 if r % 2 == 0 else -1]:
                client = Path(sys.path[0]) if args.workers else trees[name]
                got = measured(client, workers.get(name, workers["before"]), kind, n, args, texts)
                runs.setdefault((name, kind, n), []).append(got)
                print(f"{kind + ':' + str(n):<12} {name:<6} {got['qps']:8.1f} q/s  client {got['cpu_ms']:.3f} ms, "
                      f"worker: stream {got['stream']:.3f}, device {got['device']:.3f} ms a query", flush=True)
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
