"""Issue 13, the worker side of the stream lane: query jobs on a Redis stream, replies on per-client lists.

Real Redis, real `m3q worker` processes on the tiny checkpoint. The tests write stream entries with a plain
redis client (:func:`producer.contract.stream.request_fields`) and read the replies with BLPOP on a reply list of their
own, so they depend on the wire contract only, not on the producer's client.
"""
from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import redis as redis_py

from producer.contract import stream, wire
from producer.contract.settings import Settings
from producer.contract.wire import failures_key
from tests.conftest import TINY, make_settings, wait_for
from tests.test_faults import CRASH_EXIT_CODE, crash_on
from worker import threads
from worker.encoder import Encoder

TOL = 1e-5
BURST = 200


def client(s: Settings) -> redis_py.Redis:
    return redis_py.Redis.from_url(s.broker_url)


def new_reply_key(s: Settings) -> str:
    return stream.reply_key(s, stream.new_client_id())


def send(r: redis_py.Redis, s: Settings, reply_to: str, jobs: dict[str, dict]) -> None:
    """XADD one entry per job, all in one round trip (a burst)."""
    pipe = r.pipeline(transaction=False)
    for job_id, payload in jobs.items():
        pipe.xadd(stream.stream_key(s), stream.request_fields(job_id, reply_to, payload))
    pipe.execute()


Replies = dict[str, tuple[dict | None, str | None]]


def receive(r: redis_py.Redis, reply_to: str, n: int, timeout_s: float = 60) -> Replies:
    """The next ``n`` replies on ``reply_to``: job id -> (result, error)."""
    replies: Replies = {}
    deadline = time.monotonic() + timeout_s
    while len(replies) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(replies)} of {n} replies after {timeout_s:.0f}s")
        popped = r.blpop([reply_to], 1)  # short waits: under the client's socket timeout
        if popped is None:
            continue
        job_id, result, error = stream.decode_reply(popped[1])
        replies[job_id] = (result, error)
    return replies


def lane_status(s: Settings, r: redis_py.Redis, until=lambda figures: True, timeout_s: float = 10) -> dict:
    """The stream lane's figures in the heartbeat of a live worker, once ``until`` holds for them."""
    def check() -> dict | None:
        for beat in wire.live_workers(s, r):
            if beat.get("query_stream") and until(beat["query_stream"]):
                return beat["query_stream"]
        return None

    return wait_for(check, timeout_s, "the stream lane's figures in a heartbeat")


def assert_clean(s: Settings, r: redis_py.Redis) -> None:
    """Nothing of the lane left in Redis but keys that expire."""
    key = stream.stream_key(s)
    assert r.xlen(key) == 0
    assert r.xpending(key, stream.GROUP)["pending"] == 0
    for key in r.scan_iter(match=stream.reply_key(s, "*")):
        assert 0 < r.ttl(key) <= stream.REPLY_TTL_S, key


def pending_on(s: Settings, r: redis_py.Redis) -> dict[str, int]:
    """Entries pending in the group, per consumer."""
    info = r.xpending(stream.stream_key(s), stream.GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in info.get("consumers") or []}


@pytest.fixture(scope="module")
def local_encoder() -> Encoder:
    return Encoder.load(str(TINY), device="cpu", dtype="float32")


def assert_same(item: dict, expected) -> None:
    got = wire.decode_item(item)
    np.testing.assert_allclose(got.dense, expected.dense, rtol=0, atol=TOL)
    want = expected.sparse_dict()
    assert set(got.sparse_dict()) == set(want)
    np.testing.assert_allclose([got.sparse_dict()[k] for k in want], list(want.values()), rtol=0, atol=TOL)
    if expected.colbert is not None:
        np.testing.assert_allclose(got.colbert, expected.colbert, rtol=0, atol=TOL)


