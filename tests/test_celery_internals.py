"""The private parts of kombu and Celery that the worker relies on (worker/celery_internals.py), checked on the
installed releases with the test Redis, the start-up warning for other releases, and the dead-worker sweep's
findings as `m3q status` counts them.
"""
from __future__ import annotations

import json
import logging
import time

import kombu
import pytest
from celery.worker import state as worker_state

from producer.contract import wire
from producer.status import collect, held_by_dead, render
from tests.conftest import REDIS_URL, ROOT, make_settings
from worker import celery_internals as internals
from worker.reclaim import Reclaimer


def test_the_installed_releases_are_in_the_tested_range_that_pyproject_requires(caplog):
    tomllib = pytest.importorskip("tomllib")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"celery{internals.TESTED_CELERY}" in requires and f"kombu{internals.TESTED_KOMBU}" in requires
    with caplog.at_level(logging.WARNING, logger=internals.__name__):
        assert internals.check_versions() is None
        assert internals.check_versions("5.7.3", "5.7.1") is None
    assert caplog.records == []


@pytest.mark.parametrize("celery, kombu", [("5.6.3", "5.7.0"), ("5.7.0", "5.8.0"), ("5.8.0rc1", "5.7.1"),
                                           ("5.3.6", "5.3.7")])
def test_a_release_outside_the_tested_range_is_one_warning_naming_both_and_the_range(caplog, celery, kombu):
    with caplog.at_level(logging.WARNING, logger=internals.__name__):
        warning = internals.check_versions(celery, kombu)
    assert [r.getMessage() for r in caplog.records] == [warning]
    for part in (f"celery {celery}", f"kombu {kombu}", internals.TESTED_CELERY, internals.TESTED_KOMBU):
        assert part in warning


@pytest.mark.parametrize("flag, value, stopping", [
    ("should_stop", None, False), ("should_stop", False, False), ("should_stop", 0, True),  # 0: EX_OK
    ("should_terminate", True, True), ("should_terminate", 1, True)])
def test_a_shutdown_is_read_off_celerys_worker_state_as_celery_reads_it(monkeypatch, flag, value, stopping):
    monkeypatch.setattr(worker_state, flag, value)  # what Celery's signal handlers set
    assert internals.shutdown_requested() is stopping


def _held_message(queue: kombu.Queue) -> tuple[kombu.Connection, object]:
    """A connection on the worker's transport that took one message from ``queue`` and has not acknowledged it."""
    with kombu.Connection(REDIS_URL) as sender:
        sender.Producer().publish({"job": 1}, exchange=queue.exchange, routing_key=queue.routing_key,
                                  declare=[queue])
    conn = kombu.Connection(REDIS_URL, transport=internals.TRANSPORT)
    held: list = []
    conn.Consumer([queue], callbacks=[lambda body, message: held.append(message)]).consume()
    conn.drain_events(timeout=10)
    (message,) = held
    return conn, message


def test_kombus_records_of_a_held_message_are_where_the_worker_reads_them(redis_client):
    queue = wire.kombu_queue(wire.document_queue(make_settings()))
    conn, message = _held_message(queue)
    try:
        tag = message.delivery_tag
        assert [t for t, _ in internals.delivered(message.channel)] == [tag]
        taken = internals.taken_before(redis_client, time.time() + 1)
        assert time.time() - 10 < taken[tag] <= time.time()
        assert tag not in internals.taken_before(redis_client, taken[tag] - 1)
        assert internals.routing_keys(redis_client, [tag, "no-such-tag"]) == {tag: queue.name}
        with kombu.Connection(REDIS_URL) as other:
            internals.restore(other.default_channel, tag)
            internals.restore(other.default_channel, tag)  # restored already: not pushed twice
        assert redis_client.llen(queue.name) == 1
        assert tag not in internals.taken_before(redis_client, time.time() + 1)
    finally:
        conn.close()
        redis_client.delete(queue.name)


def test_a_job_no_live_worker_holds_is_counted_by_status_then_put_back(redis_client):
    s = make_settings(dead_worker_s=6)  # a heartbeat every second; put back once three seconds old
    queue = wire.kombu_queue(wire.document_queue(s))
    other_app = wire.kombu_queue(wire.document_queue(make_settings()))
    conn, message = _held_message(queue)  # a worker that took a job and died before its heartbeat listed it
    other_conn, _ = _held_message(other_app)
    tag, reclaimer = message.delivery_tag, Reclaimer(wire.make_celery(s), s)
    try:
        time.sleep(wire.heartbeat_s(s) + 0.2)
        assert reclaimer.sweep(redis_client, also_held=[tag]) == [] and reclaimer.unheld == {}  # its own job
        assert reclaimer.sweep(redis_client) == [] and list(reclaimer.unheld) == [tag]  # not another app's
        time.sleep(wire.heartbeat_s(s))
        # A live worker's heartbeat carries what its sweep found; status counts what no live worker lists.
        survivor = {"hostname": "survivor", "device": "cpu", "model": "m", "dtype": "float32", "jobs": 0, "texts": 0,
                    "texts_per_s": 0.0, "tokens_per_s": 0.0, "time": time.time(), "held": [],
                    "unheld": reclaimer.unheld}
        assert held_by_dead(s, [survivor]) == 1
        assert held_by_dead(s, [survivor, {"hostname": "slow", "held": [tag]}]) == 0
        redis_client.set(wire.heartbeat_key(s, "survivor"), json.dumps(survivor), ex=10)
        status = collect(s)
        assert status["held_by_dead"] == 1 and "1 job(s) held by a dead worker" in render(status)
        time.sleep(max(0.0, wire.heartbeat_ttl_s(s) + 0.2 - (time.time() - list(reclaimer.unheld.values())[0])))
        assert reclaimer.sweep(redis_client) == [tag] and reclaimer.unheld == {}
        assert redis_client.llen(queue.name) == 1 and redis_client.llen(other_app.name) == 0
    finally:
        reclaimer.close()
        for c in (conn, other_conn):
            c.close()
        redis_client.delete(queue.name, other_app.name, wire.heartbeat_key(s, "survivor"))
