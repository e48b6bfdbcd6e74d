"""The producer side of the query stream and the native asyncio client: real Redis, real worker processes.

Queries go on the Redis stream (``producer.contract.stream``) and come back on one reply list per process,
read by one thread whose futures blocking callers wait on and asyncio callers await; documents are Celery
tasks awaited through one pub/sub connection per loop. Every test also checks that its jobs went over the
path it is about (the stream's consumer group read them, or the process kept its threads).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from celery.signals import before_task_publish

from producer.client import Client, JobTimeout
from producer.contract import stream, wire
from producer.contract.wire import Embedding, ItemError, PayloadError
from tests.conftest import ROOT, make_settings, settings_env

TOL = 1e-5


def _close(a: Embedding, b: Embedding) -> None:
    assert np.abs(a.dense - b.dense).max() <= TOL
    assert a.sparse_dict().keys() == b.sparse_dict().keys()
    assert np.abs(a.sparse_weights - b.sparse_weights).max(initial=0) <= TOL


def _lane_reads(redis_client, s) -> int:
    """Entries the workers' consumer group has read from the query stream (0 when it does not exist)."""
    if not redis_client.exists(stream.stream_key(s)):
        return 0
    groups = [g for g in redis_client.xinfo_groups(stream.stream_key(s)) if g["name"] == stream.GROUP.encode()]
    return int(groups[0]["entries-read"] or 0) if groups else 0


class ThreadWatch:
    """The most threads this process had while an awaited call ran (sampled every few milliseconds)."""

    def __init__(self) -> None:
        self.most = threading.active_count()

    async def during(self, work):
        async def sample() -> None:
            while True:
                self.most = max(self.most, threading.active_count())
                await asyncio.sleep(0.005)

        sampler = asyncio.ensure_future(sample())
        try:
            return await work
        finally:
            sampler.cancel()


def test_a_thousand_concurrent_awaits_each_get_their_own_vectors(client, encoder, redis_client):
    texts = [f"query {i} about topic {i % 37} and the {i * 7 % 101}th lane" for i in range(1000)]
    before_threads, before_reads = threading.active_count(), _lane_reads(redis_client, client.settings)
    watch = ThreadWatch()

    async def run():
        return await watch.during(asyncio.gather(*(client.aencode_queries([t]) for t in texts)))

    answers = asyncio.run(run())
    local = encoder.encode(texts, "queries").items
    for (item,), expected in zip(answers, local):
        _close(item, expected)
    # No thread per await: at most the process's reply reader and stream sender, and the one thread that
    # checks for a live worker.
    assert watch.most <= before_threads + 3, (before_threads, watch.most)
    assert _lane_reads(redis_client, client.settings) - before_reads >= len(texts)


def test_blocking_queries_go_on_the_lane_from_many_threads(client, encoder, redis_client):
    texts = [f"threaded query {i}" for i in range(64)]
    before = _lane_reads(redis_client, client.settings)
    answers: dict[int, Embedding] = {}

    def ask(i: int) -> None:
        (answers[i],) = client.encode_queries([texts[i]])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    local = encoder.encode(texts, "queries").items
    for i, expected in enumerate(local):
        _close(answers[i], expected)
    assert _lane_reads(redis_client, client.settings) - before >= len(texts)