def test_a_burst_is_answered_with_the_in_process_vectors_in_few_reads(workers, local_encoder):
    s = make_settings(dead_worker_s=6)
    worker = workers(s)
    r = client(s)
    reply_to = new_reply_key(s)
    texts = [f"query number {i} about {'red green blue'.split()[i % 3]} things" for i in range(BURST)]
    jobs = {f"q{i}": {"texts": [t], "colbert": i % 4 == 0} for i, t in enumerate(texts)}
    send(r, s, reply_to, jobs)

    # Every reply lands on the list, which expires after its last reply.
    wait_for(lambda: r.llen(reply_to) == BURST, 60, "all replies on the reply list")
    assert 0 < r.ttl(reply_to) <= stream.REPLY_TTL_S
    replies = receive(r, reply_to, BURST)

    expected = {f"q{i}": local_encoder.encode([t], "queries", colbert=i % 4 == 0).items[0]
                for i, t in enumerate(texts)}
    for job_id, (result, error) in replies.items():
        assert error is None, (job_id, error)
        assert len(result["items"]) == 1 and result["tokens"] > 0 and result["worker"].startswith("m3q-")
        assert_same(result["items"][0], expected[job_id])

    # 200 jobs with a prefetch of 64: a handful of XREADGROUPs, not one per job.
    figures = lane_status(s, r, lambda f: f["replies"] >= BURST)
    assert figures["entries"] == BURST and figures["replies"] == BURST
    assert figures["reads"] <= BURST // 8, figures
    assert figures["pending"] == 0
    assert_clean(s, r)

    # The worker's own threads carry their names for the OS (top -H; bench/lane.py splits CPU by them).
    names = {task.joinpath("comm").read_text().strip() for task in Path(f"/proc/{worker.proc.pid}/task").iterdir()}
    assert {threads.DEVICE, threads.HEARTBEAT, threads.STREAM_READER, threads.STREAM_WRITER} <= names, names


def test_bad_entries_are_answered_naming_why_and_the_rest_of_the_burst_succeeds(workers):
    s = make_settings(dead_worker_s=6, max_job_texts=5)
    workers(s)
    r = client(s)
    reply_to = new_reply_key(s)
    key = stream.stream_key(s)
    good = {f"ok{i}": {"texts": [f"good query {i}"]} for i in range(20)}
    bad = {"unknown-option": {"texts": ["x"], "colour": "red"},
           "too-many": {"texts": ["x"] * 6},
           "not-a-map": ["x"],
           "bad-max-length": {"texts": ["x"], "max_length": "long"}}
    pipe = r.pipeline(transaction=False)
    for job_id, payload in list(good.items())[:10]:
        pipe.xadd(key, stream.request_fields(job_id, reply_to, payload))
    pipe.xadd(key, {stream.F_ID: b"pickled", stream.F_REPLY: reply_to.encode(),
                       stream.F_BODY: pickle.dumps({"texts": ["x"]})})
    pipe.xadd(key, {stream.F_ID: b"no-body", stream.F_REPLY: reply_to.encode()})
    for job_id, payload in bad.items():
        pipe.xadd(key, stream.request_fields(job_id, reply_to, payload))
    # A reply list outside the lane's keys: acknowledged, never written to.
    foreign = f"{s.queue_prefix}.documents"
    pipe.xadd(key, stream.request_fields("foreign-reply", foreign, {"texts": ["x"]}))
    pipe.xadd(key, stream.request_fields("item-error", reply_to, {"texts": ["fine", "   "]}))
    for job_id, payload in list(good.items())[10:]:
        pipe.xadd(key, stream.request_fields(job_id, reply_to, payload))
    pipe.execute()

    replies = receive(r, reply_to, len(good) + len(bad) + 3)
    for job_id in good:
        result, error = replies[job_id]
        assert error is None and wire.decode_item(result["items"][0]).dense is not None, job_id
    assert replies["pickled"][1].startswith("PayloadError: the body is not msgpack"), replies["pickled"]
    assert replies["no-body"][1] == "PayloadError: the entry has no 'body' field"
    assert replies["unknown-option"][1].startswith("PayloadError: unknown option(s) 'colour'")
    assert "M3Q_MAX_JOB_TEXTS" in replies["too-many"][1]
    assert replies["not-a-map"][1] == "PayloadError: payload must be a map, got list"
    assert "'max_length' must be an integer" in replies["bad-max-length"][1]
    # A bad text is an item error; its job and its good text succeed.
    result, error = replies["item-error"]
    assert error is None and "error" not in result["items"][0] and "empty" in result["items"][1]["error"]

    assert r.exists(foreign) == 0
    # Recorded just after the replies go out (the accounting follows the reply pipeline).
    wait_for(lambda: {json.loads(f)["id"] for f in r.lrange(failures_key(s), 0, -1)} >= {"pickled", "no-body", *bad},
             10, "every bad entry recorded as a failure")
    wait_for(lambda: r.xlen(key) == 0, 10, "the foreign-reply entry acknowledged")
    assert_clean(s, r)


