"""Celery jobs: documents and index batches, sent as Celery tasks and waited for through the result backend.

:meth:`CeleryJobs.submit` publishes a job (retrying while Redis restarts) and returns a :class:`Handle`.
Celery's publish blocks, so an asyncio caller's jobs are published on this client's one publishing thread
(``background=True``) and the handle is returned at once. ``handle.result()`` blocks; ``await handle`` waits
on the event loop's one pub/sub listener (:class:`~producer.celery_results.AsyncResults`), since Celery itself has
no asyncio wait.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from producer import redis_errors
from producer.celery_results import AsyncResults
from producer.contract import wire
from producer.contract.errors import JobFailed, JobTimeout
from producer.contract.redis_conn import brief
from producer.contract.settings import Settings
from producer.contract.wire import Item, PayloadError, decode_item
from producer.liveness import Liveness, LostJob

log = logging.getLogger(__name__)

RESULT_POLL_S = 5.0
"""A waiting producer also reads its job's result directly this often, besides listening for it: after a
Redis restart Celery's pub/sub listener may have lost the subscription and would wait in vain."""


def timeout_message(job_id: str, task: str, size: int, timeout_s: float) -> str:
    return (f"job {job_id} ({task}, {size} texts) had no result after {timeout_s:g}s: is a worker running? "
            "(`m3q worker` starts one, `m3q status` shows them)")


def failed_message(job_id: str, task: str, first_index: int, size: int, reason: str) -> str:
    return f"job {job_id} ({task}, items {first_index}..{first_index + size - 1}) failed: {reason}"


@dataclass
class Handle:
    """A Celery job in flight. ``result()`` blocks; ``await handle`` does not block the event loop."""

    id: str
    sent: Future
    """Resolves to the job's AsyncResult once it is published (at once, unless published in the background)."""
    task: str
    size: int
    settings: Settings
    first_index: int = 0
    rows: list[int] | None = None
    watch: Callable[[float], None] | None = None
    """Called with the seconds waited so far, every RESULT_POLL_S while no result came (the no-worker notice)."""

    @property
    def async_result(self) -> AsyncResult:
        return self.sent.result()

    def raw(self, timeout_s: float | None = None) -> dict:
        """The job's result as the worker sent it; waits through a Redis restart, up to the timeout."""
        timeout_s = timeout_s or self.settings.job_timeout_s
        started = time.monotonic()
        deadline = started + timeout_s
        delay_s = 0.2
        while True:
            try:
                wait_s = min(RESULT_POLL_S, deadline - time.monotonic())
                return self.async_result.get(timeout=max(0.01, wait_s), propagate=True, interval=0.005)
            except CeleryTimeout:
                if self.watch:
                    self.watch(time.monotonic() - started)
                if time.monotonic() < deadline:
                    continue  # each get() first reads the stored result, then listens again
                raise JobTimeout(timeout_message(self.id, self.task, self.size, timeout_s)) from None
            except PayloadError:
                raise
            except Exception as e:  # noqa: BLE001 - the worker's exception, re-raised with the job named
                if redis_errors.listener_gave_up(e):
                    return self._poll(deadline, timeout_s)
                if self._lost_redis(e) and time.monotonic() + delay_s < deadline:
                    log.warning("waiting for job %s: Redis unreachable (%s); retrying in %.1fs", self.id, brief(e),
                                delay_s)
                    time.sleep(delay_s)
                    delay_s = min(2 * delay_s, redis_errors.RETRY_MAX_DELAY_S)
                    continue
                raise JobFailed(self._failed(f"{type(e).__name__}: {e}")) from e

    def _poll(self, deadline: float, timeout_s: float) -> dict:
        """Read the stored result until it is ready.

        Used once Celery's result listener gave up reconnecting after a long Redis outage ("the Celery
        application must be restarted"): plain reads reconnect by themselves.
        """
        backend = self.async_result.backend
        delay_s = 0.05
        while time.monotonic() < deadline:
            try:
                meta = backend.get_task_meta(self.id)
            except Exception as e:  # noqa: BLE001 - still down: keep trying until the deadline
                if not redis_errors.unreachable(e):
                    raise
                meta = {}
            if meta.get("status") in states.READY_STATES:
                return self._outcome(meta)
            time.sleep(delay_s)
            delay_s = min(2 * delay_s, 1.0)
        raise JobTimeout(timeout_message(self.id, self.task, self.size, timeout_s))

    def _outcome(self, meta: dict) -> dict:
        """The result of a final state's meta (as the backend decodes it); the job's error raised."""
        if meta.get("status") == states.SUCCESS:
            return meta["result"]
        error = meta["result"]
        if isinstance(error, PayloadError):
            raise error
        raise JobFailed(self._failed(f"{type(error).__name__}: {error}"))

    def _failed(self, reason: str) -> str:
        return failed_message(self.id, self.task, self.first_index, self.size, reason)

    def _lost_redis(self, e: Exception) -> bool:
        # The wait itself lost Redis, as opposed to a job that failed (whose state is final and cached).
        if not redis_errors.unreachable(e):
            return False
        try:
            return self.async_result.state not in states.READY_STATES
        except Exception:  # noqa: BLE001 - Redis still down
            return True

    def result(self, timeout_s: float | None = None) -> list[Item]:
        """Decoded items of an encode job, in order."""
        return [decode_item(d) for d in self.raw(timeout_s)["items"]]

    async def araw(self, timeout_s: float | None = None) -> dict:
        """:meth:`raw` without a thread: one pub/sub connection per event loop listens for all results."""
        timeout_s = timeout_s or self.settings.job_timeout_s
        backend = (await asyncio.wrap_future(self.sent)).backend
        try:
            # With the blocking wait's checks (no worker alive, a job a worker lost as it took it), off the loop.
            meta = await asyncio.wait_for(AsyncResults.for_loop(self.settings, backend).wait(self.id, self.watch),
                                          timeout_s)
        except asyncio.TimeoutError:
            raise JobTimeout(timeout_message(self.id, self.task, self.size, timeout_s)) from None
        finally:
            # Celery subscribed to this result when it sent the job; nothing here will read that subscription.
            consumer = getattr(backend, "result_consumer", None)
            if consumer is not None:
                consumer.cancel_for(self.id)
        return self._outcome(meta)

    async def aresult(self, timeout_s: float | None = None) -> list[Item]:
        """:meth:`result` for asyncio."""
        return [decode_item(d) for d in (await self.araw(timeout_s))["items"]]

    def __await__(self):
        return self.aresult().__await__()