def test_two_hundred_concurrent_document_awaits_and_await_handle(client, encoder):
    texts = [f"document {i}: the queue keeps {i % 13} promises about documents" for i in range(200)]
    watch = ThreadWatch()
    before_threads = threading.active_count()
    published_on: list[str] = []  # the thread of each Celery publish, from Celery's own signal

    def on_publish(sender=None, **_):
        if sender == wire.TASK_ENCODE_DOCUMENTS:
            published_on.append(threading.current_thread().name)

    async def run():
        handle = client.submit_encode(["awaited handle", "second text"], "documents")  # a blocking send, on purpose
        docs = await watch.during(asyncio.gather(*(client.aencode_documents([t]) for t in texts)))
        return docs, await handle

    before_task_publish.connect(on_publish, weak=False)
    try:
        docs, awaited = asyncio.run(run())
    finally:
        before_task_publish.disconnect(on_publish)
    # The loop never blocked on a publish: every aencode_documents job left from the client's one publisher.
    # (A job a worker lost as it took it is sent again from the wait's checks: counted, not on the loop either.)
    loop_thread = threading.current_thread().name
    assert published_on[0] == loop_thread and loop_thread not in published_on[1:], set(published_on)
    assert published_on.count("m3q-publish_0") == len(texts), set(published_on)
    local = encoder.encode(texts, "documents").items
    for (item,), expected in zip(docs, local):
        _close(item, expected)
    for item, expected in zip(awaited, encoder.encode(["awaited handle", "second text"], "documents").items):
        _close(item, expected)
    assert watch.most <= before_threads + 2, (before_threads, watch.most)  # not one per await


def test_aclose_stops_the_loops_reader_and_listener_and_the_client_works_after(shared_worker, encoder):
    client = Client(shared_worker.settings)

    def ours() -> set[str]:
        return {t.get_name() for t in asyncio.all_tasks() if t.get_name() in ("m3q-replies", "m3q-results")}

    async def run():
        (query,), (document,) = await asyncio.gather(client.aencode_queries(["close me"]),
                                                     client.aencode_documents(["close me too"]))
        running = ours()
        await client.aclose()
        await asyncio.sleep(0)  # let the cancelled tasks finish
        left = ours()
        (again,) = await client.aencode_queries(["close me"])  # a closed client opens what it needs again
        await client.aclose()
        return query, document, running, left, again

    query, document, running, left, again = asyncio.run(run())
    # The reply reader idles for a while before it stops; the result listener may already have stopped.
    assert "m3q-replies" in running and left == set()
    (expected_query,), (expected_document,) = encoder.encode(["close me"], "queries").items, \
        encoder.encode(["close me too"], "documents").items
    _close(query, expected_query), _close(again, expected_query), _close(document, expected_document)


def test_bad_inputs_on_the_lane_are_answered_per_item(client, redis_client):
    s = client.settings
    texts = ["fine", "", None, "x" * (s.max_text_chars + 1), "lone \ud800", "fine too"]
    before = _lane_reads(redis_client, s)
    blocking = client.encode_queries(texts)
    awaited = asyncio.run(client.aencode_queries(texts))
    for items in (blocking, awaited):
        assert isinstance(items[0], Embedding) and isinstance(items[-1], Embedding)
        assert all(isinstance(i, ItemError) for i in items[1:-1])
        assert "empty" in items[1].reason
        assert "NoneType" in items[2].reason
        assert "M3Q_MAX_TEXT_CHARS" in items[3].reason
        assert "surrogate" in items[4].reason
    with pytest.raises(PayloadError, match="colour"):
        client.encode_queries(["x"], colour="blue")
    with pytest.raises(PayloadError, match="colour"):
        asyncio.run(client.aencode_queries(["x"], colour="blue"))
    small = Client(s.replace(max_payload_bytes=100))
    with pytest.raises(PayloadError, match="M3Q_MAX_PAYLOAD_BYTES"):
        small.encode_queries(["y" * 200])
    with pytest.raises(PayloadError, match="M3Q_MAX_PAYLOAD_BYTES"):
        asyncio.run(small.aencode_queries(["y" * 200]))
    assert _lane_reads(redis_client, s) - before == 4  # two jobs of texts, two refused by the worker