@pytest.mark.slow
def test_queries_held_by_a_dead_worker_are_answered_by_another_within_the_bound(workers):
    s = make_settings(dead_worker_s=6)
    r = client(s)
    victim = workers(s, env=crash_on("crash here"))
    victim_name = wire.live_workers(s, r)[0]["hostname"]
    reply_to = new_reply_key(s)
    # The crashing text early in the burst: the victim dies holding the rest of what it read.
    jobs = {f"q{i}": {"texts": ["crash here" if i == 2 else f"query {i}"]} for i in range(40)}
    send(r, s, reply_to, jobs)
    assert victim.proc.wait(30) == CRASH_EXIT_CODE
    died = time.monotonic()
    answered_by_victim = r.llen(reply_to)
    held = pending_on(s, r).get(victim_name, 0)
    assert held >= 2, f"the victim held {held} entries when it died"

    survivor = workers(s)
    replies = receive(r, reply_to, len(jobs), timeout_s=60)
    took = time.monotonic() - died
    assert all(error is None for _, error in replies.values()), replies
    survivor_pid = f"-{survivor.proc.pid}@"
    assert sum(survivor_pid in result["worker"] for result, _ in replies.values()) >= held
    assert replies["q2"][0]["worker"].find(survivor_pid) >= 0  # the crashing text too: it killed one worker only
    # Within the bound from the death, plus the survivor's own start (it was not running yet).
    assert took <= s.dead_worker_s + 30, took
    assert lane_status(s, r, lambda f: f["claimed"] > 0)["claimed"] >= held
    print(f"victim answered {answered_by_victim}, held {held}; all answered {took:.1f}s after its death")

    # The dead consumer, holding nothing now, leaves the group.
    consumers = lambda: {c["name"].decode() for c in r.xinfo_consumers(stream.stream_key(s), stream.GROUP)}  # noqa: E731
    wait_for(lambda: victim_name not in consumers(), 3 * wire.heartbeat_s(s) + 5,
             "the dead consumer deleted from the group")
    assert_clean(s, r)


@pytest.mark.slow
def test_a_poison_query_is_given_up_after_bounded_deliveries(workers):
    s = make_settings(dead_worker_s=6, task_max_retries=1)  # two deliveries allowed
    r = client(s)
    reply_to = new_reply_key(s)
    crash = crash_on("poison")
    first = workers(s, env=crash)
    send(r, s, reply_to, {"poison-job": {"texts": ["poison"]}})
    assert first.proc.wait(30) == CRASH_EXIT_CODE
    # The second worker claims it once the first one's heartbeat has expired, and dies of it too.
    second = workers(s, env=crash, wait=False)
    assert second.proc.wait(60) == CRASH_EXIT_CODE
    assert r.xpending_range(stream.stream_key(s), stream.GROUP, "-", "+", 10)[0]["times_delivered"] == 2
    # The third would be delivery 3: given up on, answered with why, recorded; the third worker lives on.
    third = workers(s, env=crash)
    send(r, s, reply_to, {"fine-job": {"texts": ["a fine query"]}})
    replies = receive(r, reply_to, 2, timeout_s=60)
    assert replies["fine-job"][1] is None
    assert replies["poison-job"] == (None, "PoisonJob: job poison-job was delivered 3 times without finishing "
                                           "(M3Q_TASK_MAX_RETRIES=1); giving up")
    assert third.proc.poll() is None
    # Recorded just after the reply goes out (the accounting follows the reply pipeline).
    wait_for(lambda: any(f["id"] == "poison-job" and f["reason"].startswith("PoisonJob")
                         for f in map(json.loads, r.lrange(failures_key(s), 0, -1))), 10, "the failure is recorded")
    assert lane_status(s, r, lambda f: f["poison"] > 0)["poison"] == 1
    assert_clean(s, r)


