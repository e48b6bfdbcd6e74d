"""The producer client: split inputs into jobs, keep a bounded number in flight, wait blocking or with asyncio.

    client = Client()                                   # settings from M3Q_* variables
    vectors = client.encode_documents(texts)            # blocking, input order, Embedding or ItemError each
    vectors = await client.aencode_queries([question])  # from an asyncio handler
    report = client.index("docs", texts, ids)           # encode on the workers, upsert into Milvus
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Iterator, Sequence

import msgpack
import redis
from celery import states
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.contract import checks, stream, wire
from producer.contract.errors import BrokerError, ConfigError, JobFailed, JobTimeout, NoWorker  # noqa: F401 - re-exported
from producer.contract.settings import Settings
from producer.contract.wire import Item, PayloadError, decode_item
from producer.replies import AsyncLane, AsyncResults, call_once_per_loop, reply_reader

log = logging.getLogger(__name__)

RETRY_MAX_DELAY_S = 5.0
"""Longest pause between two tries to reach Redis while it is down (the delay doubles from 0.2 s)."""
WORKER_NOTICE_S = 30.0
"""While a job waits and no worker serving its queue is alive, the producer logs a notice this often."""
WORKER_SEEN_S = 10.0
"""A queue seen served this recently is not checked again before the next call's first job."""
RESULT_POLL_S = 5.0
"""A waiting producer also reads its job's result directly this often, besides listening for it: after a
Redis restart Celery's pub/sub listener may have lost the subscription and would wait in vain."""


@dataclass
class Handle:
    """A job in flight. ``result()`` blocks; ``await handle`` does not block the event loop."""

    async_result: AsyncResult
    task: str
    size: int
    timeout_s: float
    first_index: int = 0
    rows: list[int] | None = None
    watch: Callable[[float], None] | None = None
    """Called with the seconds waited so far, every RESULT_POLL_S while no result came (the no-worker notice)."""
    settings: Settings | None = None
    """Where ``await handle`` listens for the result (without it, the wait runs on a thread)."""

    @property
    def id(self) -> str:
        return self.async_result.id

    def raw(self, timeout_s: float | None = None) -> dict:
        """The job's result as the worker sent it; waits through a Redis restart, up to the timeout."""
        timeout_s = timeout_s or self.timeout_s
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
                raise JobTimeout(_timeout_message(self.id, self.task, self.size, timeout_s)) from None
            except PayloadError:
                raise
            except Exception as e:  # noqa: BLE001 - the worker's exception, re-raised with the job named
                if _listener_gave_up(e):
                    return self._poll(deadline, timeout_s)
                if self._lost_redis(e) and time.monotonic() + delay_s < deadline:
                    log.warning("waiting for job %s: Redis unreachable (%s); retrying in %.1fs", self.id, e, delay_s)
                    time.sleep(delay_s)
                    delay_s = min(2 * delay_s, RETRY_MAX_DELAY_S)
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
                if not _unreachable(e):
                    raise
                meta = {}
            if meta.get("status") in states.READY_STATES:
                return self._outcome(meta)
            time.sleep(delay_s)
            delay_s = min(2 * delay_s, 1.0)
        raise JobTimeout(_timeout_message(self.id, self.task, self.size, timeout_s))

    def _outcome(self, meta: dict) -> dict:
        """The result of a final state's meta (as the backend decodes it); the job's error raised."""
        if meta.get("status") == states.SUCCESS:
            return meta["result"]
        error = meta["result"]
        if isinstance(error, PayloadError):
            raise error
        raise JobFailed(self._failed(f"{type(error).__name__}: {error}"))

    def _failed(self, reason: str) -> str:
        return (f"job {self.id} ({self.task}, items {self.first_index}..{self.first_index + self.size - 1}) "
                f"failed: {reason}")

    def _lost_redis(self, e: Exception) -> bool:
        # The wait itself lost Redis, as opposed to a job that failed (whose state is final and cached).
        if not _unreachable(e):
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
        if self.settings is None:
            return await asyncio.to_thread(self.raw, timeout_s)
        timeout_s = timeout_s or self.timeout_s
        results = AsyncResults.for_loop(self.settings, self.async_result.backend)
        try:
            # With the blocking wait's checks (no worker alive, a job a worker lost as it took it), off the loop.
            meta = await asyncio.wait_for(results.wait(self.id, self.watch), timeout_s)
        except asyncio.TimeoutError:
            raise JobTimeout(_timeout_message(self.id, self.task, self.size, timeout_s)) from None
        finally:
            # Celery subscribed to this result when it sent the job; nothing here will read that subscription.
            consumer = getattr(self.async_result.backend, "result_consumer", None)
            if consumer is not None:
                consumer.cancel_for(self.id)
        return self._outcome(meta)

    async def aresult(self, timeout_s: float | None = None) -> list[Item]:
        """:meth:`result` for asyncio."""
        return [decode_item(d) for d in (await self.araw(timeout_s))["items"]]

    def __await__(self):
        return self.aresult().__await__()