def test_jobs_read_together_with_different_options_and_bad_texts_are_each_answered_as_alone(client, encoder):
    """A worker tokenizes the texts of one read's jobs in one call per set of options: each job still gets
    its own options, its own truncation, and its bad texts answered as errors in place."""
    options = [{}, {"max_length": 8}, {"max_length": 8, "truncation_side": "left"}, {"normalize": False},
               {"colbert": True}]
    long = "a rather long query about queues and streams " * 8
    jobs = [([f"{long}{i}", "", f"short {i}", None], options[i % len(options)]) for i in range(40)]

    async def run():
        return await asyncio.gather(*(client.aencode_queries(texts, **opts) for texts, opts in jobs))

    for (texts, opts), items in zip(jobs, asyncio.run(run())):
        local = encoder.encode(texts, "queries", **opts).items
        assert isinstance(items[1], ItemError) and "empty" in items[1].reason
        assert isinstance(items[3], ItemError) and "NoneType" in items[3].reason
        for n in (0, 2):
            _close(items[n], local[n])
            assert items[n].n_tokens == local[n].n_tokens and items[n].truncated == local[n].truncated
            if opts.get("colbert"):
                assert np.abs(items[n].colbert - local[n].colbert).max() <= TOL
        assert items[0].truncated == ("max_length" in opts)


def test_a_duplicate_or_stray_reply_is_dropped_and_the_reader_goes_on(client, encoder, redis_client):
    from producer.replies import reply_reader

    client.encode_queries(["start the reader"])
    key = reply_reader(client.settings).key
    redis_client.rpush(key, stream.encode_reply("nobody-waits-for-this", {"items": []}), b"\x93not a reply")
    redis_client.expire(key, stream.REPLY_TTL_S)
    (item,) = client.encode_queries(["after the strays"])
    _close(item, encoder.encode(["after the strays"], "queries").items[0])

    async def awaited():
        return await client.submit_encode(["an awaited lane handle"], "queries")

    (item,) = asyncio.run(awaited())
    _close(item, encoder.encode(["an awaited lane handle"], "queries").items[0])


def test_job_ids_are_unique_across_threads_and_in_a_forked_child():
    import os

    with ThreadPoolExecutor(8) as pool:
        ids = [i for chunk in pool.map(lambda _: [stream.new_job_id() for _ in range(2000)], range(8)) for i in chunk]
    assert len(set(ids)) == len(ids) == 16000
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child's first ids, written back to the parent
        os.write(write, " ".join(stream.new_job_id() for _ in range(3)).encode())
        os._exit(0)
    os.waitpid(child, 0)
    from_child = os.read(read, 4096).decode().split()
    mine = [stream.new_job_id() for _ in range(3)]
    assert len(from_child) == 3 and not set(from_child) & set(mine + ids)
    assert from_child[0].split("-")[0] != mine[0].split("-")[0], "a forked child gets its own prefix"


def test_a_waiter_set_by_a_reply_and_a_failure_at_once_keeps_one_and_wakes_blocking_and_awaiting_callers():
    from concurrent.futures import TimeoutError as FutureTimeout

    from producer.waiter import Waiter

    waiters, errors = [Waiter() for _ in range(3000)], []

    def settle(how) -> None:
        try:
            for waiter in waiters:
                how(waiter)
        except Exception as e:  # noqa: BLE001 - a second set must never raise in the reader or the sender
            errors.append(e)

    racers = [threading.Thread(target=settle, args=(lambda w: w.set_result("reply"),)),
              threading.Thread(target=settle, args=(lambda w: w.set_exception(JobTimeout("gave up")),))]
    [t.start() for t in racers]
    [t.join() for t in racers]
    assert errors == []

    def outcome(waiter: Waiter) -> str:
        try:
            return waiter.result(timeout=0)
        except JobTimeout:
            return "failed"
    firsts = [outcome(w) for w in waiters]
    assert set(firsts) <= {"reply", "failed"} and [outcome(w) for w in waiters] == firsts  # the same at every look

    late = Waiter()
    with pytest.raises(FutureTimeout):
        late.result(timeout=0.05)
    threading.Timer(0.1, late.set_result, ("late reply",)).start()
    assert late.result(timeout=5) == "late reply"

    async def awaited() -> list:
        before, after, abandoned = Waiter(), Waiter(), Waiter()
        before.set_result("set before the await")
        threading.Timer(0.1, after.set_result, ("set from a thread during the await",)).start()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(abandoned.loop_future(), 0.05)
        abandoned.set_result("after its waiter gave up")  # dropped, without an error on the loop
        got = [await before.loop_future(), await asyncio.wait_for(after.loop_future(), 5)]
        await asyncio.sleep(0.05)
        return got
    assert asyncio.run(awaited()) == ["set before the await", "set from a thread during the await"]