class CeleryJobs:
    """Publishes one client's Celery jobs."""

    def __init__(self, s: Settings, liveness: Liveness) -> None:
        self.settings = s
        self.app: Celery = wire.make_celery(s, name="m3q-producer")
        self.liveness = liveness
        self._publisher: ThreadPoolExecutor | None = None  # asyncio callers' publishes, one thread in all
        self._lock = threading.Lock()

    def submit(self, task: str, payload: dict, queue: str, first_index: int = 0, *, task_id: str | None = None,
               background: bool = False) -> Handle:
        """Publish one job on ``queue``; on the publishing thread when ``background`` (the handle comes back
        at once). ``task_id``: the job's id when the caller chose it (re-index records it before the send, so
        a crash mid-send is seen); else a new one."""
        task_id = task_id or str(uuid.uuid4())  # the same id on every try: a publish that landed is one job
        send = lambda: self._send(task, payload, queue, task_id)  # noqa: E731
        if background:
            sent = self._publishing().submit(send)
        else:
            sent = Future()
            sent.set_result(send())
        return self.attach(task, task_id, payload, queue, first_index, sent)

    def attach(self, task: str, task_id: str, payload: dict, queue: str, first_index: int = 0,
               sent: Future | None = None) -> Handle:
        """A handle on a job sent as ``task_id`` (perhaps by an earlier process), watched like any other: a
        job a worker lost as it took it is sent again."""
        if sent is None:
            sent = Future()
            sent.set_result(AsyncResult(task_id, app=self.app))
        resend = lambda: self._send(task, payload, queue, task_id)  # noqa: E731
        return Handle(task_id, sent, task, len(payload.get("texts", [])), self.settings, first_index,
                      watch=self.liveness.watch(queue, LostJob(task_id, queue, resend)))

    def _send(self, task: str, payload: dict, queue: str, task_id: str) -> AsyncResult:
        """Publish a job; while Redis is unreachable (restarting), retry with backoff up to M3Q_JOB_TIMEOUT_S."""
        return redis_errors.retrying(self.settings, f"job {task_id} ({task})", lambda: self.app.send_task(
            task, args=[payload], queue=queue, task_id=task_id, headers={"m3q_sent": time.time()}))

    def _publishing(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._publisher is None:
                self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3q-publish")
            return self._publisher

    def close(self) -> None:
        """Stop the publishing thread (never blocks a loop's aclose) and close the app's pools."""
        with self._lock:
            if self._publisher is not None:
                self._publisher.shutdown(wait=False, cancel_futures=True)
                self._publisher = None
        self.app.close()
