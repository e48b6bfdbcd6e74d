"""Benchmark plumbing: real worker processes on a private queue prefix."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def bench_settings(**overrides) -> Settings:
    """Settings from the environment, on a fresh queue prefix so runs never see each other's jobs."""
    return Settings.from_env(queue_prefix=f"bench{uuid.uuid4().hex[:8]}", **overrides)


class Worker:
    """An `m3q worker` subprocess."""

    def __init__(self, s: Settings, device: str = "cpu") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("M3Q_")}
        env.update({f"M3Q_{k.upper()}": str(v) for k, v in vars(s.replace(device=device)).items()})
        self.log = tempfile.NamedTemporaryFile(prefix="m3q-bench-worker-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--device", device], env=env,
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300) -> "Worker":
        deadline = time.monotonic() + timeout_s
        while " ready." not in Path(self.log.name).read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(Path(self.log.name).read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_workers(s: Settings, n: int, device: str = "cpu") -> list[Worker]:
    """``n`` workers, all ready."""
    workers = [Worker(s, device=f"{device}:{i}" if n > 1 else device) for i in range(n)]
    return [w.wait_ready() for w in workers]


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