def test_two_replies_to_one_job_in_one_read_resolve_it_once_and_the_loops_reader_goes_on(redis_client):
    from producer.replies import LoopReplies

    s = make_settings()

    async def two_replies_then_a_third_job() -> list:
        replies = LoopReplies.for_loop(s)
        first, second = replies.expect("sent-twice"), replies.expect("other")
        redis_client.rpush(replies.key, stream.encode_reply("sent-twice", {"n": 1}),
                           stream.encode_reply("sent-twice", {"n": 2}), stream.encode_reply("other", {"n": 3}))
        answered = await asyncio.wait_for(asyncio.gather(first, second), 10)
        third = replies.expect("later")
        redis_client.rpush(replies.key, stream.encode_reply("later", {"n": 4}))
        answered.append(await asyncio.wait_for(third, 10))
        await LoopReplies.close_loop(s)
        return answered

    answered = asyncio.run(two_replies_then_a_third_job())
    assert [result for result, _error in answered] == [{"n": 1}, {"n": 3}, {"n": 4}]


def test_awaits_of_one_loop_end_at_their_own_deadlines_and_a_reply_after_its_deadline_is_dropped(redis_client):
    from producer.query_stream import QueryStream
    from producer.replies import EXPIRY_S, LoopReplies

    s = make_settings(require_worker=False, job_timeout_s=60)
    queries = QueryStream(s, watch=lambda queue: None)

    async def wait(handle, timeout_s: float) -> float:
        started = time.monotonic()
        with pytest.raises(JobTimeout, match=rf"{handle.id} .*after {timeout_s:g}s"):
            await handle.araw(timeout_s)
        return time.monotonic() - started

    async def run() -> tuple[list[float], list[float], tuple]:
        loop = asyncio.get_running_loop()
        send = lambda: queries.submit(wire.TASK_INFO, {}, b"\x80", loop=loop)  # noqa: E731 - nobody answers
        short, long = [send() for _ in range(40)], [send() for _ in range(40)]
        waited = await asyncio.gather(*(wait(h, 0.5) for h in short), *(wait(h, 1.5) for h in long))
        replies, later = LoopReplies.for_loop(s), send()
        redis_client.rpush(replies.key, stream.encode_reply(short[0].id, {"late": True}),
                           stream.encode_reply(later.id, {"n": 1}))
        answered = await later.araw(10)
        await LoopReplies.close_loop(s)
        return waited[:40], waited[40:], answered

    try:
        short, long, answered = asyncio.run(run())
        slack = EXPIRY_S + 0.5  # one check interval, plus a busy machine
        assert all(0.5 <= w < 0.5 + slack for w in short), short
        assert all(1.5 <= w < 1.5 + slack for w in long), long
        assert answered == {"n": 1}
    finally:
        redis_client.delete(stream.stream_key(s))


def test_job_timeout_when_no_worker(redis_client):
    s = make_settings(require_worker=False, job_timeout_s=2.0)
    client = Client(s)
    try:
        started = time.monotonic()
        with pytest.raises(JobTimeout, match=r"m3q worker.*m3q status"):
            client.encode_queries(["nobody listens"])
        assert time.monotonic() - started < 10
        with pytest.raises(JobTimeout, match=r"m3q worker.*m3q status"):
            asyncio.run(client.aencode_queries(["nobody listens either"]))
        assert redis_client.xlen(stream.stream_key(s)) == 2  # both waited on the stream, not a Celery queue
    finally:
        redis_client.delete(stream.stream_key(s))


