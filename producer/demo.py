"""`m3q demo`: the whole job end to end on embedded defaults.

Redis (a local ``redis-server`` is started if none answers), Milvus Lite (started unless ``M3Q_MILVUS_URI`` is
set), one worker; then it indexes the sample corpus shipped with m3-queue and runs a few hybrid searches.
Everything it started, it stops, on Ctrl-C and SIGTERM too, and the worker's log goes with it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import redis

from producer.milvus import RRF_K
from producer.settings import Settings
from producer.errors import InfraError

SAMPLE = Path(__file__).resolve().parent / "data" / "sample_corpus.jsonl"
QUERIES = ["How does hybrid search merge dense and sparse results?", "Which city is the capital of Japan?",
           "what happens when a worker dies"]


RRF_NOTE = (f"Scores are reciprocal rank fusion (RRF) of the dense and the sparse ranking: the sum of "
            f"1/({RRF_K} + rank) over both, so they rank rather than measure similarity; "
            f"{2 / (RRF_K + 1):.4f} is the most (first in both), {1 / (RRF_K + 1):.4f} first in one only.")
"""What the demo says about its scores (the RRF smoothing constant is producer.milvus.RRF_K)."""


def run_demo(s: Settings, collection: str = "m3q_demo") -> int:
    """Start what is missing, index the sample corpus, search it, stop what was started."""
    from producer.milvus_lite import exit_on_sigterm

    exit_on_sigterm()  # SIGTERM unwinds the ExitStack as Ctrl-C does: nothing is left running
    _check_model(s)
    with ExitStack() as stack:
        s = _ensure_redis(s, stack)
        s = _ensure_milvus(s, stack)
        _start_worker(s, stack)
        _index_and_search(s, collection)
    return 0


def _check_model(s: Settings) -> None:
    # Fail in seconds, not after starting services, when the model is neither local nor downloadable.
    from worker.model import resolve_checkpoint

    folder = resolve_checkpoint(s.model)
    replica = (folder / "m3q_replica.json").exists()
    print(f"model: {s.model}" + (" (a RANDOM-WEIGHT REPLICA: the rankings below mean nothing)" if replica else ""))


def _ensure_redis(s: Settings, stack: ExitStack) -> Settings:
    try:
        redis.Redis.from_url(s.broker_url, socket_connect_timeout=2).ping()
        print(f"redis: {urlparse(s.broker_url).hostname}:{urlparse(s.broker_url).port or 6379} answers")
        return s
    except redis.ConnectionError:
        pass
    url = urlparse(s.broker_url)
    if url.hostname not in ("localhost", "127.0.0.1") or not shutil.which("redis-server"):
        raise InfraError(f"no Redis answers at {url.hostname}:{url.port or 6379}. Install one "
                         "(apt-get install redis-server, or docker run -p 6379:6379 redis) or set M3Q_BROKER_URL")
    port = url.port or 6379
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc)
    _wait(lambda: redis.Redis.from_url(s.broker_url, socket_connect_timeout=1).ping(), "redis-server", 20)
    print(f"redis: started a local redis-server on port {port}")
    return s


def _ensure_milvus(s: Settings, stack: ExitStack) -> Settings:
    if s.milvus_uri:
        print(f"milvus: {s.milvus_uri}")
        return s
    from producer.milvus_lite import ensure_lite_server

    server = ensure_lite_server(s)
    if server is not None:  # None: one already answers on that port, and it is not ours to stop
        stack.callback(server.stop)
    uri = f"http://127.0.0.1:{s.milvus_port}"
    print(f"milvus: Milvus Lite at {uri} (data in {os.path.expanduser(s.milvus_data_dir)})")
    return s.replace(milvus_uri=uri)


def _start_worker(s: Settings, stack: ExitStack) -> None:
    from producer.status import collect

    env = {**os.environ, **{f"M3Q_{k.upper()}": str(v) for k, v in vars(s).items()}}
    log = tempfile.NamedTemporaryFile(prefix="m3q-demo-worker-", suffix=".log", delete=False)
    stack.callback(_remove, log)  # after the worker has stopped (callbacks run last first)
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--device", s.device], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    stack.callback(_stop, proc)
    print(f"worker: starting on {s.device} (log: {log.name}, removed at exit)")
    deadline = time.monotonic() + 300
    while not any(w["pid"] == proc.pid for w in collect(s)["workers"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise InfraError(f"the worker did not start:\n{Path(log.name).read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)


def _index_and_search(s: Settings, collection: str) -> None:
    from producer.indexing import index_file
    from producer.search import Searcher

    started = time.perf_counter()
    report = index_file(s, SAMPLE, collection)
    print(f"{report.summary()} in {time.perf_counter() - started:.1f} s")
    searcher = Searcher(s)
    print(f"\n{RRF_NOTE}")
    for query in QUERIES:
        started = time.perf_counter()
        hits = searcher.search(query, collection, "hybrid", k=3)
        print(f"\nhybrid search: {query}  ({(time.perf_counter() - started) * 1000:.0f} ms)")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit.score:.4f}  {hit.id:<10} {hit.text[:80]}")


def _wait(check, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise InfraError(f"{what} did not come up in {timeout_s:.0f}s") from None
            time.sleep(0.2)


def _remove(log) -> None:
    log.close()
    Path(log.name).unlink(missing_ok=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