@pytest.mark.slow
def test_sigterm_answers_what_the_worker_took_and_leaves_nothing_lost(workers):
    s = make_settings(dead_worker_s=6, query_prefetch=16)
    r = client(s)
    first = workers(s)
    reply_to = new_reply_key(s)
    jobs = {f"q{i}": {"texts": [f"query {i} about things"]} for i in range(5000)}  # seconds of work, at least
    send(r, s, reply_to, jobs)
    wait_for(lambda: r.llen(reply_to) > 0, 30, "the first replies")
    first.stop()
    assert first.proc.returncode == 0
    # It stopped mid-burst; what it took it answered (nothing pending on it), the rest waits in the stream.
    assert pending_on(s, r) == {}
    answered = r.llen(reply_to)
    assert 0 < answered < len(jobs), answered
    assert r.xlen(stream.stream_key(s)) == len(jobs) - answered

    workers(s)
    replies = receive(r, reply_to, len(jobs), timeout_s=120)
    assert set(replies) == set(jobs) and all(error is None for _, error in replies.values())
    assert_clean(s, r)


def test_a_pickled_body_is_never_unpickled(workers, tmp_path):
    # A pickle that would create a file when loaded: refused as "not msgpack", the file never appears.
    s = make_settings(dead_worker_s=6)
    workers(s)
    r = client(s)
    reply_to = new_reply_key(s)
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    r.xadd(stream.stream_key(s), {stream.F_ID: b"evil", stream.F_REPLY: reply_to.encode(),
                                  stream.F_BODY: pickle.dumps(Evil()), stream.F_SENT: b"not a time"})
    (_, error), = receive(r, reply_to, 1).values()
    assert error.startswith("PayloadError: the body is not msgpack") and not marker.exists()
    assert_clean(s, r)


@pytest.mark.slow
def test_the_lane_goes_on_after_a_redis_restart_and_a_lost_stream(private_redis, workers):
    server = private_redis("--appendonly", "yes", "--appendfsync", "always")
    s = make_settings(broker_url=server.url(), dead_worker_s=6)
    workers(s)
    r = client(s)
    reply_to = new_reply_key(s)
    send(r, s, reply_to, {f"a{i}": {"texts": [f"before {i}"]} for i in range(20)})
    assert len(receive(r, reply_to, 20)) == 20

    # Redis restarts (its append-only file keeps the stream and the group); the lane reconnects by itself.
    server.stop()
    time.sleep(3)
    server.start()
    send(r, s, reply_to, {f"b{i}": {"texts": [f"after {i}"]} for i in range(20)})
    replies = receive(r, reply_to, 20, timeout_s=60)
    assert set(replies) == {f"b{i}" for i in range(20)} and all(e is None for _, e in replies.values())

    # The stream is lost with its group (a Redis without persistence): the lane makes both again.
    r.delete(stream.stream_key(s))
    send(r, s, reply_to, {f"c{i}": {"texts": [f"lost {i}"]} for i in range(20)})
    replies = receive(r, reply_to, 20, timeout_s=30)
    assert set(replies) == {f"c{i}" for i in range(20)} and all(e is None for _, e in replies.values())
    assert_clean(s, r)