def test_sends_redis_refuses_fail_at_once_and_the_next_sends_on_the_same_client_are_answered(
        private_redis, spawn_worker, encoder):
    import redis

    server = private_redis()
    s = make_settings(broker_url=server.url())
    spawn_worker(s)
    client, admin = Client(s), redis.Redis.from_url(server.url())
    texts = [f"question {i} around a full Redis" for i in range(8)]
    expected = encoder.encode(texts, "queries").items

    async def together(batch: list[str]) -> list:
        return await asyncio.gather(*(client.aencode_queries([t]) for t in batch), return_exceptions=True)

    client.encode_queries(["warm"])
    asyncio.run(together(["warm"]))
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
            client.encode_queries(texts[:1])
        refused = asyncio.run(together(texts))  # one write of eight XADDs, every one refused
        assert all(isinstance(e, redis.exceptions.OutOfMemoryError) for e in refused), refused
        assert time.monotonic() - started < 5  # a refusal is not retried like an outage
    finally:
        admin.config_set("maxmemory", 0)
    # The seven error replies left unread after the first must not reach the next sends.
    answered = [*(r[0] for r in asyncio.run(together(texts))), *(client.encode_queries([t])[0] for t in texts)]
    for item, want in zip(answered, [*expected, *expected]):
        _close(item, want)


@pytest.mark.slow
def test_sends_whose_replies_redis_holds_past_the_socket_timeout_are_sent_again_and_answered_once(
        private_redis, spawn_worker, caplog):
    import redis

    from producer.query_stream import QueryStream

    server = private_redis("--enable-debug-command", "yes")
    s = make_settings(broker_url=server.url(), job_timeout_s=60)
    spawn_worker(s)
    admin = redis.Redis.from_url(server.url(), socket_timeout=30)
    queries = QueryStream(s, watch=lambda queue: None)
    info = Client(s).info()  # the worker's answer to m3q.info, through the process's reader and sender

    async def through_a_stall() -> list:
        loop = asyncio.get_running_loop()
        await queries.submit(wire.TASK_INFO, {}, b"\x80", loop=loop).araw()  # the loop's reader and sender
        # DEBUG SLEEP holds every reply for 7 s, past the 5 s socket timeout of the sends' reads.
        stall = asyncio.ensure_future(asyncio.to_thread(admin.execute_command, "DEBUG", "SLEEP", "7"))
        await asyncio.sleep(0.3)
        awaited = [queries.submit(wire.TASK_INFO, {}, b"\x80", loop=loop).araw() for _ in range(3)]
        blocking = [asyncio.to_thread(queries.submit(wire.TASK_INFO, {}, b"\x80").raw) for _ in range(3)]
        answered = await asyncio.gather(*awaited, *blocking)
        await stall
        return answered

    started = time.monotonic()
    answered = asyncio.run(through_a_stall())
    assert len(answered) == 6 and all(a["dims"] == info["dims"] for a in answered), answered
    assert time.monotonic() - started < 30
    timed_out = [r.getMessage() for r in caplog.records if "on the query stream: Redis unreachable" in r.getMessage()]
    assert len(timed_out) >= 2 and all("Timeout reading" in m for m in timed_out), timed_out  # both senders


@pytest.mark.slow
def test_queries_after_the_server_closed_the_idle_connections_are_answered_without_an_outage(
        private_redis, spawn_worker, encoder, caplog):
    """The sender, the reply reader and the worker's writer hold their connections; a Redis that closes idle
    clients (``timeout``, as managed services do) must not turn the first query after a pause into an outage
    and a resend, nor the worker's answer into a failed write and a retry."""
    server = private_redis("--timeout", "2")  # over the readers' 1 s BLPOP, which a blocked client may reach
    s = make_settings(broker_url=server.url())
    worker = spawn_worker(s)
    client = Client(s)
    texts = ["after a pause", "and after another"]
    expected = encoder.encode(texts, "queries").items

    async def twice() -> list:
        first = await client.aencode_queries(texts[:1])
        await asyncio.sleep(IDLE_CLOSED_S)  # the server closes the loop's sending connection
        return [*first, *await client.aencode_queries(texts[1:])]

    for ask in (lambda: twice_blocking(client, texts), lambda: asyncio.run(twice())):
        caplog.clear()
        answered = ask()
        assert len(answered) == 2
        for item, want in zip(answered, expected):
            _close(item, want)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert not warnings, warnings  # no outage: no "Redis unreachable", no resend
    out = worker.output()  # the writer's connection was closed while idle: no failed answer, no retry
    assert "could not answer" not in out and "cannot reach Redis" not in out, out[-2000:]


