"""Cross-job batching, the query lane, and metrics: the engine in-process and real workers."""
from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest

from producer.client import Client
from producer.contract.wire import Embedding, ItemError
from tests.conftest import TINY, free_port, make_settings
from worker.encoder import Encoder, Limits
from worker.engine import Engine


@pytest.fixture(scope="module")
def encoder():
    return Encoder.load(str(TINY), "cpu", "float32", Limits(max_batch_tokens=4096))


def test_cross_job_batching_gives_each_job_its_own_vectors_and_errors(encoder):
    steps = []
    engine = Engine(encoder, batch_wait_ms=50, on_step=steps.append)
    jobs = [[f"query {j} number {i}" for i in range(1 + j % 3)] + ([""] if j % 4 == 0 else []) for j in range(12)]
    futures: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def send(j):
        barrier.wait()
        futures[j] = engine.submit(jobs[j], "queries")

    threads = [threading.Thread(target=send, args=(j,)) for j in range(len(jobs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    results = [f.result(60) for f in futures]
    engine.stop()
    assert max(s.jobs for s in steps) > 1, "concurrent query jobs were merged into one forward pass"
    assert len(steps) < len(jobs)
    for texts, result in zip(jobs, results):
        alone = encoder.encode(texts, "queries").items
        assert len(result.items) == len(texts)
        for mine, solo, text in zip(result.items, alone, texts):
            if text == "":
                assert isinstance(mine, ItemError) and "empty" in mine.reason
            else:
                assert np.abs(mine.dense - solo.dense).max() <= 1e-6
                assert mine.sparse_dict().keys() == solo.sparse_dict().keys()


def test_a_failing_step_fails_only_its_own_jobs(encoder):
    from collections import deque

    from worker.encoder import Prepared
    from worker.engine import Submission

    engine = Engine(encoder, batch_wait_ms=0, cross_job_batching=False)  # the good job must get its own step
    # No tokenizer output can do this: a token id outside the vocabulary makes the forward pass raise.
    broken = Submission("documents", [None], deque([Prepared(0, [0, 10**7, 2], False)]), True, True, False, 0, 3,
                        open_items=1)
    with engine._cond:
        engine._queues["documents"].append(broken)
        engine._cond.notify()
    good = engine.submit(["another fine text"], "documents")
    with pytest.raises(IndexError):
        broken.future.result(60)
    assert isinstance(good.result(60).items[0], Embedding)
    assert isinstance(engine.encode(["the loop is still alive"], "queries").items[0], Embedding)
    engine.stop()


def test_max_length_beyond_the_model_is_refused(encoder):
    with pytest.raises(ValueError, match="positions"):
        encoder.prepare(["text"], "documents", max_length=10**6)


def test_query_completes_before_a_long_document_job(encoder):
    engine = Engine(encoder, batch_wait_ms=0)
    documents = ["a long document about many things " * 120] * 24  # several 4096-token steps
    done = {}
    doc_future = engine.submit(documents, "documents")
    doc_future.add_done_callback(lambda _: done.setdefault("documents", time.monotonic()))
    time.sleep(0.05)
    query_future = engine.submit(["a short question"], "queries")
    query_future.add_done_callback(lambda _: done.setdefault("query", time.monotonic()))
    query_future.result(60)
    doc_future.result(120)
    engine.stop()
    assert done["query"] < done["documents"]


def test_query_runs_inside_one_long_document_step():
    # One document of 3,000 tokens is one step of 3 s on the stand-in; a query sent during it must not
    # wait for the step: it runs between two slices of it (M3Q_PREEMPT_MS).
    from worker.testing import SleepPerTokenEncoder

    engine = Engine(SleepPerTokenEncoder(1000, Limits(), "cpu"), batch_wait_ms=0, preempt_ms=25)
    document = engine.submit([" ".join(["word"] * 3000)], "documents")
    time.sleep(0.3)
    sent = time.monotonic()
    engine.encode(["a short question"], "queries", timeout_s=10)
    waited = time.monotonic() - sent
    assert not document.done(), "the query waited for the whole document step"
    assert waited < 0.5, f"the query waited {waited:.2f} s"
    assert document.result(30).items[0].n_tokens == 3002
    engine.stop()


def test_query_through_the_queue_overtakes_a_document_backlog(spawn_worker):
    s = make_settings(max_batch_tokens=4096)
    spawn_worker(s)
    client = Client(s)
    documents = ["a long document about many different things " * 200] * 32
    backlog = [client.submit_encode(documents, "documents") for _ in range(4)]
    done: dict[str, float] = {}

    def wait(name, handle):
        handle.raw()
        done[name] = time.monotonic()

    waiters = [threading.Thread(target=wait, args=("backlog", backlog[-1]))]
    waiters[0].start()
    time.sleep(0.3)  # the worker is now inside the backlog
    waiters.append(threading.Thread(target=wait, args=("query", client.submit_encode(["a short question"], "queries"))))
    waiters[1].start()
    [w.join(300) for w in waiters]
    assert done["query"] < done["backlog"], "the query waited for the whole document backlog"


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_endpoint_serves_counters_that_move(spawn_worker):
    port = free_port()
    s = make_settings(metrics_port=port)
    spawn_worker(s)
    before = _metrics(port)
    client = Client(s)
    client.encode(["one document", "two documents", ""], "documents")
    client.encode_queries(["a query"])
    after = _metrics(port)
    texts = 'm3q_texts_total{kind="documents"}'
    assert after[texts] - before.get(texts, 0) == 2
    assert after['m3q_texts_total{kind="queries"}'] >= 1
    assert after['m3q_tokens_total{kind="documents"}'] > 0
    assert after['m3q_padded_tokens_total{kind="documents"}'] >= after['m3q_tokens_total{kind="documents"}']
    assert after['m3q_jobs_total{outcome="ok",task="m3q.encode_documents"}'] >= 1
    assert after['m3q_jobs_total{outcome="ok",task="m3q.encode_queries"}'] >= 1
    assert after['m3q_encode_seconds_count{kind="documents"}'] >= 1
    assert after['m3q_queue_wait_seconds_count{task="m3q.encode_queries"}'] >= 1
    assert after['m3q_batch_texts_count{kind="queries"}'] >= 1
    from producer.contract import wire
    from producer.contract.wire import PayloadError

    with pytest.raises(PayloadError):
        client.submit(wire.TASK_ENCODE_DOCUMENTS, {"texts": ["x"], "bogus": 1}).raw()
    assert _metrics(port)['m3q_errors_total{kind="PayloadError"}'] == 1
