"""`m3q demo`: the whole job end to end on embedded defaults.

Redis (a local ``redis-server`` is started if none answers), Milvus Lite (started unless ``M3Q_MILVUS_URI`` is
set), one worker; then it indexes the sample corpus shipped with m3-queue and runs a few hybrid searches.
Everything it started, it stops, on Ctrl-C and SIGTERM too, and the worker's log goes with it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import redis

from producer.contract.errors import InfraError
from producer.contract.milvus import RRF_K
from producer.contract.settings import Settings
from producer.devstack import RedisServer, WorkerProcess, exit_on_sigterm

SAMPLE = Path(__file__).resolve().parent / "data" / "sample_corpus.jsonl"
QUERIES = ["How does hybrid search merge dense and sparse results?", "Which city is the capital of Japan?",
           "what happens when a worker dies"]


RRF_NOTE = (f"Scores are reciprocal rank fusion (RRF) of the dense and the sparse ranking: the sum of "
            f"1/({RRF_K} + rank) over both, so they rank rather than measure similarity; "
            f"{2 / (RRF_K + 1):.4f} is the most (first in both), {1 / (RRF_K + 1):.4f} first in one only.")
"""What the demo says about its scores (the RRF smoothing constant is producer.contract.milvus.RRF_K)."""


def run_demo(s: Settings, collection: str = "m3q_demo", replica: bool = False) -> int:
    """Start what is missing, index the sample corpus, search it, stop what was started (``replica``: the
    model is a random-weight replica, which the demo says)."""
    exit_on_sigterm()  # SIGTERM unwinds the ExitStack as Ctrl-C does: nothing is left running
    print(f"model: {s.model}" + (" (a RANDOM-WEIGHT REPLICA: the rankings below mean nothing)" if replica else ""))
    with ExitStack() as stack:
        s = _ensure_redis(s, stack)
        s = _ensure_milvus(s, stack)
        _start_worker(s, stack)
        _index_and_search(s, collection)
    return 0


def _ensure_redis(s: Settings, stack: ExitStack) -> Settings:
    url = urlparse(s.broker_url)
    try:
        redis.Redis.from_url(s.broker_url, socket_connect_timeout=2).ping()
        print(f"redis: {url.hostname}:{url.port or 6379} answers")
        return s
    except redis.ConnectionError:
        pass
    if url.hostname not in ("localhost", "127.0.0.1") or not shutil.which("redis-server"):
        raise InfraError(f"no Redis answers at {url.hostname}:{url.port or 6379}. Install one "
                         "(apt-get install redis-server, or docker run -p 6379:6379 redis) or set M3Q_BROKER_URL")
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="m3q-demo-redis-")))
    server = RedisServer(folder, port=url.port or 6379)
    stack.callback(server.stop)  # before the folder goes (callbacks run last first)
    server.start()
    print(f"redis: started a local redis-server on port {server.port}")
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
    worker = WorkerProcess(s)
    stack.callback(worker.remove_log)  # after the worker has stopped (callbacks run last first)
    stack.callback(worker.stop)
    print(f"worker: starting on {s.device} (log: {worker.log_path}, removed at exit)")
    worker.wait_ready(300)


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
