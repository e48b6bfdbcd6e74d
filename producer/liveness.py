"""Live workers, as a producer sees them through their heartbeats: is anyone serving this queue, and was my
job lost?

- Before a call's first job, :meth:`Liveness.ensure` waits up to ``M3Q_NO_WORKER_GRACE_S`` for a worker of the
  job's queue and raises :class:`NoWorker` naming the queue when none comes (never while jobs are in flight: a
  worker restarting under a running index must not fail it).
- While a job is waited for, :meth:`Liveness.watch` is called every few seconds: a notice when no worker is
  alive, and :class:`LostJob`'s check for a Celery job a worker lost as it took it.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import redis
from kombu.utils.url import maybe_sanitize_url

from producer import redis_errors
from producer.contract import wire
from producer.contract.errors import NoWorker
from producer.contract.redis_conn import redis_client
from producer.contract.settings import Settings
from producer.replies import call_once_per_loop

log = logging.getLogger(__name__)
progress = logging.getLogger("m3q.progress")
"""A record each whole second while a call waits for a worker (its ``m3q_wait`` attribute: seconds waited, or None
once the wait is over). Silent unless a handler is attached: the `m3q` CLI shows it on stderr; a web app
using the Client prints nothing."""
progress.propagate = False
progress.addHandler(logging.NullHandler())

WORKER_NOTICE_S = 30.0
"""While a job waits and no worker serving its queue is alive, the producer logs a notice this often."""
WORKER_SEEN_S = 10.0
"""A queue seen served this recently is not checked again before the next call's first job."""


@dataclass
class LostJob:
    """Sends a Celery job again that a worker lost as it took it, or that Redis lost.

    kombu's Redis transport pops a message (BRPOP) and only then records it as unacknowledged: a worker
    killed between the two loses the job outright, where neither the dead-worker sweep nor the visibility
    timeout can see it. A Redis that restarts keeping nothing, or fails over to a replica that had not
    received the job (or its result) yet, loses it the same way. The producer still holds the payload, so
    it sends the job again (same id) once it has had no result, been held by no live worker and been absent
    from its empty queue for longer than a dead worker's jobs take to come back (``M3Q_DEAD_WORKER_S`` plus
    a heartbeat). A job that was not lost after all runs twice, which at-least-once delivery allows.
    """

    job_id: str
    queue: str
    resend: Callable[[], Any]
    unheld_since: float | None = None

    def check(self, workers: list[dict], r: redis.Redis, s: Settings) -> None:
        """One look, with the live workers' heartbeats at hand; sends the job again when it is lost."""
        if any(self.job_id in w.get("held_jobs", ()) for w in workers) or r.llen(self.queue):
            self.unheld_since = None  # held by a live worker, or maybe still waiting in the queue
            return
        now = time.monotonic()
        self.unheld_since = self.unheld_since or now
        if now - self.unheld_since < s.dead_worker_s + wire.heartbeat_s(s):
            return
        log.warning("job %s is in no queue and held by no live worker: a worker died as it took it, or Redis "
                    "lost it (a restart, a failover); sending it again", self.job_id)
        self.resend()
        self.unheld_since = None


