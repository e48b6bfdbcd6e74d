"""Issue 5, "nothing lost, every bad input answered": faults, bad input and abuse, on real components.

Real redis-server processes, real worker processes on the tiny checkpoint, a real Milvus Lite server. Tests
that kill, restart or reconfigure Redis, or that need a short visibility timeout, get a private redis-server:
kombu keeps its unacknowledged messages in one hash per Redis database, so a worker with a 5 s visibility
timeout on the shared database would hand other tests' long jobs out a second time.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis as redis_py

from producer.client import Client, IndexReport, JobFailed
from producer.contract import milvus, wire
from producer.contract.settings import Settings
from producer.contract.wire import Embedding, ItemError, PayloadError
from producer.status import collect
from tests.conftest import ROOT, Worker, WorkerProcess, free_port, make_settings, settings_env, wait_for
from worker import celery_internals, sink

TIMEOUT_S = 180
LONG_DOC = "word alpha beta " * 3000  # over 8192 tokens: cut to 8192, about a second of encoding each
TESTING_ENV = "M3Q_TESTING"  # worker.testing.SWITCH_ENV: the test hooks are armed only with it
CRASH_ENV = "M3Q_TEST_CRASH_ON_TEXT"  # worker.testing.CRASH_ENV: the worker exits at once on that text
CRASH_EXIT_CODE = 86  # worker.testing.CRASH_EXIT_CODE
DOWN_S = 25  # how long Redis stays down in the restart test


def crash_on(text: str) -> dict[str, str]:
    """The environment of a worker that exits at once on a job holding ``text`` (the test hook, switched on)."""
    return {TESTING_ENV: "1", CRASH_ENV: text}


def in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run ``fn`` in a thread; its return value or exception lands in the dict."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def collection_name() -> str:
    return "faults_" + uuid.uuid4().hex[:12]


def milvus_client(s: Settings):
    """A Milvus client; tried three times, since pymilvus' shared gRPC channel to Milvus Lite fails once after
    about two idle minutes ("too many pings", milvus-io/milvus-lite#334) and works again on the next try."""
    for attempt in range(3):
        try:
            return milvus.connect(s)
        except milvus.MilvusError:
            if attempt == 2:
                raise
            time.sleep(1)


def stored_count(s: Settings, collection: str) -> int:
    client = milvus_client(s)
    try:
        return milvus.count(client, collection)
    finally:
        client.close()


def m3q(s: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=settings_env(s), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def publish_json(app, task: str, payload: dict, queue: str):
    """Send a job as hand-written JSON (where a lone surrogate travels as a \\u escape), as any client could."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task, args=[payload], kwargs={})
    with app.producer_or_acquire() as producer:
        producer.publish(json.dumps(message.body), exchange=queue, routing_key=queue,
                         content_type="application/json", content_encoding="utf-8", headers=message.headers,
                         **message.properties)
    return app.AsyncResult(task_id)


def alive(w: Worker) -> None:
    """The worker process runs and still answers a query."""
    assert w.proc.poll() is None, w.output()[-3000:]
    (item,) = Client(w.settings).encode_queries(["are you still there?"])
    assert isinstance(item, Embedding)


# ---- faults -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_worker_killed_mid_batch_is_redelivered_and_stored_once(private_redis, workers, milvus_server):
    server = private_redis()
    # The visibility timeout stays at its default hour: the jobs come back because their worker died.
    s = make_settings(broker_url=server.url(), milvus_uri=milvus_server, dead_worker_s=6, job_timeout_s=TIMEOUT_S)
    first = workers(s)
    collection = collection_name()
    texts = [f"document {i}: {LONG_DOC}" for i in range(12)]
    ids = [f"doc-{i}" for i in range(len(texts))]
    indexing, indexed = in_thread(lambda: Client(s).index(collection, texts, ids, job_texts=6))

    # Both jobs of 6 long documents (several seconds of encoding) are on the first worker: kill it now.
    wait_for(lambda: len(first.task_ids("received")) == 2, 60, "the first worker receives both jobs", first.proc,
             interval_s=0.02)
    time.sleep(0.3)
    assert first.task_ids("succeeded") == [], "a batch finished before the kill: make the documents longer"
    jobs = first.task_ids("received")
    first.signal(signal.SIGKILL)
    assert first.proc.wait(10) == -signal.SIGKILL

    # Held by no live worker once the dead one's heartbeat expires, the jobs are put back by the next worker's
    # sweep (tests/test_redelivery.py has the running worker's sweep and the bound).
    second = workers(s)
    indexing.join(TIMEOUT_S)
    assert not indexing.is_alive(), "the producer's index call did not complete"
    assert "error" not in indexed, indexed.get("error")
    report = indexed["value"]
    assert report.stored == len(texts) and report.rejected == []
    # the worker logs "succeeded" just after storing the result the producer has already read
    wait_for(lambda: sorted(second.task_ids("succeeded")) == sorted(jobs), 10, "the second worker ran both jobs")
    assert stored_count(s, collection) == len(set(ids))  # each document once, though two workers handled it
    # At least once: each job ran to the end on the second worker. How often a job was counted depends on
    # whether the first worker had started it when it died, so no exact count is asserted.
    deliveries = redis_py.Redis.from_url(server.url())
    assert all(int(deliveries.get(f"{s.queue_prefix}:deliveries:{job}") or 0) >= 1 for job in jobs)


@pytest.mark.slow
def test_sigterm_finishes_the_current_batch_then_exits(workers, milvus_server):
    s = make_settings(milvus_uri=milvus_server)
    w = workers(s)
    collection = collection_name()
    texts = [f"document {i}: {LONG_DOC}" for i in range(6)]
    handle = Client(s).submit_index(collection, texts, [f"doc-{i}" for i in range(len(texts))])
    wait_for(lambda: w.task_ids("received"), 60, "the worker receives the job", w.proc, interval_s=0.02)
    time.sleep(0.3)
    assert w.task_ids("succeeded") == [], "the batch finished before SIGTERM: make the documents longer"
    w.signal(signal.SIGTERM)
    stopped = time.monotonic()

    raw = handle.raw(TIMEOUT_S)
    assert raw["stored"] == len(texts) and w.owns(raw)  # finished by the worker that was told to stop
    assert w.proc.wait(60) == 0
    print(f"\nSIGTERM to exit: {time.monotonic() - stopped:.1f}s")
    assert w.task_ids("succeeded") == [handle.id]
    assert stored_count(s, collection) == len(texts)


@pytest.mark.slow
def test_redis_restart_mid_run_loses_nothing(private_redis, workers, milvus_server):
    server = private_redis("--appendonly", "yes")
    # A job whose delivery or acknowledgement fell into the outage is handed out again after the visibility
    # timeout (short here; the Redis is private); index jobs are upserts by id, so that stores nothing twice.
    s = make_settings(broker_url=server.url(), milvus_uri=milvus_server, job_texts=50, max_in_flight=4,
                      job_timeout_s=TIMEOUT_S, visibility_timeout_s=15)
    w = workers(s)
    collection = collection_name()
    n = 3000
    texts = [f"document {i} " + "about the lorem ipsum of queues and restarts " * 6 for i in range(n)]
    ids = [f"doc-{i}" for i in range(n)]
    done = [0]
    progress = lambda k: done.__setitem__(0, done[0] + k)  # noqa: E731
    indexing, indexed = in_thread(lambda: Client(s).index(collection, texts, ids, progress=progress))
    wait_for(lambda: done[0] >= n // 5, TIMEOUT_S, "a fifth of the documents indexed")
    server.stop()
    at_stop = done[0]
    # Longer than Celery's own 20 one-second reconnects: the producer client's retries carry it through.
    time.sleep(1)
    querying, queried = in_thread(lambda: Client(s).encode_queries(["sent while Redis is down"]))
    time.sleep(DOWN_S)
    server.start()
    indexing.join(150)
    querying.join(30)
    assert not indexing.is_alive(), "the index call did not complete within 150 s of the restart"
    assert at_stop < n, "the run ended before Redis stopped: index more documents"
    assert "error" not in indexed, indexed.get("error")
    assert indexed["value"].stored == n and indexed["value"].rejected == []
    assert stored_count(s, collection) == n
    assert "error" not in queried, queried.get("error")
    assert isinstance(queried["value"][0], Embedding)
    alive(w)


@pytest.mark.slow
def test_a_job_running_through_a_redis_restart_is_answered_and_its_worker_lives_on(private_redis, workers):
    # The job outlasts the restart, so its late acknowledgement comes after the worker has reconnected, on the
    # channel of the connection that Redis' restart closed. It took the whole worker down once ("Unrecoverable
    # error: AttributeError", inside kombu's Redis transport): it must be a lost acknowledgement, no more.
    server = private_redis("--appendonly", "yes")
    s = make_settings(broker_url=server.url(), job_timeout_s=TIMEOUT_S, worker_threads=1,
                      model="test-stand-in:sleep-us-per-token=40")
    w = workers(s, env={TESTING_ENV: "1"})
    texts = [f"document {i}: {LONG_DOC}" for i in range(30)]  # about 10 s: 30 x 8,192 tokens at 40 us
    handle = Client(s).submit_encode(texts, "documents")
    wait_for(lambda: w.task_ids("received", wire.TASK_ENCODE_DOCUMENTS), 60, "the job is received", w.proc)
    server.stop()
    time.sleep(3)
    server.start()
    items = handle.result(TIMEOUT_S)
    assert len(items) == len(texts) and all(item.dense is not None for item in items)
    time.sleep(2)  # the acknowledgement runs on the worker's event loop once the job is done
    assert "Unrecoverable error" not in w.output(), w.output()[-3000:]
    alive(w)


def test_an_acknowledgement_on_a_closed_connection_is_a_connection_error_and_the_job_comes_back(private_redis):
    import logging

    import kombu

    server = private_redis("--appendonly", "yes")
    url = server.url()
    for transport in (None, celery_internals.TRANSPORT):  # kombu's own, then the worker's
        queue = kombu.Queue("ack-after-close-" + uuid.uuid4().hex[:8])
        with kombu.Connection(url) as sender:
            sender.Producer().publish({"job": 1}, routing_key=queue.name, declare=[queue])
        # What Celery does when Redis goes away with a job in hand: the read fails, the connection is
        # collected and closed, and the job's late acknowledgement comes after Redis is back.
        conn = kombu.Connection(url, transport=transport)
        held: list = []
        conn.Consumer([queue], callbacks=[lambda body, message: held.append(message)]).consume()
        conn.drain_events(timeout=10)
        (message,) = held
        server.stop()
        with pytest.raises(conn.connection_errors):
            conn.drain_events(timeout=5)
        conn.collect(socket_timeout=2)
        conn.close()
        # The channel's pool is rebuilt from the connection's parameters on its next use, as in the worker
        # whose log showed the crash (the close above happened to leave one behind).
        message.channel._disconnect_pools()
        server.start()
        if transport is None:
            with pytest.raises(AttributeError, match="hostname"):  # Celery would stop the worker on this
                message.ack_log_error(logging.getLogger(__name__), conn.connection_errors)
        else:
            message.ack_log_error(logging.getLogger(__name__), conn.connection_errors)  # logged, not raised
            with pytest.raises(redis_py.exceptions.ConnectionError, match="delivered again"):
                message.channel.basic_ack(message.delivery_tag)
        # Nothing is lost: the job is still held unacknowledged, and the sweep every worker runs puts it back
        # once its visibility timeout (1 s here) has passed.
        time.sleep(1.5)
        with kombu.Connection(url, transport_options={"visibility_timeout": 1}) as again:
            again.default_channel.qos.restore_visible()
            back = again.SimpleQueue(queue.name).get(timeout=10)
            assert back.payload == {"job": 1}
            back.ack()


@pytest.mark.slow
def test_milvus_unreachable_retries_then_fails_naming_the_batch(workers):
    s = make_settings(milvus_uri=f"http://127.0.0.1:{free_port()}", index_retries=2, index_retry_backoff_s=0.2)
    w = workers(s)
    report = IndexReport()
    rows = [(i, f"text {i}", f"id-{i}", None) for i in range(10)]
    with pytest.raises(JobFailed) as failed:
        # force: no look-up of what is stored, so the worker's own retries are what meets the dead Milvus
        Client(s).index_rows("unreachable", rows, job_texts=10, report=report, force=True)
    message = str(failed.value)
    print(f"\nthe producer sees: {message}")
    assert "Milvus" in message and "not stored after 3 tries" in message and "items 0..9" in message, message
    assert report.stored == 0
    assert w.output().count("Milvus failed on batch") == 2  # two retries with backoff, then the failure
    (failure,) = collect(s)["failures"]
    assert failure["task"] == wire.TASK_INDEX_DOCUMENTS and "MilvusError" in failure["reason"]
    assert failure["id"] in message
    alive(w)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["documents", "queries"])  # a Celery job, and the query stream
def test_poison_job_is_given_up_after_bounded_deliveries_and_shown_by_status(private_redis, workers, kind):
    server = private_redis()
    s = make_settings(broker_url=server.url(), visibility_timeout_s=2, task_max_retries=1, job_timeout_s=TIMEOUT_S)
    crash = crash_on("poison pill")
    handle = Client(s).submit_encode(["a fine text", "poison pill"], kind)
    # Each delivery kills its worker; the next one to start takes the job back (kombu restores it at start-up).
    for _ in range(1 + s.task_max_retries):
        w = workers(s, env=crash, wait=False)
        assert w.proc.wait(TIMEOUT_S) == CRASH_EXIT_CODE, w.output()[-3000:]
    last = workers(s, env=crash)
    with pytest.raises(JobFailed, match="PoisonJob") as failed:
        handle.raw(TIMEOUT_S)
    assert f"delivered {2 + s.task_max_retries} times" in str(failed.value)
    alive(last)
    assert Client(s).encode(["a fine text"], kind)[0].dense is not None  # the worker goes on

    out = m3q(s, "status")
    assert out.returncode == 0, out.stderr
    print(f"\n$ m3q status\n{out.stdout}")
    failed_jobs = out.stdout.split("FAILED JOBS", 1)[1]
    assert handle.id in failed_jobs and "PoisonJob" in failed_jobs, out.stdout


# ---- bad input through the queue --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(milvus_server, tmp_path_factory, redis_client):
    """One worker for the bad-input tests: Milvus with a token (which Milvus Lite ignores), a 16 MB payload limit."""
    s = make_settings(milvus_uri=milvus_server, milvus_token="root:Milvus", max_payload_bytes=16 * 1024 * 1024)
    w = WorkerProcess(s, tmp_path_factory.mktemp("faults-worker") / "worker.log").wait_ready(TIMEOUT_S)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def client(worker):
    return Client(worker.settings)


BAD = [  # (text, what its error says)
    ("", "empty"), ("  \t\n ", "whitespace"), (None, "got NoneType"), (b"bytes", "got bytes"), (42, "got int"),
    (3.5, "got float"), (True, "got bool"), ("nul \x00 inside", "NUL character at offset 4"),
    ("lone \ud800 surrogate", "lone surrogate at offset 5"),
]


def test_bad_texts_are_answered_one_by_one_when_encoding(client, worker):
    texts = ["a good text", *(t for t, _ in BAD), "another good text"]
    for kind in wire.KINDS:
        items = client.encode(texts, kind)
        assert isinstance(items[0], Embedding) and isinstance(items[-1], Embedding)
        for item, (_, why) in zip(items[1:-1], BAD):
            assert isinstance(item, ItemError) and why in item.reason, (why, item)
    alive(worker)


def test_bad_texts_are_rejected_by_name_when_indexing(client, worker):
    collection = collection_name()
    texts = ["a good text", *(t for t, _ in BAD), "another good text"]
    ids = [f"doc-{i}" for i in range(len(texts))]
    report = client.index(collection, texts, ids, job_texts=4)  # three jobs: positions are the caller's
    assert report.stored == 2
    assert sorted(i for i, _ in report.rejected) == list(range(1, len(texts) - 1))
    for i, reason in report.rejected:
        assert f"id 'doc-{i}'" in reason and BAD[i - 1][1] in reason, reason  # named by the caller's id
    assert stored_count(worker.settings, collection) == 2


def test_nul_and_lone_surrogate_sent_raw_are_answered_by_the_worker(worker):
    # msgpack cannot carry a lone surrogate, so the producer answers it itself; JSON written by hand can.
    s = worker.settings
    payload = {"texts": ["fine", "nul \x00", "lone \udc00", "fine again"]}
    result = publish_json(wire.make_celery(s, name="raw-json"), wire.TASK_ENCODE_DOCUMENTS, payload,
                          wire.document_queue(s))
    items = [wire.decode_item(d) for d in result.get(timeout=TIMEOUT_S)["items"]]
    assert isinstance(items[0], Embedding) and isinstance(items[3], Embedding)
    assert "NUL" in items[1].reason and "lone surrogate at offset 5" in items[2].reason
    alive(worker)


def test_a_ten_megabyte_text_is_rejected_alone(client, worker):
    texts = ["before", "x" * 10_000_000, "after"]
    items = client.encode_documents(texts)
    assert isinstance(items[0], Embedding) and isinstance(items[2], Embedding)
    assert "10,000,000 characters" in items[1].reason and "M3Q_MAX_TEXT_CHARS" in items[1].reason
    report = client.index(collection_name(), texts, ["a", "b", "c"])
    assert report.stored == 2
    ((position, reason),) = report.rejected
    assert position == 1 and "id 'b'" in reason and "M3Q_MAX_TEXT_CHARS" in reason
    alive(worker)


@pytest.mark.slow
def test_a_hundred_thousand_texts_are_split_and_one_raw_job_of_them_is_refused(client, worker):
    texts = [f"q{i}" for i in range(100_000)]
    with pytest.raises(PayloadError, match="M3Q_MAX_JOB_TEXTS"):
        client.submit_encode(texts, "queries").raw(TIMEOUT_S)
    started = time.monotonic()
    items = client.encode(texts, "queries", job_texts=worker.settings.max_job_texts)
    print(f"\n100,000 texts in {time.monotonic() - started:.1f}s")
    assert len(items) == len(texts) and all(isinstance(i, Embedding) for i in items)
    probe = client.encode_queries([texts[54_321]])[0]
    assert np.abs(probe.dense - items[54_321].dense).max() <= 1e-5  # in order
    alive(worker)


def test_duplicate_ids_in_one_index_call_keep_the_first(client, worker):
    collection = collection_name()
    texts = ["first of dup", "other", "second of dup", "third of dup"]
    report = client.index(collection, texts, ["dup", "other", "dup", "dup"], job_texts=2)
    assert [i for i, _ in report.rejected] == [2, 3]
    assert all("duplicate id" in why and "'dup'" in why for _, why in report.rejected), report.rejected
    assert report.stored == 2 and stored_count(worker.settings, collection) == 2
    mc = milvus_client(worker.settings)
    assert mc.get(collection, ids=["dup"], output_fields=["text"])[0]["text"] == "first of dup"
    # inside one job the worker itself rejects the repeat
    handle = client.submit_index(collection, ["x", "y"], ["same", "same"])
    raw = handle.raw()
    assert raw["stored"] == 1 and "duplicate id 'same'" in raw["errors"][0][1], raw["errors"]


def test_bad_ids_and_metadata_are_rejected_by_name(client, worker):
    collection = collection_name()
    rows = [  # (id, metadata, what the error says)
        ("x" * 513, None, "513 characters, over the limit of 512 (M3Q_MAX_ID_CHARS)"),
        ("meta-list", [1, 2], "metadata must be a JSON object"),
        ("meta-nan", {"v": float("nan")}, "metadata is not JSON"),
        ("meta-bytes", {"v": b"\x00\x01"}, "metadata is not JSON"),
        ("meta-set", {"v": {1, 2}}, "metadata is not JSON"),
        ("", None, "id must be a non-empty string"),
        (None, None, "got NoneType"),
        ("good", {"lang": "en"}, None),
    ]
    ids, metadata, expected = (list(c) for c in zip(*rows))
    report = client.index(collection, [f"text {i}" for i in range(len(rows))], ids, metadata)
    rejected = dict(report.rejected)
    assert sorted(rejected) == list(range(len(rows) - 1))
    for i, reason in rejected.items():
        assert expected[i] in reason and repr(ids[i])[:20] in reason, reason
    assert report.stored == 1 and stored_count(worker.settings, collection) == 1
    alive(worker)


def test_a_text_whose_sparse_vector_is_empty_is_encoded_and_stored(client, worker):
    # On the tiny checkpoint every token of this word gets a weight <= 0 (tests/test_index.py lists more).
    (item,) = client.encode_documents(["know"])
    assert isinstance(item, Embedding) and item.sparse_dict() == {}, "pick another word for this checkpoint"
    collection = collection_name()
    report = client.index(collection, ["know", "a normal document"], ["empty-sparse", "normal"])
    assert report.stored == 2 and report.rejected == []
    assert stored_count(worker.settings, collection) == 2


def test_unknown_options_fail_the_job_by_name(client, worker):
    with pytest.raises(PayloadError, match="colour"):
        client.encode_queries(["x"], colour="blue")
    with pytest.raises(PayloadError, match="'shard'"):
        client.submit(wire.TASK_INDEX_DOCUMENTS, {"collection": "c", "texts": ["x"], "ids": ["1"], "shard": 3}).raw()
    with pytest.raises(PayloadError, match="'dense' must be true or false"):
        client.encode_documents(["x"], dense="yes")
    alive(worker)


def test_a_collection_of_another_dimension_is_refused_before_writing(client, worker):
    collection = collection_name()
    mc = milvus_client(worker.settings)
    sink.ensure_collection(mc, collection, 8, "some/other-model")
    with pytest.raises(PayloadError, match=rf"{collection}.*dim 8"):
        client.index(collection, ["a document"], ["doc"])
    assert milvus.count(mc, collection) == 0
    alive(worker)


# ---- abuse ------------------------------------------------------------------------------------------------

def test_a_pickled_index_job_is_refused_and_the_worker_goes_on(client, worker):
    s = worker.settings
    evil = wire.make_celery(s, name="evil")
    evil.conf.accept_content = ["pickle", "msgpack", "json"]
    pickled = evil.send_task(wire.TASK_INDEX_DOCUMENTS, args=[{"texts": ["x"], "ids": ["1"], "collection": "c"}],
                             queue=wire.document_queue(s), serializer="pickle")
    wait_for(lambda: re.search("ContentDisallowed|Refusing to deserialize", worker.output()), 30,
             "the worker logs the refused message")
    assert pickled.state == "PENDING"  # never decoded, never run
    collection = collection_name()
    assert client.index(collection, ["still indexing"], ["ok"]).stored == 1


def test_payload_over_the_limit_is_refused_before_any_encoding(client, worker):
    s = worker.settings
    texts = ["y" * 900_000] * 20  # 18 MB: every text is under M3Q_MAX_TEXT_CHARS, the job is over 16 MB
    with pytest.raises(PayloadError, match="M3Q_MAX_PAYLOAD_BYTES"):
        client.submit_encode(texts, "documents")  # refused by the producer: nothing is sent
    with pytest.raises(PayloadError, match="M3Q_MAX_PAYLOAD_BYTES"):
        client.index(collection_name(), texts, [str(i) for i in range(20)], job_texts=20)

    from celery import Celery

    plain = Celery("plain", broker=s.broker_url, backend=s.backend_url, set_as_current=False)
    plain.conf.update(result_serializer="msgpack", result_accept_content=["msgpack"])  # results are msgpack
    started = time.monotonic()
    sent = plain.send_task(wire.TASK_ENCODE_DOCUMENTS, args=[{"texts": texts}], queue=wire.document_queue(s))
    with pytest.raises(Exception, match="M3Q_MAX_PAYLOAD_BYTES"):
        sent.get(timeout=TIMEOUT_S)
    # Tokenizing 18 million characters alone would take far longer than this.
    assert time.monotonic() - started < 15
    alive(worker)


def test_milvus_token_is_passed_through(monkeypatch, worker, milvus_server):
    seen = []
    real = milvus.MilvusClient

    def spy(*args, **kwargs):
        seen.append(kwargs.get("token"))
        return real(*args, **kwargs)

    monkeypatch.setattr(milvus, "MilvusClient", spy)
    milvus.connect(worker.settings).close()
    assert seen == ["root:Milvus"]
    # The worker connects with the same token; Milvus Lite has no authentication and accepts any.
    assert Client(worker.settings).index(collection_name(), ["with a token"], ["t"]).stored == 1


def test_redis_password(private_redis, workers):
    server = private_redis("--requirepass", "s3cret-pw")
    s = make_settings(broker_url=server.url("s3cret-pw"))
    w = workers(s)
    (item,) = Client(s).encode_queries(["behind a password"])
    assert isinstance(item, Embedding)
    assert [x["hostname"] for x in wait_for(lambda: collect(s)["workers"], 20, "heartbeat")]

    wrong = s.replace(broker_url=server.url("not-the-password"))
    started = time.monotonic()
    with pytest.raises(ConnectionError) as failed:
        Client(wrong).submit_encode(["x"], "queries")
    message = str(failed.value)
    assert "password" in message and "not-the-password" not in message, message
    assert time.monotonic() - started < 10  # a wrong password is not retried until the job timeout
    out = m3q(wrong, "status")
    assert out.returncode == 2 and "password" in out.stderr and "not-the-password" not in out.stderr, out.stderr
    # a worker with the wrong password says why it cannot consume
    bad = workers(wrong, wait=False)
    wait_for(lambda: re.search(r"invalid username-password|WRONGPASS|[Aa]uthentication", bad.output()),
             TIMEOUT_S, "the worker logs the authentication failure", bad.proc)
    assert "not-the-password" not in bad.output()
    alive(w)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    folder.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=m3q test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")
    return folder / "server.crt", folder / "server.key", folder / "ca.crt"


def test_redis_over_tls(private_redis, workers, tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed: cannot make a test certificate")
    certificates = make_certificates(tmp_path / "tls")
    try:
        server = private_redis(tls=certificates)
    except AssertionError as e:
        pytest.skip(f"this redis-server cannot serve TLS: {e}")
    ca = str(certificates[2])
    s = make_settings(broker_url=server.url(), redis_tls_ca_file=ca)
    w = workers(s)
    (item,) = Client(s).encode_queries(["over TLS"])
    assert isinstance(item, Embedding)
    assert wait_for(lambda: collect(s)["workers"], 20, "heartbeat over TLS")

    untrusted = s.replace(redis_tls_ca_file="")  # the system CAs do not know our test CA
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        Client(untrusted).submit_encode(["x"], "queries")
    assert time.monotonic() - started < 10
    alive(w)


# ---- load ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_queries_answered_while_indexing_and_worker_memory_is_flat(workers, milvus_server):
    s = make_settings(milvus_uri=milvus_server, job_timeout_s=300)
    w = workers(s)
    client = Client(s)
    collection = collection_name()
    n_docs, n_queries = 20_000, 2_000
    texts = [f"document {i} on topic {i % 97} and {i % 13}" for i in range(n_docs)]
    ids = [f"doc-{i}" for i in range(n_docs)]
    done, rss = [0], {}

    def progress(k: int) -> None:
        done[0] += k
        if done[0] >= 1000 and "first" not in rss:
            rss["first"] = w.rss_kb()

    started = time.monotonic()
    indexing, indexed = in_thread(lambda: (client.index(collection, texts, ids, job_texts=100, progress=progress),
                                           time.monotonic()))

    def query(i: int) -> tuple[float, float, object]:
        t0 = time.monotonic()
        (item,) = client.encode_queries([f"query number {i} about topic {i % 97}"])
        return t0, time.monotonic(), item

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(query, range(n_queries)))
    queries_done = time.monotonic()
    indexing.join(300)
    assert not indexing.is_alive(), "the index did not finish in 300 s"
    rss["last"] = w.rss_kb()
    assert "error" not in indexed, indexed.get("error")
    report, index_done = indexed["value"]
    elapsed = index_done - started

    assert all(isinstance(item, Embedding) for _, _, item in answers)
    assert report.stored == n_docs and report.rejected == []
    assert stored_count(s, collection) == n_docs
    latencies = np.array([end - begin for begin, end, _ in answers])
    p50, p99 = np.percentile(latencies, [50, 99])
    print(f"\nload: {n_docs} documents indexed in {elapsed:.1f}s ({n_docs / elapsed:.0f} docs/s); "
          f"{n_queries} queries in {queries_done - started:.1f}s, latency p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {latencies.max() * 1000:.0f} ms; worker RSS {rss['first'] / 1024:.1f} MiB "
          f"after 1,000 docs, {rss['last'] / 1024:.1f} MiB after {n_docs:,}")
    assert queries_done < index_done, "the queries did not all run while the index was going on"
    assert abs(rss["last"] - rss["first"]) <= 0.10 * rss["first"]
