"""HTTP gateway benchmark: single queries over HTTP through `m3q serve`, against the Python client, one run.

    python bench/gateway.py [--model tests/data/tiny-bge-m3] [--clients 64] [--seconds 15] [--rounds 2]

Starts one worker and one gateway process (`m3q serve`) on a fresh queue prefix. Each round runs two shapes
for ``--seconds`` each, in this process: ``--clients`` concurrent HTTP clients (asyncio tasks sharing one
aiohttp session, keep-alive) each posting one query at a time to ``/v1/embeddings`` (the body the ``openai``
client sends, ``encoding_format`` base64); then as many asyncio tasks awaiting
``Client.aencode_queries([q])`` directly. Prints requests/s, p50, p99 and the CPU per request of this process
(the load generator, or the Python client), the gateway and the worker. Every process shares the same cores:
the load generator's CPU is taken from the gateway and the worker.

``--profile FILE`` also records the gateway with py-spy during the first HTTP shape (speedscope JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/

from bench import corpus  # noqa: E402
from bench.infra import ROOT, bench_settings, percentile, proc_cpu, start_workers  # noqa: E402
from bench.lane import tasks_shape  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.contract.settings import Settings  # noqa: E402
from producer.devstack import free_port  # noqa: E402


@dataclass
class Shape:
    """What one shape measured."""

    name: str
    latencies: list[float]
    errors: int
    seconds: float
    caller_cpu_s: float
    gateway_cpu_s: float
    worker_cpu_s: float

    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def line(self) -> str:
        n = max(1, len(self.latencies))
        return (f"{self.name:<38} {self.rate():8.1f} req/s  p50 {statistics.median(self.latencies) * 1e3:6.1f} ms  "
                f"p99 {percentile(self.latencies, 99) * 1e3:6.1f} ms  errors {self.errors}  CPU/request: caller "
                f"{self.caller_cpu_s / n * 1e3:4.2f} ms, gateway {self.gateway_cpu_s / n * 1e3:4.2f} ms, "
                f"worker {self.worker_cpu_s / n * 1e3:4.2f} ms")


class Gateway:
    """An `m3q serve` subprocess."""

    def __init__(self, s: Settings, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("M3Q_")}
        env.update({f"M3Q_{k.upper()}": str(v) for k, v in vars(s).items()})
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="m3q-bench-gateway-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "serve", "--port", str(port)], env=env,
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 60) -> "Gateway":
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(Path(self.log.name).read_text(errors="replace")[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def http_shape(url: str, texts: list[str], n: int, seconds: float) -> tuple[list[float], int]:
    """Latencies of ``n`` HTTP clients each posting one query at a time for ``seconds``; and the errors."""
    import aiohttp
    import orjson

    latencies: list[float] = []
    errors = 0

    async def run(session: aiohttp.ClientSession, seed: int, deadline: float) -> None:
        nonlocal errors
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            body = orjson.dumps({"model": "bge-m3", "input": rng.choice(texts), "encoding_format": "base64"})
            started = time.perf_counter()
            async with session.post(url + "/v1/embeddings", data=body,
                                    headers={"Content-Type": "application/json"}) as answer:
                await answer.read()
                if answer.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - started)

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=n, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(run(session, i, deadline) for i in range(n)))

    asyncio.run(main())
    return latencies, errors


def measure(name: str, run, gateway_pid: int, worker_pid: int, seconds: float) -> Shape:
    """Run one shape, with the CPU seconds of this process, the gateway and the worker meanwhile."""
    before = (time.process_time(), proc_cpu(gateway_pid), proc_cpu(worker_pid))
    latencies, errors = run()
    after = (time.process_time(), proc_cpu(gateway_pid), proc_cpu(worker_pid))
    return Shape(name, latencies, errors, seconds, *(b - a for a, b in zip(before, after)))


def profile(pid: int, seconds: float, out: str) -> subprocess.Popen:
    """py-spy recording the gateway for ``seconds`` (speedscope JSON to ``out``)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
                             "--format", "speedscope", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tests/data/tiny-bge-m3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", metavar="FILE", help="Record the gateway with py-spy during the first HTTP shape")
    args = p.parse_args(argv)
    texts = corpus.queries(500)
    s = bench_settings(model=args.model)
    (worker,) = start_workers(s, 1, args.device)
    gateway = Gateway(s, free_port()).wait_ready()
    shapes: list[Shape] = []
    try:
        client = Client(s)
        [client.encode_queries([t]) for t in texts[:20]]  # warm: the worker's first steps
        http_shape(gateway.url, texts, args.clients, 2)  # warm: the gateway's connections
        for round_ in range(args.rounds):
            spy = profile(gateway.proc.pid, args.seconds, args.profile) if args.profile and round_ == 0 else None
            shapes.append(measure(f"HTTP /v1/embeddings, {args.clients} clients",
                                  lambda: http_shape(gateway.url, texts, args.clients, args.seconds),
                                  gateway.proc.pid, worker.proc.pid, args.seconds))
            print(shapes[-1].line(), flush=True)
            if spy is not None:
                spy.wait(60)
            shapes.append(measure(f"Client.aencode_queries, {args.clients} tasks",
                                  lambda: (tasks_shape(lambda q: client.aencode_queries([q]), texts, args.clients,
                                                       args.seconds), 0),
                                  gateway.proc.pid, worker.proc.pid, args.seconds))
            print(shapes[-1].line(), flush=True)
    finally:
        gateway.stop()
        worker.stop()
    http = [x for x in shapes if x.name.startswith("HTTP")]
    direct = [x for x in shapes if not x.name.startswith("HTTP")]
    print(f"best HTTP {max(x.rate() for x in http):.1f} req/s against best Python client "
          f"{max(x.rate() for x in direct):.1f} q/s (target 1,000 req/s over HTTP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