class Liveness:
    """One client's view of the live workers, and its once-per-client Redis check."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self._redis: redis.Redis | None = None
        self._redis_checked = False
        self._served_at: dict[str, float] = {}  # queue -> when a live worker serving it was last seen
        self._next_notice = 0.0
        self._checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> {queue: shared check}

    def redis(self) -> redis.Redis:
        """This client's Redis connection for heartbeats and queue lengths."""
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def queue_of(self, task: str, device: str | None = None) -> str:
        """The queue whose workers serve ``task`` (``device``'s own queue when given)."""
        return wire.device_queue(self.settings, device) if device else wire.task_queue(self.settings, task)

    def check_redis(self) -> None:
        """Once per client: a wrong password or an untrusted certificate is reported at once (BrokerError),
        where Celery would retry it as a lost connection for 20 s and then ask for a restart."""
        if not self._redis_checked:
            self._redis_checked = redis_errors.check_redis(self.settings)

    def workers(self, queue: str) -> list[dict]:
        """The heartbeats of the live workers serving ``queue``."""
        return [w for w in wire.live_workers(self.settings, self.redis()) if wire.serves(w, self.settings, queue)]

    def ensure(self, queue: str, device: str | None) -> None:
        """Before a call's first job: Redis checked once, and a live worker on ``queue`` unless one was seen
        lately (``M3Q_REQUIRE_WORKER``)."""
        self.check_redis()
        if self._due(queue):
            self.require(queue, device, self.settings.no_worker_grace_s)

    async def aensure(self, queue: str, device: str | None) -> None:
        """:meth:`ensure` for asyncio: the blocking checks on one thread that all of a loop's awaits share, and
        only when one is due."""
        if self._due(queue) or not self._redis_checked:
            await call_once_per_loop(self._checks, queue, lambda: asyncio.to_thread(self.ensure, queue, device))

    def _due(self, queue: str) -> bool:
        return self.settings.require_worker and time.monotonic() - self._served_at.get(queue, -1e9) > WORKER_SEEN_S

    def require(self, queue: str, device: str | None, grace_s: float) -> list[dict]:
        """The live workers of ``queue``, waiting up to ``grace_s`` for one; :class:`NoWorker` if none comes."""
        self.check_redis()
        started = time.monotonic()
        told = -1  # the last whole second of the wait shown on the progress logger
        try:
            while True:
                try:
                    every = wire.live_workers(self.settings, self.redis())
                except (redis.ConnectionError, redis.TimeoutError):
                    return []  # Redis unreachable: not judged here, the send waits for Redis to come back
                found = [w for w in every if wire.serves(w, self.settings, queue)]
                if found:
                    self._served_at[queue] = time.monotonic()
                    return found
                waited = time.monotonic() - started
                if waited >= grace_s:
                    raise NoWorker(self._no_worker_message(queue, device, grace_s, every))
                if int(waited) > told:
                    told = int(waited)
                    self._waiting(queue, told, grace_s)
                time.sleep(min(0.5, max(0.0, grace_s - waited)))
        finally:
            if told >= 0:
                progress.info("", extra={"m3q_wait": None})  # the wait is over (a terminal's line is cleared)

    def _waiting(self, queue: str, waited_s: int, grace_s: float) -> None:
        if waited_s == 0:
            log.info("no live worker on %s yet; waiting up to %.0fs for one (M3Q_NO_WORKER_GRACE_S)", queue, grace_s)
        progress.info("waiting for a worker on queue %s (Redis at %s) ... %d s of %.0f s (M3Q_NO_WORKER_GRACE_S)",
                      queue, maybe_sanitize_url(self.settings.broker_url), waited_s, grace_s,
                      extra={"m3q_wait": waited_s})

    def _no_worker_message(self, queue: str, device: str | None, grace_s: float, others: list[dict]) -> str:
        where = f"device {device} (queue {queue})" if device else queue
        seen = f"; the live workers serve {', '.join(sorted({device_of(w, self.settings) for w in others}))} only" \
            if others else ""
        return (f"no worker is consuming {where}: no heartbeat within {grace_s:.0f}s (M3Q_NO_WORKER_GRACE_S) in "
                f"Redis at {maybe_sanitize_url(self.settings.broker_url)}{seen}. Start one with "
                f"`m3q worker{' --device ' + device if device else ''}` on the same M3Q_BROKER_URL and "
                f"M3Q_QUEUE_PREFIX ({self.settings.queue_prefix}); `m3q status` shows live workers and queues")

    def watch(self, queue: str, lost: LostJob | None = None) -> Callable[[float], None]:
        """What a wait on ``queue`` checks every few seconds: a notice when no worker serving it is alive, and
        whether its job was lost (``lost``)."""
        def watch(waited_s: float) -> None:
            try:
                workers = wire.live_workers(self.settings, self.redis())
                alive = any(wire.serves(w, self.settings, queue) for w in workers)
                if alive and lost is not None:
                    lost.check(workers, self.redis(), self.settings)
            except redis.RedisError:
                return  # Redis down: the wait itself reports that
            if not alive and time.monotonic() >= self._next_notice:
                self._next_notice = time.monotonic() + WORKER_NOTICE_S
                log.warning("waiting for a worker on %s for %.0fs: none is alive (start one with `m3q worker`; "
                            "`m3q status` shows workers and queues)", queue, waited_s)
        return watch


def device_of(worker: dict, s: Settings) -> str:
    """The device queue(s) a worker reads, as ``--device`` names them (its device, for an older heartbeat)."""
    prefix = wire.device_queue(s, "")
    devices = [q[len(prefix):] for q in worker.get("queues") or () if q.startswith(prefix)]
    return ", ".join(devices) if devices else str(worker.get("device"))
