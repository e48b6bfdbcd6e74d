"""Benchmark plumbing: real worker processes on a private queue prefix."""
from __future__ import annotations

import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from producer.contract.settings import Settings
from producer.devstack import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent


def bench_settings(**overrides) -> Settings:
    """Settings from the environment, on a fresh queue prefix so runs never see each other's jobs."""
    return Settings.from_env(queue_prefix=f"bench{uuid.uuid4().hex[:8]}", **overrides)


class Worker(WorkerProcess):
    """An `m3q worker` subprocess; its log is removed when it stops."""

    def __init__(self, s: Settings, device: str = "cpu", tree: Path = ROOT) -> None:
        """``tree``: the checkout whose code it runs (default this one)."""
        env = {"M3Q_TESTING": "1", "PYTHONPATH": str(tree)}  # benches may use the stand-in
        super().__init__(s, device=device, cwd=tree, env=env)

    def stop(self) -> None:
        super().stop(60)
        self.remove_log()


def start_workers(s: Settings, n: int, device: str = "cpu") -> list[Worker]:
    """``n`` workers, all ready."""
    workers = [Worker(s, device=f"{device}:{i}" if n > 1 else device) for i in range(n)]
    return [w.wait_ready() for w in workers]


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (its live threads and reaped children)."""
    return stat_cpu(Path(f"/proc/{pid}/stat"))


def stat_cpu(stat: Path, children: bool = True) -> float:
    """User + system CPU seconds in a ``/proc`` stat file: a process's (with its reaped children), or with
    ``children=False`` a thread's (``/proc/PID/task/TID/stat``)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def redis_cpu(r) -> float:
    """User + system CPU seconds the Redis server ``r`` has used (``INFO cpu``)."""
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def threads_shape(ask: Callable[[str], object], texts: list[str], n: int, seconds: float) -> list[float]:
    """Latencies of ``n`` threads each asking one query at a time for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            ask(rng.choice(texts))
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return latencies
