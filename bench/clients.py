"""The query stream's client side, two checkouts against each other: one worker, client processes from each.

    python bench/clients.py BEFORE [AFTER] [--shapes threads:32,tasks:256,threads:1,tasks:1] [--seconds 6]
                            [--rounds 3] [--model tests/data/tiny-bge-m3]

``BEFORE`` and ``AFTER`` (default: this checkout) are checkouts of m3-queue, e.g. a ``git worktree`` of the
commit before a change. One worker of this checkout serves every run, so only the client differs. Each shape
runs in a fresh client process of each checkout in the order before, after, after, before (the next round
the other way round), for ``--seconds`` each: on a shared machine, runs made this close together are the
ones that compare. ``threads:N`` is N threads of blocking ``Client.encode_queries([q])``, ``tasks:N`` N
asyncio tasks of ``await client.aencode_queries([q])`` on one loop. Prints each run, then per checkout and
shape the median q/s and the median CPU of the client process per query (``time.process_time``).
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
from bench.infra import bench_settings, start_workers  # noqa: E402

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
print(json.dumps({"qps": queries / wall, "cpu_ms": cpu / queries * 1e3}))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path, nargs="?", default=Path(sys.path[0]))
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
    texts = corpus.queries(500)
    s = bench_settings(model=args.model)
    (worker,) = start_workers(s, 1)
    runs: dict[tuple[str, str, int], list[dict]] = {}
    try:
        for kind, n in shapes:
            for r in range(args.rounds):
                for name in ("before", "after", "after", "before")[::1 if r % 2 == 0 else -1]:
                    got = run_client(trees[name], s.queue_prefix, kind, n, args, texts)
                    runs.setdefault((name, kind, n), []).append(got)
                    print(f"{kind + ':' + str(n):<12} {name:<6} {got['qps']:8.1f} q/s  "
                          f"client {got['cpu_ms']:.3f} ms a query", flush=True)
    finally:
        worker.stop()
    print(f"\nbefore: {trees['before']}\nafter:  {trees['after']}")
    for (name, kind, n), got in runs.items():
        cpu = [g["cpu_ms"] for g in got]
        print(f"{kind + ':' + str(n):<12} {name:<6} median {statistics.median(g['qps'] for g in got):8.1f} q/s, client "
              f"{statistics.median(cpu):.3f} ms a query ({' '.join(f'{c:.3f}' for c in cpu)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