@dataclass
class LaneHandle:
    """A query job sent on the query lane (a Redis stream); its reply comes through this process's reader."""

    id: str
    reply: Future
    forget: Callable[[str], None]
    size: int
    timeout_s: float
    first_index: int = 0
    watch: Callable[[float], None] | None = None
    task: str = wire.TASK_ENCODE_QUERIES
    rows: list[int] | None = None

    def raw(self, timeout_s: float | None = None) -> dict:
        """The job's result as the worker sent it, waiting up to the timeout."""
        timeout_s = timeout_s or self.timeout_s
        started = time.monotonic()
        while not self.reply.done():
            waited_s = time.monotonic() - started
            if waited_s >= timeout_s:
                self.forget(self.id)
                raise JobTimeout(_timeout_message(self.id, self.task, self.size, timeout_s))
            try:
                self.reply.result(timeout=min(RESULT_POLL_S, timeout_s - waited_s))
            except FutureTimeout:
                if self.watch:
                    self.watch(time.monotonic() - started)
        return lane_outcome(self.id, self.size, self.first_index, self.reply.result())

    def result(self, timeout_s: float | None = None) -> list[Item]:
        """Decoded items, in order."""
        return [decode_item(d) for d in self.raw(timeout_s)["items"]]

    async def aresult(self, timeout_s: float | None = None) -> list[Item]:
        """:meth:`result` for asyncio, without a thread: the reader thread's future, awaited on this loop."""
        timeout_s = timeout_s or self.timeout_s
        try:
            reply = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.reply)), timeout_s)
        except asyncio.TimeoutError:
            self.forget(self.id)
            raise JobTimeout(_timeout_message(self.id, self.task, self.size, timeout_s)) from None
        return [decode_item(d) for d in lane_outcome(self.id, self.size, self.first_index, reply)["items"]]

    def __await__(self):
        return self.aresult().__await__()


def lane_outcome(job_id: str, size: int, first_index: int, reply: tuple[dict | None, str | None]) -> dict:
    """A query-lane job's result, or its error raised: PayloadError for a payload the worker refused (the
    worker names the type first, ``PayloadError: ...``), JobFailed naming the job and its items otherwise."""
    result, error = reply
    if error is None:
        return result or {}
    kind, _, message = error.partition(": ")
    if kind == PayloadError.__name__:
        raise PayloadError(message)
    raise JobFailed(f"job {job_id} ({wire.TASK_ENCODE_QUERIES}, items {first_index}..{first_index + size - 1}) "
                    f"failed: {error}")


def _device_of(worker: dict, s: Settings) -> str:
    """The device queue(s) a worker reads, as ``--device`` names them (its device, for an older heartbeat)."""
    prefix = wire.device_queue(s, "")
    devices = [q[len(prefix):] for q in worker.get("queues") or () if q.startswith(prefix)]
    return ", ".join(devices) if devices else str(worker.get("device"))


def _timeout_message(job_id: str, task: str, size: int, timeout_s: float) -> str:
    return (f"job {job_id} ({task}, {size} texts) had no result after {timeout_s:.0f}s: is a worker running? "
            "(`m3q worker` starts one, `m3q status` shows them)")