IDLE_CLOSED_S = 4.0
"""A pause after which a Redis with ``timeout 2`` has closed the idle connections."""


def twice_blocking(client: Client, texts: list[str]) -> list:
    first = client.encode_queries(texts[:1])
    time.sleep(IDLE_CLOSED_S)  # the server closes the sender's connection
    return [*first, *client.encode_queries(texts[1:])]


CLIENT_SCRIPT = r"""
import asyncio, json, sys, threading
from producer.client import Client
name, n = sys.argv[1], int(sys.argv[2])
client = Client()
texts = [f"{name} asks question {i} about {i % 11}" for i in range(n)]
out = {}
def ask(i):
    (item,) = client.encode_queries([texts[i]])
    out[texts[i]] = item.dense.tolist()
threads = [threading.Thread(target=ask, args=(i,)) for i in range(0, n, 2)]
[t.start() for t in threads]
async def main():
    odd = [texts[i] for i in range(1, n, 2)]
    for text, (item,) in zip(odd, await asyncio.gather(*(client.aencode_queries([t]) for t in odd))):
        out[text] = item.dense.tolist()
asyncio.run(main())
[t.join() for t in threads]
print(json.dumps(out))
"""


def test_replies_never_reach_the_wrong_waiter_with_two_clients_and_two_workers(spawn_worker, encoder, redis_client):
    s = make_settings()
    workers = [spawn_worker(s, device="cpu:0"), spawn_worker(s, device="cpu:1")]
    n = 200
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, name, str(n)], cwd=ROOT, env=settings_env(s),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in ("alpha", "beta")]
    outputs = [c.communicate(timeout=180) for c in clients]
    for c, (_, err) in zip(clients, outputs):
        assert c.returncode == 0, err[-3000:]
    for out, _ in outputs:
        answers = json.loads(out)
        assert len(answers) == n
        texts = sorted(answers)
        for text, expected in zip(texts, encoder.encode(texts, "queries").items):
            assert np.abs(np.asarray(answers[text], dtype=np.float32) - expected.dense).max() <= TOL, text
    consumers = redis_client.xinfo_consumers(stream.stream_key(s), stream.GROUP)
    assert len(consumers) == 2, consumers  # both workers read the stream
    assert _lane_reads(redis_client, s) >= 2 * n
    assert all(w.proc.poll() is None for w in workers)


@pytest.mark.slow
def test_awaits_waiting_through_a_redis_restart_are_answered(tmp_path, spawn_worker, encoder):
    from producer.devstack import RedisServer

    server = RedisServer(tmp_path / "redis", ("--appendonly", "yes")).start()
    try:
        s = make_settings(broker_url=server.url(), job_timeout_s=120)
        spawn_worker(s)
        client = Client(s)

        async def run():
            await client.aencode_queries(["warm the reader"])
            await client.aencode_documents(["warm the listener"])
            documents = [asyncio.ensure_future(client.aencode_documents([f"document {i} across a restart"]))
                         for i in range(10)]
            # Some are still being published (on the client's publishing thread) as Redis goes away: those
            # are sent again once it is back; the rest run on the worker through its reconnect.
            await asyncio.sleep(0)
            await asyncio.to_thread(server.stop)
            queries = [asyncio.ensure_future(client.aencode_queries([f"query {i} sent while Redis is down"]))
                       for i in range(10)]
            await asyncio.sleep(3)
            await asyncio.to_thread(server.start)
            return await asyncio.gather(*documents), await asyncio.gather(*queries)

        documents, queries = asyncio.run(asyncio.wait_for(run(), 150))
        for i, (item,) in enumerate(queries):
            _close(item, encoder.encode([f"query {i} sent while Redis is down"], "queries").items[0])
        for i, (item,) in enumerate(documents):
            _close(item, encoder.encode([f"document {i} across a restart"], "documents").items[0])
    finally:
        server.stop()
