"""The queue end to end: real Redis, real worker processes, the tiny checkpoint."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest
import redis

from producer.client import Client
from producer.contract import stream, wire
from producer.contract.wire import Embedding, PayloadError
from producer.embedding_function import RemoteBGEM3EmbeddingFunction
from tests.conftest import ROOT, TINY, make_settings

TEXTS = ["What is BGE-M3?", "Milvus stores dense and sparse vectors.", "Привет, мир", "東京は日本の首都です。",
         "word " * 700, "short"]


def _close(a: Embedding, b: Embedding, tol: float = 1e-6) -> None:
    assert np.abs(a.dense - b.dense).max() <= tol
    assert a.sparse_dict().keys() == b.sparse_dict().keys()
    assert np.abs(a.sparse_weights - b.sparse_weights).max(initial=0) <= tol


@pytest.mark.parametrize("kind", ["queries", "documents"])
def test_queue_equals_in_process(client, encoder, kind):
    remote = client.encode(TEXTS, kind)
    local = encoder.encode(TEXTS, kind).items
    assert len(remote) == len(TEXTS)
    for a, b in zip(remote, local):
        _close(a, b)
    # queries are cut at 512 tokens, documents are not
    assert remote[4].truncated == (kind == "queries")


def test_concurrent_query_jobs_each_get_their_own_result(client, encoder):
    # Concurrent query jobs share forward passes on the worker (cross-job batching): each job still reads
    # exactly its own reply.
    texts = [f"{TEXTS[i % 4]} {i}" for i in range(24)]
    handles = [client.submit_encode([t], "queries") for t in texts]
    for text, handle in zip(texts, handles):
        _close(handle.result()[0], encoder.encode([text], "queries").items[0])


def test_celery_callers_send_queries_as_ordinary_tasks(client, encoder, redis_client):
    # A Celery-native caller (no m3q client) sends m3q.encode_queries to the query queue; Celery's own consumer
    # runs it and the result is stored under its key with the backend's expiry.
    s = client.settings
    texts = [f"{TEXTS[i % 4]} {i}" for i in range(6)]
    results = [client.app.send_task(wire.TASK_ENCODE_QUERIES, args=[{"texts": [t]}], queue=wire.query_queue(s))
               for t in texts]
    for text, result in zip(texts, results):
        (item,) = [wire.decode_item(d) for d in result.get(timeout=60)["items"]]
        _close(item, encoder.encode([text], "queries").items[0])
    ttl = redis_client.ttl(client.app.backend.get_key_for_task(results[0].id))
    assert 0 < ttl <= s.result_expires_s
    info = client.app.send_task(wire.TASK_INFO, queue=wire.query_queue(s)).get(timeout=60)
    assert info["dims"]["dense"] == encoder.info()["dims"]["dense"]


def test_colbert_through_the_queue(client, encoder):
    remote = client.encode(TEXTS[:3], "documents", colbert=True)
    local = encoder.encode(TEXTS[:3], "documents", colbert=True).items
    for a, b in zip(remote, local):
        assert a.colbert.shape == b.colbert.shape
        assert np.abs(a.colbert - b.colbert).max() <= 1e-6


def test_bad_texts_are_item_errors_and_the_rest_is_encoded(client):
    items = client.encode(["good text", "", None, 42, "nul\x00byte", "lone \ud800 surrogate", "also good"], "documents")
    assert isinstance(items[0], Embedding) and isinstance(items[-1], Embedding)
    reasons = [i.reason for i in items[1:-1]]
    assert "empty" in reasons[0]
    assert "string" in reasons[1] and "NoneType" in reasons[1]
    assert "int" in reasons[2]
    assert "NUL" in reasons[3]
    assert "surrogate" in reasons[4]


def test_unknown_option_fails_the_job_clearly(client):
    handle = client.submit(wire.TASK_ENCODE_DOCUMENTS, {"texts": ["x"], "colour": "blue"})
    with pytest.raises(PayloadError, match="colour"):
        handle.raw()


def test_too_many_texts_refused_before_encoding(shared_worker):
    s = shared_worker.settings.replace(max_job_texts=10)
    handle = Client(shared_worker.settings).submit(
        wire.TASK_ENCODE_DOCUMENTS, {"texts": ["x"] * (shared_worker.settings.max_job_texts + 1)})
    with pytest.raises(PayloadError, match="M3Q_MAX_JOB_TEXTS"):
        handle.raw()
    assert s.max_job_texts == 10


def test_await_a_query_from_asyncio(client):
    async def handler():
        return await client.aencode_queries(["where is the query lane?"])

    (item,) = asyncio.run(handler())
    assert item.dense.dtype == np.float32 and abs(np.linalg.norm(item.dense) - 1) < 1e-5


def test_handles_are_awaitable(client):
    async def run():
        return await client.submit_encode(["a", "b"], "queries")

    items = asyncio.run(run())
    assert len(items) == 2 and all(isinstance(i, Embedding) for i in items)


def test_large_input_is_split_and_kept_in_order(client, encoder):
    texts = [f"document number {i} " * (1 + i % 7) for i in range(300)]
    remote = client.encode(texts, "documents", job_texts=16)
    local = encoder.encode(texts, "documents").items
    for a, b in zip(remote, local):
        _close(a, b)


def test_remote_embedding_function_equals_pymilvus(client):
    pytest.importorskip("FlagEmbedding")
    from pymilvus.model.hybrid import BGEM3EmbeddingFunction

    texts = TEXTS[:4]
    ref = BGEM3EmbeddingFunction(model_name=str(TINY), device="cpu", use_fp16=False, return_colbert_vecs=True)
    ours = RemoteBGEM3EmbeddingFunction(model_name=str(TINY), device="cpu", use_fp16=False, return_colbert_vecs=True,
                                        client=client)
    assert ours.dim == ref.dim
    for method in ("encode_documents", "encode_queries", "__call__"):
        a, b = getattr(ref, method)(texts), getattr(ours, method)(texts)
        assert a.keys() == b.keys()
        assert type(b["sparse"]) is type(a["sparse"]) and b["sparse"].shape == a["sparse"].shape
        assert b["sparse"].dtype == a["sparse"].dtype
        assert abs(a["sparse"] - b["sparse"]).max() <= 1e-5
        assert (a["sparse"] != 0).nnz == (b["sparse"] != 0).nnz
        for x, y in zip(a["dense"], b["dense"]):
            assert type(x) is type(y) and x.dtype == y.dtype and np.abs(x - y).max() <= 1e-5
        for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
            assert x.shape == y.shape and np.abs(x - y).max() <= 1e-5


def test_sparse_output_goes_into_a_pymilvus_insert_row_by_row(client):
    ours = RemoteBGEM3EmbeddingFunction(client=client)
    sparse = ours.encode_documents(["one document", "another one"])["sparse"]
    rows = [sparse[[i]] for i in range(sparse.shape[0])]  # 2-D rows, as pymilvus accepts them
    assert all(r.shape == (1, ours.dim["sparse"]) and r.nnz > 0 for r in rows)


def test_job_routed_to_one_device_runs_there(spawn_worker):
    s = make_settings()
    spawn_worker(s, device="cpu:0")
    spawn_worker(s, device="cpu:1")
    client = Client(s)
    for device in ("cpu:1", "cpu:0", "cpu:1"):
        for kind in ("documents", "queries"):
            raw = client.submit_encode(["route me"], kind, device=device).raw()
            assert raw["device"] == device, kind
    # Queries to a device travel on its own stream, which only that device's workers read.
    r = redis.Redis.from_url(s.broker_url)
    assert r.xinfo_groups(stream.stream_key(s, "cpu:1"))[0]["entries-read"] == 2
    answers = asyncio.run(client.aencode(["route me too"] * 3, "queries", device="cpu:0", job_texts=1))
    assert len(answers) == 3 and all(a.dense is not None for a in answers)
    assert r.xinfo_groups(stream.stream_key(s, "cpu:0"))[0]["entries-read"] == 4


def test_producer_imports_without_torch():
    code = ("import sys, producer, producer.client, producer.embedding_function, producer.search, producer.cli, "
            "producer.indexing, producer.status\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\nprint('light')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "light" in out.stdout, out.stderr


@pytest.mark.parametrize("lane", ["queries", "documents"])
def test_pickle_and_unknown_tasks_are_refused(shared_worker, lane):
    s = shared_worker.settings
    queue = wire.query_queue(s) if lane == "queries" else wire.document_queue(s)
    task = wire.TASK_ENCODE_QUERIES if lane == "queries" else wire.TASK_ENCODE_DOCUMENTS
    evil = wire.make_celery(s, name="evil")
    evil.conf.accept_content = ["pickle", "msgpack", "json"]
    before = len(shared_worker.output())
    pickled = evil.send_task(task, args=[{"texts": ["x"]}], queue=queue, serializer="pickle")
    unknown = evil.send_task(f"m3q.no_such_task_{lane}", args=[{}], queue=queue)
    new_log = lambda: shared_worker.output()[before:]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not ("ContentDisallowed" in new_log() and "no_such_task" in new_log()):
        time.sleep(0.2)
    assert "ContentDisallowed" in new_log()
    assert f"no_such_task_{lane}" in new_log()
    assert pickled.state == "PENDING"  # never run: the body was not even decoded
    deadline = time.monotonic() + 10
    while unknown.state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert unknown.state == "FAILURE"  # answered: an unknown task fails at once
    # the worker is still serving
    (item,) = Client(s).encode(["still alive?"], lane)
    assert isinstance(item, Embedding)


@pytest.mark.slow
def test_worker_answers_ping_and_inspect(shared_worker):
    app = Client(shared_worker.settings).app
    replies = app.control.ping(timeout=5)
    assert any(name.startswith("m3q-cpu-") for reply in replies for name in reply)
    active = app.control.inspect(timeout=5).active_queues() or {}
    queues = {q["name"] for qs in active.values() for q in qs}
    assert wire.document_queue(shared_worker.settings) in queues
    assert wire.device_queue(shared_worker.settings, "cpu") in queues


def test_status_shows_workers_and_queue_depths(shared_worker):
    from tests.conftest import settings_env

    s = shared_worker.settings
    Client(s).submit_encode(["waiting"], "documents", device="cpu:9")  # a queue nobody consumes: depth 1
    out = subprocess.run([sys.executable, "-m", "producer.cli", "status"], cwd=ROOT, env=settings_env(s),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "device=cpu" in out.stdout and f"model={TINY}" in out.stdout and "dtype=float32" in out.stdout
    assert f"{wire.device_queue(s, 'cpu:9')}: 1 waiting" in out.stdout
