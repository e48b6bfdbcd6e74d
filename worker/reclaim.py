"""Jobs held by a dead worker go back to their queue within ``M3Q_DEAD_WORKER_S``, while their worker's
heartbeat says nothing about long jobs of a live one.

kombu's own sweep only restores a message delivered longer ago than the visibility timeout (an hour by
default), whoever holds it: a worker killed a second after taking a job would hold it for an hour. Here each
worker lists the delivery tags it holds in its heartbeat (:func:`held`), and every running worker, at
each heartbeat, puts back the jobs that are older than a heartbeat's lifetime and that no live worker lists
(:func:`producer.contract.wire.unheld_jobs`). A live worker lists its jobs however long they run, so they are never
taken from it; the visibility timeout stays as the last resort.
"""
from __future__ import annotations

import logging

from celery import Celery, bootsteps

from producer.contract import wire
from producer.contract.settings import Settings

log = logging.getLogger(__name__)


def held(consumer) -> dict[str, list[str]]:
    """The messages this worker holds unacknowledged, on every channel it consumes: their delivery tags
    (``held``, for the sweep) and their job ids (``held_jobs``, for a producer looking for its job)."""
    channels = set()
    if getattr(consumer, "task_consumer", None) is not None:
        channels.add(consumer.task_consumer.channel)
    for step in getattr(consumer, "steps", None) or ():
        for k in getattr(step, "consumers", None) or ():  # bootsteps.ConsumerStep lanes (the query lane)
            channels.add(k.channel)
    tags: list[str] = []
    jobs: list[str] = []
    for channel in channels:
        for tag, message in _items(channel.qos._delivered):
            tags.append(str(tag))
            jobs.append(str((getattr(message, "headers", None) or {}).get("id", "")))
    return {"held": tags, "held_jobs": [j for j in jobs if j]}


def _items(delivered: dict) -> list[tuple]:
    # Written by the consumer thread while the heartbeat thread reads: retry a copy that raced a change.
    for _ in range(10):
        try:
            return list(delivered.items())
        except RuntimeError:
            continue
    return list(delivered.copy().items())


def consumed(consumer, s: Settings) -> list[str]:
    """The queues this worker consumes: Celery's own (``task_queues``, or ``-Q``) and the query queue, which
    the query lane step (worker/query_lane.py) reads in every worker. The heartbeat lists them, so a producer
    judges by what a worker reads, not by its device's name."""
    return sorted({*(consumer.app.amqp.queues.consume_from or ()), wire.query_queue(s)})


class HeldJobs(bootsteps.StartStopStep):
    """A consumer step that lets the runtime's heartbeat list the jobs this worker holds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c) -> None:
        from worker import runtime

        rt = runtime.current()
        rt.held = lambda: {**held(c), "queues": consumed(c, rt.settings)}
        rt.beat()  # the queues it reads, from now on rather than from the next beat


class Reclaimer:
    """Puts the jobs of dead workers back on their queues, through kombu's own restore."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._connection = None

    def sweep(self, r, workers: list[dict] | None = None) -> list[str]:
        """Restore every job held by no live worker; the tags restored (``r``: a redis client on the broker)."""
        tags = wire.unheld_jobs(self.settings, r, wire.heartbeat_ttl_s(self.settings), workers)
        if not tags:
            return []
        qos = self._channel().qos
        for tag in tags:
            # A transaction on kombu's unacked hash: a tag another worker restored first is not pushed twice.
            qos.restore_by_tag(tag)
        log.warning("put %d job(s) held by a dead worker back on their queues: %s", len(tags), ", ".join(tags))
        return tags

    def _channel(self):
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        try:
            return self._connection.default_channel
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Drop the broker connection (the next sweep opens a new one)."""
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:  # noqa: BLE001 - best effort
                pass
            self._connection = None