@dataclass
class LostJob:
    """Sends a job again that a worker lost as it took it.

    kombu's Redis transport pops a message (BRPOP) and only then records it as unacknowledged: a worker
    killed between the two loses the job outright, where neither the dead-worker sweep nor the visibility
    timeout can see it. The producer still holds the payload, so it sends the job again (same id) once it
    has had no result, been held by no live worker and been absent from its empty queue for longer than a
    dead worker's jobs take to come back (``M3Q_DEAD_WORKER_S`` plus a heartbeat). A job that was not lost
    after all runs twice, which at-least-once delivery allows.
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
        log.warning("job %s is in no queue and held by no live worker: a worker died as it took it; "
                    "sending it again", self.job_id)
        self.resend()
        self.unheld_since = None


@dataclass
class IndexReport:
    """What an index call stored and rejected."""

    stored: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0
    jobs: int = 0


class Client:
    """Submit encode and index jobs to the workers and wait for them."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = wire.make_celery(self.settings, name="m3q-producer")
        self._dims: dict[str, int] | None = None
        self._redis_checked = False
        self._redis: redis.Redis | None = None
        self._served_at: dict[str, float] = {}  # queue -> when a live worker serving it was last seen
        self._next_notice = 0.0
        self._checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> {queue: shared check}
        self._publisher: ThreadPoolExecutor | None = None  # asyncio's Celery publishes, one thread in all
        self._publisher_lock = threading.Lock()

    # ---- single jobs -------------------------------------------------------------------------------------

    def submit(self, task: str, payload: dict, device: str | None = None, first_index: int = 0, *,
               task_id: str | None = None) -> Handle:
        """Send one job; route it to ``device``'s own queue when given. ``task_id``: the job's id when the
        caller chose it (re-index records it before the send, so a crash mid-send is seen); else a new one."""
        self._check_size(payload)
        queue = wire.device_queue(self.settings, device) if device else wire.task_queue(self.settings, task)
        result = self._send(task, payload, queue, task_id)
        resend = lambda: self._send(task, payload, queue, result.id)  # noqa: E731
        return Handle(result, task, len(payload.get("texts", [])), self.settings.job_timeout_s, first_index,
                      watch=self._watch(queue, LostJob(result.id, queue, resend)), settings=self.settings)

    def _check_size(self, payload: dict) -> bytes:
        """``payload`` packed as msgpack (the query lane sends these bytes), refused if too big."""
        try:
            body = msgpack.packb(payload)
        except (TypeError, ValueError) as e:
            raise PayloadError(f"payload cannot be sent as msgpack: {e}") from None
        if len(body) > self.settings.max_payload_bytes:
            raise PayloadError(f"job payload is {len(body):,} bytes, over the limit of "
                               f"{self.settings.max_payload_bytes:,} (M3Q_MAX_PAYLOAD_BYTES); send smaller jobs")
        return body

    def _send(self, task: str, payload: dict, queue: str, task_id: str | None = None) -> AsyncResult:
        """Publish a job; while Redis is unreachable (restarting), retry with backoff up to M3Q_JOB_TIMEOUT_S."""
        self._check_redis()
        task_id = task_id or str(uuid.uuid4())  # the same id on every try: a publish that landed is one job
        return self._retrying(task_id, task, lambda: self.app.send_task(
            task, args=[payload], queue=queue, task_id=task_id, headers={"m3q_sent": time.time()}))

    def _retrying(self, job_id: str, task: str, send: Callable[[], Any]) -> Any:
        """``send()``, retried with backoff while Redis is unreachable, up to M3Q_JOB_TIMEOUT_S."""
        deadline = time.monotonic() + self.settings.job_timeout_s
        delay_s = 0.2
        while True:
            try:
                return send()
            except Exception as e:  # noqa: BLE001 - sorted below: unreachable is retried, the rest raised
                delay_s = self._retry_delay(job_id, task, e, delay_s, deadline)
                time.sleep(delay_s)
                delay_s = min(2 * delay_s, RETRY_MAX_DELAY_S)

    def _retry_delay(self, job_id: str, task: str, e: Exception, delay_s: float, deadline: float) -> float:
        """How long to wait before sending again after ``e``; ``e`` (or BrokerError, past the deadline) raised."""
        if not _unreachable(e):
            raise e
        if time.monotonic() + delay_s >= deadline:
            raise BrokerError(f"cannot send job {job_id} ({task}): Redis at "
                              f"{maybe_sanitize_url(self.settings.broker_url)} unreachable for "
                              f"{self.settings.job_timeout_s:.0f}s (M3Q_JOB_TIMEOUT_S): {e}") from e
        log.warning("sending job %s: Redis unreachable (%s); retrying in %.1fs", job_id, e, delay_s)
        return delay_s

    # ---- the query lane ------------------------------------------------------------------------------------

    def submit_query(self, texts: Sequence[object], first_index: int = 0, **options: Any) -> LaneHandle:
        """Send one query job on the query lane (a Redis stream all workers read); its reply comes back on
        this process's reply list. ``Client.encode(..., "queries")`` sends its jobs so."""
        payload = wire.encode_payload(texts, **options)
        body = self._check_size(payload)
        self._check_redis()
        reader = reply_reader(self.settings)
        job_id = str(uuid.uuid4())
        reply = reader.expect(job_id)  # before the send: a fast worker's reply must find its waiter
        fields = stream.request_fields(job_id, reader.key, payload, body)
        s = self.settings
        try:
            self._retrying(job_id, wire.TASK_ENCODE_QUERIES, lambda: self._status_redis().xadd(
                stream.stream_key(s), fields, maxlen=s.query_stream_max, approximate=True))
        except BaseException:
            reader.forget(job_id)
            raise
        return LaneHandle(job_id, reply, reader.forget, len(payload["texts"]), s.job_timeout_s, first_index,
                          watch=self._watch(wire.query_queue(s)))

    def _check_redis(self) -> None:
        # Once per client: a wrong password or an untrusted certificate is reported at once, where Celery
        # would retry it as a lost connection for 20 s and then ask for a restart.
        if not self._redis_checked:
            # Unreachable is not judged here: down for now, the send retries and the next job checks again.
            self._redis_checked = all([_ping(self.settings, url, name) is None
                                       for url, name in _redis_urls(self.settings)])

    # ---- live workers ------------------------------------------------------------------------------------

    def workers(self, device: str | None = None) -> list[dict]:
        """Live workers as their heartbeats describe them (device, model, dtype, rate; what `m3q status`
        shows); with ``device``, only those serving that device's own queue."""
        queue = wire.device_queue(self.settings, device) if device else wire.query_queue(self.settings)
        return [w for w in wire.live_workers(self.settings, self._status_redis())
                if wire.serves(w, self.settings, queue)]

    def require_worker(self, device: str | None = None, grace_s: float | None = None) -> list[dict]:
        """The live workers (of ``device``'s queue, when given), waiting up to ``grace_s`` (default
        ``M3Q_NO_WORKER_GRACE_S``) for one to appear; :class:`NoWorker` if none does."""
        queue = wire.device_queue(self.settings, device) if device else wire.query_queue(self.settings)
        return self._require(queue, device, self.settings.no_worker_grace_s if grace_s is None else grace_s)

    def _ensure_worker(self, queue: str, device: str | None) -> None:
        # Before the first job of a call, never while jobs are in flight: a worker restarting under a running
        # index must not fail it (its jobs are redelivered).
        if self.settings.require_worker and time.monotonic() - self._served_at.get(queue, -1e9) > WORKER_SEEN_S:
            self._require(queue, device, self.settings.no_worker_grace_s)

    def _require(self, queue: str, device: str | None, grace_s: float) -> list[dict]:
        self._check_redis()
        deadline = time.monotonic() + grace_s
        told = False
        while True:
            try:
                every = wire.live_workers(self.settings, self._status_redis())
            except (redis.ConnectionError, redis.TimeoutError):
                return []  # Redis unreachable: not judged here, the send waits for Redis to come back
            found = [w for w in every if wire.serves(w, self.settings, queue)]
            if found:
                self._served_at[queue] = time.monotonic()
                return found
            if time.monotonic() >= deadline:
                raise NoWorker(self._no_worker_message(queue, device, grace_s, every))
            if not told:
                log.info("no live worker on %s yet; waiting up to %.0fs for one (M3Q_NO_WORKER_GRACE_S)",
                         queue, grace_s)
                told = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _no_worker_message(self, queue: str, device: str | None, grace_s: float, others: list[dict]) -> str:
        where = f"device {device} (queue {queue})" if device else queue
        seen = f"; the live workers serve {', '.join(sorted({_device_of(w, self.settings) for w in others}))} only" \
            if others else ""
        return (f"no worker is consuming {where}: no heartbeat within {grace_s:.0f}s (M3Q_NO_WORKER_GRACE_S) in "
                f"Redis at {maybe_sanitize_url(self.settings.broker_url)}{seen}. Start one with "
                f"`m3q worker{' --device ' + device if device else ''}` on the same M3Q_BROKER_URL and "
                f"M3Q_QUEUE_PREFIX ({self.settings.queue_prefix}); `m3q status` shows live workers and queues")

    def _watch(self, queue: str, lost: LostJob | None = None) -> Callable[[float], None]:
        """What a wait on ``queue`` checks every RESULT_POLL_S: a notice when no worker serving it is alive, and
        whether its job was lost (``lost``)."""
        def watch(waited_s: float) -> None:
            try:
                workers = wire.live_workers(self.settings, self._status_redis())
                alive = any(wire.serves(w, self.settings, queue) for w in workers)
                if alive and lost is not None:
                    lost.check(workers, self._status_redis(), self.settings)
            except redis.RedisError:
                return  # Redis down: the wait itself reports that
            if not alive and time.monotonic() >= self._next_notice:
                self._next_notice = time.monotonic() + WORKER_NOTICE_S
                log.warning("waiting for a worker on %s for %.0fs: none is alive (start one with `m3q worker`; "
                            "`m3q status` shows workers and queues)", queue, waited_s)
        return watch

    def close(self) -> None:
        """Close this client's connections (its Celery app's pools, its status Redis client). The reply
        reader thread of the process stays: other clients of the process share it, and it stops when idle."""
        with self._publisher_lock:
            if self._publisher is not None:
                self._publisher.shutdown(wait=False, cancel_futures=True)  # never blocks a loop's aclose
                self._publisher = None
        self.app.close()
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    async def aclose(self) -> None:
        """:meth:`close`, plus this event loop's query-lane reader and Celery-result listener (a web app's
        shutdown hook); awaits still pending are cancelled."""
        await AsyncLane.close_loop(self.settings)
        await AsyncResults.close_loop(self.settings)
        self.close()

    def _status_redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = wire.redis_client(self.settings)
        return self._redis

    def submit_encode(self, texts: Sequence[object], kind: str = "documents", *, device: str | None = None,
                      first_index: int = 0, **options: Any) -> Handle:
        """Send one encode job (kind 'queries' or 'documents')."""
        if kind not in wire.KINDS:
            raise ConfigError(f"kind must be 'queries' or 'documents', got {kind!r}")
        task = wire.TASK_ENCODE_QUERIES if kind == "queries" else wire.TASK_ENCODE_DOCUMENTS
        return self.submit(task, wire.encode_payload(texts, **options), device, first_index)

    # ---- many texts, bounded in flight ---------------------------------------------------------------

    def encode(self, texts: Sequence[object], kind: str = "documents", *, job_texts: int | None = None,
               device: str | None = None, **options: Any) -> list[Item]:
        """Encode any number of texts through the queue; items in input order. Queries go on the query lane
        (a Redis stream), unless routed to a ``device``; documents are Celery tasks."""
        out, chunks = self._split(texts, kind, job_texts)
        if chunks:
            self._ensure_worker(self._queue_of(kind, device), device)
        if kind == "queries" and not device:
            submit = lambda chunk: self.submit_query([texts[i] for i in chunk], chunk[0], **options)
        else:
            submit = lambda chunk: self.submit_encode([texts[i] for i in chunk], kind, device=device,
                                                      first_index=chunk[0], **options)
        for chunk, handle in zip(chunks, self.pipelined(chunks, submit)):
            for i, item in zip(chunk, handle.result()):
                out[i] = item
        return out  # type: ignore[return-value]

    def _split(self, texts: Sequence[object], kind: str, job_texts: int | None) -> tuple[list, list[list[int]]]:
        """Items answered here (texts that cannot travel) and the positions of the others, in jobs."""
        if kind not in wire.KINDS:
            raise ConfigError(f"kind must be 'queries' or 'documents', got {kind!r}")
        size = job_texts or (self.settings.job_texts if kind == "documents" else max(self.settings.job_texts, 256))
        out, send = _answer_unsendable(texts)
        return out, [send[start:start + size] for start in range(0, len(send), size)]

    def _queue_of(self, kind: str, device: str | None) -> str:
        task = wire.TASK_ENCODE_QUERIES if kind == "queries" else wire.TASK_ENCODE_DOCUMENTS
        return wire.device_queue(self.settings, device) if device else wire.task_queue(self.settings, task)

    def encode_queries(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Encode queries (up to 512 tokens each by default) through the query lane."""
        return self.encode(texts, "queries", **options)

    def encode_documents(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Encode documents (up to 8192 tokens each by default) through the document lane."""
        return self.encode(texts, "documents", **options)

    async def aencode(self, texts: Sequence[object], kind: str = "documents", *, job_texts: int | None = None,
                      device: str | None = None, **options: Any) -> list[Item]:
        """:meth:`encode` for asyncio handlers, without a thread per await: queries go on the query lane
        (replies read by one task per event loop), documents are Celery tasks, published on one thread of the
        client's and awaited through one pub/sub connection per event loop. At most ``M3Q_MAX_IN_FLIGHT`` jobs
        of a call are in flight."""
        out, chunks = self._split(texts, kind, job_texts)
        if chunks:
            await self._aensure_worker(self._queue_of(kind, device), device)
        if kind == "queries" and not device:
            run = lambda chunk: self._aquery([texts[i] for i in chunk], chunk[0], options)
        else:
            run = lambda chunk: self._ajob([texts[i] for i in chunk], kind, device, chunk[0], options)
        for chunk, items in zip(chunks, await self._apipelined(chunks, run)):
            for i, item in zip(chunk, items):
                out[i] = item
        return out  # type: ignore[return-value]

    async def aencode_queries(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Await the vectors of queries, e.g. from a FastAPI handler."""
        return await self.aencode(texts, "queries", **options)

    async def aencode_documents(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Await the vectors of documents."""
        return await self.aencode(texts, "documents", **options)

    async def _aquery(self, texts: list[object], first_index: int, options: dict[str, Any]) -> list[Item]:
        """One query job on the query lane, awaited on this event loop's reader."""
        payload = wire.encode_payload(texts, **options)
        body = self._check_size(payload)
        replies = AsyncLane.for_loop(self.settings)
        job_id = str(uuid.uuid4())
        reply = replies.expect(job_id)
        try:
            await self._asend(replies, stream.request_fields(job_id, replies.key, payload, body), job_id)
            done = await asyncio.wait_for(reply, self.settings.job_timeout_s)
        except asyncio.TimeoutError:
            raise JobTimeout(_timeout_message(job_id, wire.TASK_ENCODE_QUERIES, len(texts),
                                              self.settings.job_timeout_s)) from None
        finally:
            replies.forget(job_id)
        return [decode_item(d) for d in lane_outcome(job_id, len(texts), first_index, done)["items"]]

    async def _ajob(self, texts: list[object], kind: str, device: str | None, first_index: int,
                    options: dict[str, Any]) -> list[Item]:
        """One Celery job, sent off the event loop and awaited on this loop's result listener. Celery's publish
        blocks (and retries with backoff while Redis restarts), so it runs on this client's one publishing
        thread, which every loop and await of the client shares: the loop keeps serving the rest meanwhile."""
        handle = await self._apublish(
            lambda: self.submit_encode(texts, kind, device=device, first_index=first_index, **options))
        return await handle.aresult()

    async def _apublish(self, send: Callable[[], Handle]) -> Handle:
        """``send()`` on this client's one publishing thread (Celery's publish blocks)."""
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3q-publish")
            publisher = self._publisher
        return await asyncio.get_running_loop().run_in_executor(publisher, send)

    async def acall(self, task: str, payload: dict) -> dict:
        """One job of any task (``m3q.tokenize``, ``m3q.decode``, ``m3q.info``), awaited: the worker's answer
        as it sent it. :class:`NoWorker` when no worker serves the task's queue."""
        queue = wire.task_queue(self.settings, task)
        await self._aensure_worker(queue, None)
        handle = await self._apublish(lambda: self.submit(task, payload))
        return await handle.araw()

    async def _asend(self, replies: AsyncLane, fields: dict[bytes, bytes], job_id: str) -> None:
        """``XADD`` through this loop's lane, retried with backoff while Redis is unreachable."""
        deadline = time.monotonic() + self.settings.job_timeout_s
        delay_s = 0.2
        while True:
            try:
                return await replies.send(fields)
            except Exception as e:  # noqa: BLE001 - sorted by _retry_delay: unreachable is retried
                delay_s = self._retry_delay(job_id, wire.TASK_ENCODE_QUERIES, e, delay_s, deadline)
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, RETRY_MAX_DELAY_S)

    async def _aensure_worker(self, queue: str, device: str | None) -> None:
        # The blocking checks, on one thread that all of a loop's awaits share, and only when one is due.
        due = self.settings.require_worker and time.monotonic() - self._served_at.get(queue, -1e9) > WORKER_SEEN_S
        if due or not self._redis_checked:
            await call_once_per_loop(self._checks, queue, lambda: asyncio.to_thread(self._prepare, queue, device))

    def _prepare(self, queue: str, device: str | None) -> None:
        self._check_redis()
        self._ensure_worker(queue, device)

    async def _apipelined(self, chunks: list, run: Callable[[Any], Awaitable[list[Item]]]) -> list[list[Item]]:
        """Results of ``run(chunk)`` for each chunk, in order, at most ``M3Q_MAX_IN_FLIGHT`` running at once."""
        if len(chunks) == 1:
            return [await run(chunks[0])]  # the common web request: no task of its own
        window: deque[asyncio.Future] = deque()
        done: list[list[Item]] = []
        try:
            for chunk in chunks:
                if len(window) >= self.settings.max_in_flight:
                    done.append(await window.popleft())
                window.append(asyncio.ensure_future(run(chunk)))
            while window:
                done.append(await window.popleft())
        finally:
            [f.cancel() for f in window]
        return done

    def pipelined(self, chunks: Iterable, submit: Callable[[Any], Handle]) -> Iterator[Handle]:
        """Submit jobs keeping at most ``M3Q_MAX_IN_FLIGHT`` open; yield them in order as they finish."""
        window: deque[Handle] = deque()
        for chunk in chunks:
            if len(window) >= self.settings.max_in_flight:
                yield _waited(window.popleft())
            window.append(submit(chunk))
        while window:
            yield _waited(window.popleft())

    # ---- indexing ------------------------------------------------------------------------------------------

    def submit_index(self, collection: str, texts: Sequence[object], ids: Sequence[object],
                     metadata: Sequence[object] | None = None, first_index: int = 0,
                     device: str | None = None) -> Handle:
        """Send one index job: encode on a worker, upsert into Milvus ``collection``."""
        payload = {"collection": collection, "texts": list(texts), "ids": list(ids), "batch": first_index}
        if metadata is not None:
            payload["metadata"] = list(metadata)
        return self.submit(wire.TASK_INDEX_DOCUMENTS, payload, device, first_index)

    def index(self, collection: str, texts: Sequence[object], ids: Sequence[object],
              metadata: Sequence[object] | None = None, *, job_texts: int | None = None,
              progress: Callable[[int], None] | None = None) -> IndexReport:
        """Index documents; rejected ones are reported with their input position, never dropped silently."""
        if len(ids) != len(texts) or (metadata is not None and len(metadata) != len(texts)):
            raise ConfigError("texts, ids (and metadata) must have the same length")
        report = IndexReport()
        rows = ((i, texts[i], ids[i], None if metadata is None else metadata[i]) for i in range(len(texts)))
        return self.index_rows(collection, _first_of_each_id(rows, report), job_texts=job_texts, progress=progress,
                               report=report)

    def index_rows(self, collection: str, rows: Iterable[tuple[int, object, object, object]], *,
                   job_texts: int | None = None, progress: Callable[[int], None] | None = None,
                   report: IndexReport | None = None) -> IndexReport:
        """Index (position, text, id, metadata) rows in jobs of ``job_texts``, a bounded number in flight."""
        report = report or IndexReport()
        batches = self._first_checked(_index_batches(rows, job_texts or self.settings.job_texts, report),
                                      wire.document_queue(self.settings))
        submit = lambda batch: self._submit_rows(collection, batch)
        for handle in self.pipelined(batches, submit):
            raw = handle.raw()
            merge_index_result(report, {**raw, "errors": []}, 0)
            report.rejected += [(handle.rows[i], reason) for i, reason in raw["errors"]]
            if progress:
                progress(handle.size)
        return report

    def _submit_rows(self, collection: str, batch: list[tuple[int, object, object, object]]) -> Handle:
        positions, texts, ids, metadata = (list(column) for column in zip(*batch))
        handle = self.submit_index(collection, texts, ids, metadata, first_index=positions[0])
        handle.rows = positions  # the worker names items by place in the job; report them by input position
        return handle

    def _first_checked(self, batches: Iterator[list], queue: str) -> Iterator[list]:
        # A live worker is looked for once the first batch is read: an input with nothing to send needs none.
        for n, batch in enumerate(batches):
            if n == 0:
                self._ensure_worker(queue, None)
            yield batch

    def dims(self) -> dict[str, int]:
        """Output sizes (dense, colbert_vecs, sparse), asked of a worker once and cached."""
        if self._dims is None:
            self._ensure_worker(wire.task_queue(self.settings, wire.TASK_INFO), None)
            handle = self.submit(wire.TASK_INFO, {}, None)
            self._dims = dict(handle.raw()["dims"])
        return self._dims


def check_broker(settings: Settings) -> None:
    """Raise :class:`BrokerError` at once, naming the setting (password masked), when Redis cannot be reached
    or refuses us: the CLI's first step. (A :class:`Client` instead retries an unreachable Redis, which may be
    restarting, up to ``M3Q_JOB_TIMEOUT_S``.)"""
    for url, name in _redis_urls(settings):
        reason = _ping(settings, url, name)
        if reason is not None:
            raise BrokerError(f"cannot reach Redis at {maybe_sanitize_url(url)} ({name}): {reason}; "
                              f"is Redis running, and is {name} right?")


def _redis_urls(s: Settings) -> list[tuple[str, str]]:
    """(url, setting) of the broker and the result backend, the Redis ones only, each once."""
    urls = {s.broker_url: "M3Q_BROKER_URL"}
    urls.setdefault(s.backend_url, "M3Q_RESULT_BACKEND")
    return [(url, name) for url, name in urls.items() if url.startswith(("redis://", "rediss://"))]


def _ping(s: Settings, url: str, name: str) -> str | None:
    """None if Redis at ``url`` answered, why not if it cannot be reached now; BrokerError if it refused us."""
    client = wire.redis_client(s.replace(broker_url=url))
    try:
        client.ping()
        return None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if _unreachable(e):
            return str(e).rstrip(".")
        hint = "; check M3Q_REDIS_TLS_CA_FILE" if _tls_failure(e) else "; check the password in the URL"
        raise BrokerError(f"Redis at {maybe_sanitize_url(url)} ({name}) refused the producer: {e}{hint}") from None
    finally:
        client.close()


def merge_index_result(report: IndexReport, raw: dict, first_index: int) -> None:
    """Add one index job's result to a report, errors keyed by input position."""
    report.stored += raw["stored"]
    report.truncated += raw.get("truncated", 0)
    report.jobs += 1
    report.rejected += [(first_index + i, reason) for i, reason in raw["errors"]]


def _index_batches(rows: Iterable[tuple[int, object, object, object]], size: int,
                   report: IndexReport) -> Iterator[list[tuple[int, object, object, object]]]:
    """Batches of sendable rows; a row that cannot travel is rejected here, with its reason."""
    return chunked((row for row in rows if _sendable_row(row, report)), size)


def _sendable_row(row: tuple[int, object, object, object], report: IndexReport) -> bool:
    reason = checks.unsendable_text(row[1]) or checks.unsendable_metadata(row[3])
    if reason:
        report.rejected.append((row[0], f"{checks.name_item(row[0], row[2])}: {reason}"))
    return reason is None


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _first_of_each_id(rows: Iterable[tuple[int, object, object, object]],
                      report: IndexReport) -> Iterator[tuple[int, object, object, object]]:
    """The rows whose id comes first in this call; a repeat is rejected here, since its jobs may run in any order."""
    first: dict[str, int] = {}
    for row in rows:
        earlier = checks.repeat_of(first, row[2], row[0]) if isinstance(row[2], (str, int)) else None
        if earlier is not None:
            report.rejected.append((row[0], f"{checks.name_item(row[0], row[2])}: duplicate id {str(row[2])!r}, "
                                            f"first at item {earlier}"))
            continue
        yield row


def _answer_unsendable(texts: Sequence[object]) -> tuple[list[Item | None], list[int]]:
    """Item errors for texts that cannot travel (answered here), and the positions of those that can."""
    out: list[Item | None] = [None] * len(texts)
    send = []
    for i, text in enumerate(texts):
        reason = checks.unsendable_text(text)
        if reason:
            out[i] = wire.ItemError(reason)
        else:
            send.append(i)
    return out, send


def _waited(handle: Handle) -> Handle:
    handle.raw()  # raises on failure; the result stays cached in the AsyncResult
    return handle


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _tls_failure(e: BaseException) -> bool:
    return any(isinstance(c, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(c) for c in _causes(e))


def _listener_gave_up(e: BaseException) -> bool:
    """Celery's result listener stopped reconnecting after a long Redis outage (it never tries again)."""
    return isinstance(e, RuntimeError) and "Retry limit exceeded while trying to reconnect" in str(e)


def _unreachable(e: BaseException) -> bool:
    """Whether ``e`` says Redis cannot be reached right now (retry), not that it refused us (report)."""
    causes = list(_causes(e))
    if any(isinstance(c, (redis.AuthenticationError, redis.exceptions.AuthorizationError,
                          redis.exceptions.ResponseError)) for c in causes) or _tls_failure(e):
        return False
    return any(isinstance(c, (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)) for c in causes)
