"""Jobs held by a dead worker go back to their queue within ``M3Q_DEAD_WORKER_S``, while their worker's
heartbeat says nothing about long jobs of a live one.

kombu's own sweep only restores a message delivered longer ago than the visibility timeout (an hour by
default), whoever holds it: a worker killed a second after taking a job would hold it for an hour. Here each
worker lists the delivery tags it holds in its heartbeat (:func:`held`), and every running worker, at
each heartbeat, puts back the jobs that are older than a heartbeat's lifetime and that no live worker lists
(:func:`unheld_jobs`). A live worker lists its jobs however long they run, so they are never taken from it;
the visibility timeout stays as the last resort. The jobs a sweep finds held by no live worker but not yet
old enough to put back go in the sweeping worker's heartbeat (``unheld``), which `m3q status` counts.

kombu's records of what a worker holds are read through :mod:`worker.celery_internals`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from celery import Celery, bootsteps

from producer.contract import wire
from producer.contract.settings import Settings
from worker import celery_internals as internals

log = logging.getLogger(__name__)


def held(consumer) -> dict[str, list[str]]:
    """The messages this worker holds unacknowledged on Celery's task consumer: their delivery tags
    (``held``, for the sweep) and their job ids (``held_jobs``, for a producer looking for its job)."""
    channel = internals.task_channel(consumer)
    tags: list[str] = []
    jobs: list[str] = []
    for tag, message in internals.delivered(channel) if channel is not None else ():
        tags.append(str(tag))
        jobs.append(str((getattr(message, "headers", None) or {}).get("id", "")))
    return {"held": tags, "held_jobs": [j for j in jobs if j]}


def consumed(consumer) -> list[str]:
    """The queues this worker consumes (Celery's ``task_queues``, or ``-Q``). The heartbeat lists them, so a
    producer judges by what a worker reads, not by its device's name."""
    return internals.consumed_queues(consumer.app)


def unheld_jobs(s: Settings, r, older_than_s: float, workers: list[dict[str, Any]] | None = None,
                also_held: Iterable[str] = ()) -> dict[str, float]:
    """This prefix's jobs that a worker took over ``older_than_s`` ago and no live worker holds (nor
    ``also_held``): delivery tag -> when it was taken (epoch s). ``r``: a redis client on the broker."""
    taken = internals.taken_before(r, time.time() - older_than_s)
    if not taken:
        return {}
    listed = {tag for w in (wire.live_workers(s, r) if workers is None else workers) for tag in w.get("held", ())}
    listed.update(also_held)
    candidates = [tag for tag in taken if tag not in listed]
    ours = (wire.query_queue(s), wire.document_queue(s))
    device = wire.device_queue(s, "")
    # Another app's job on the same database is left alone.
    return {tag: taken[tag] for tag, key in internals.routing_keys(r, candidates).items()
            if key in ours or key.startswith(device)}


class HeldJobs(bootsteps.StartStopStep):
    """A consumer step that lets the runtime's heartbeat list the jobs this worker holds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c) -> None:
        from worker import runtime

        rt = runtime.current()
        rt.held = lambda: {**held(c), "queues": consumed(c)}
        rt.beat()  # the queues it reads, from now on rather than from the next beat


class Reclaimer:
    """Puts the jobs of dead workers back on their queues, through kombu's own restore."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.unheld: dict[str, float] = {}
        """What the last sweep found held by no live worker and left for a later one: tag -> when taken."""
        self._connection = None

    def sweep(self, r, also_held: Iterable[str] = ()) -> list[str]:
        """Restore every job held by no live worker (nor ``also_held``, this worker's own) for longer than a
        heartbeat's lifetime; the tags restored (``r``: a redis client on the broker)."""
        s = self.settings
        found = unheld_jobs(s, r, wire.heartbeat_s(s), also_held=also_held)
        due_before = time.time() - wire.heartbeat_ttl_s(s)
        tags = [tag for tag, taken in found.items() if taken <= due_before]
        self.unheld = {tag: taken for tag, taken in found.items() if taken > due_before}
        if not tags:
            return []
        channel = self._channel()
        for tag in tags:
            internals.restore(channel, tag)  # a tag another worker restored first is not pushed twice
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
