"""Replies without a thread per waiter: the query stream's reply readers and the asyncio wait for Celery results.

- :class:`ReplyReader`: one daemon thread per process (per broker URL and queue prefix) reads the process's
  reply list (``BLPOP``, then ``LPOP`` of what else is there) and hands each reply to its
  :class:`~producer.waiter.Waiter`, found by job id: every blocking caller of the process.
- :class:`LoopReplies`: the same for an event loop's callers, one reader task per loop on a reply list of
  its own (why a second reader: its docstring has the measurement).
- :class:`AsyncResults`: Celery results (document jobs) awaited through one ``redis.asyncio`` pub/sub
  connection per event loop, subscribed to each pending job's result key.

A reply for an id nobody waits for (a duplicate after a redelivery, or a waiter that gave up) is dropped.
Waiting itself (timeouts, error messages) is the client's: this module only delivers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from typing import Any, Awaitable, Callable

import redis

from producer.contract import stream
from producer.contract.redis_conn import async_redis, brief, redis_client
from producer.contract.settings import Settings
from producer.waiter import Waiter

log = logging.getLogger(__name__)

BLOCK_S = 1
"""How long one ``BLPOP`` of a reader waits: also how soon an idle reader notices it may stop."""
DRAIN = 500
"""Replies taken by one ``LPOP`` after a ``BLPOP`` returned (all of a worker's step, usually)."""
IDLE_EXIT_S = 10.0
"""A reader with no waiter for this long stops; the next waiter starts a new one."""
SWEEP_S = 5.0
"""Pending Celery results are also read directly this often (a Redis restart drops subscriptions)."""
BACKOFF_MAX_S = 5.0
"""Longest pause of a reader between two tries while Redis is down (doubling from 0.2 s)."""

Reply = tuple[dict[str, Any] | None, str | None]
"""(result, error) of one query job, as a worker answered it."""


def _settings_key(s: Settings) -> tuple[int, str, str]:
    # The pid: a forked child gets a reader (and a reply list) of its own.
    return os.getpid(), s.broker_url, s.queue_prefix


def _backoff(delay_s: float) -> float:
    return min(2 * delay_s, BACKOFF_MAX_S)


class Resends:
    """The jobs of a reader's waiters, sent again once Redis answers after an outage the reader saw: a Redis
    that restarted keeping nothing, or a failover to a replica that had not received them yet, may have lost
    a job's entry or its reply. Only the jobs sent before the outage began go again (the sender retries the
    later ones itself); a job answered twice has its second reply dropped."""

    def __init__(self) -> None:
        self._resends: dict[str, tuple[float, Callable[[], None]]] = {}
        self._outage_since: float | None = None

    def _remember(self, job_id: str, resend: Callable[[], None] | None) -> None:
        if resend is not None:
            self._resends[job_id] = (time.monotonic(), resend)

    def _outage(self) -> None:
        self._outage_since = self._outage_since or time.monotonic()

    def _back(self) -> None:
        since, self._outage_since = self._outage_since, None
        again = [resend for sent_at, resend in list(self._resends.values()) if sent_at < since]
        if again:
            log.warning("Redis answers again after %.1f s: sending %d query job(s) again that it may have lost "
                        "(a reply that comes twice is dropped)", time.monotonic() - since, len(again))
        for resend in again:
            resend()


# ---- blocking: one reader thread per process ---------------------------------------------------------------

class ReplyReader(Resends):
    """The reply list of this process and the thread that reads it."""

    def __init__(self, s: Settings) -> None:
        super().__init__()
        self.settings = s
        self.client_id = stream.new_client_id()
        self.key = stream.reply_key(s, self.client_id)
        self._redis = redis_client(s)
        self._waiters: dict[str, Waiter] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def expect(self, job_id: str, resend: Callable[[], None] | None = None) -> Waiter:
        """A future that gets the reply to ``job_id``; register it before the job is sent. ``resend`` sends
        the job again (see :class:`Resends`)."""
        future = Waiter()
        with self._lock:
            self._waiters[job_id] = future
            self._remember(job_id, resend)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="m3q-replies", daemon=True)
                self._thread.start()
        return future

    def forget(self, job_id: str) -> None:
        """Stop waiting for ``job_id`` (it timed out): a late reply is dropped."""
        with self._lock:
            self._waiters.pop(job_id, None)
            self._resends.pop(job_id, None)

    def _run(self) -> None:
        idle_since = time.monotonic()
        delay_s = 0.2
        while not self._stop_if_idle(idle_since):
            try:
                raws = self._read()
                delay_s = 0.2
            except redis.RedisError as e:  # Redis restarting, or failing over
                log.warning("reading replies from %s: %s; retrying in %.1fs", self.key, brief(e), delay_s)
                self._outage()
                time.sleep(delay_s)
                delay_s = _backoff(delay_s)
                continue
            if self._outage_since is not None:
                with self._lock:
                    self._back()
            self._dispatch(raws)
            if self._waiters:
                idle_since = time.monotonic()

    def _stop_if_idle(self, idle_since: float) -> bool:
        with self._lock:
            if self._waiters or time.monotonic() - idle_since < IDLE_EXIT_S:
                return False
            self._thread = None
            return True

    def _read(self) -> list[bytes]:
        got = self._redis.blpop([self.key], timeout=BLOCK_S)
        if got is None:
            return []
        return [got[1], *(self._redis.lpop(self.key, DRAIN) or [])]

    def _dispatch(self, raws: list[bytes]) -> None:
        for raw in raws:
            job_id, reply = _decoded(raw)
            with self._lock:
                future = self._waiters.pop(job_id, None)
                self._resends.pop(job_id, None)
            _resolve(future, reply)


def _resolve(future: Waiter | asyncio.Future | None, reply: Reply) -> None:
    """Give ``reply`` to the caller waiting on ``future``, if one still is (a second reply is dropped)."""
    if future is not None and not future.done():
        future.set_result(reply)


def fail(future: Waiter | asyncio.Future, error: BaseException) -> None:
    """Fail a waiter (from its own loop's thread, for an asyncio one)."""
    if not future.done():
        future.set_exception(error)


_per_process: dict[tuple[type, int, str, str], Any] = {}
_per_process_lock = threading.Lock()


def per_process(cls: type, s: Settings) -> Any:
    """This process's one ``cls(s)`` for ``s``'s Redis and queue prefix (created on first use; a forked child
    gets its own)."""
    key = (cls, *_settings_key(s))
    with _per_process_lock:
        if key not in _per_process:
            _per_process[key] = cls(s)
        return _per_process[key]


def reply_reader(s: Settings) -> ReplyReader:
    """This process's reader for ``s``'s Redis and queue prefix."""
    return per_process(ReplyReader, s)


def _decoded(raw: bytes) -> tuple[str, Reply]:
    try:
        job_id, result, error = stream.decode_reply(raw)
    except Exception as e:  # noqa: BLE001 - not a reply: nobody can be told, so it is only logged
        log.warning("dropped a malformed reply (%s: %s)", type(e).__name__, e)
        return "", (None, None)
    return job_id, (result, error)


# ---- asyncio ------------------------------------------------------------------------------------------------

class PerLoop:
    """One instance per (event loop, settings key), dropped with its loop."""

    _instances: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]"

    @classmethod
    def for_loop(cls, s: Settings, *args: Any):
        loop = asyncio.get_running_loop()
        mine = cls._instances.setdefault(loop, {})
        key = (*_settings_key(s), s.backend_url)
        if key not in mine:
            mine[key] = cls(s, *args)
        return mine[key]

    @classmethod
    async def close_loop(cls, s: Settings) -> None:
        """Stop this event loop's instance for ``s`` (if any) and close its connections."""
        mine = cls._instances.get(asyncio.get_running_loop(), {})
        instance = mine.pop((*_settings_key(s), s.backend_url), None)
        if instance is not None:
            await instance.aclose()

    closed = False

    async def aclose(self) -> None:
        """Cancel this instance's tasks and close its Redis connections; waiters still pending are cancelled."""
        self.closed = True
        for task in self._tasks():
            if task is not None and not task.done():
                task.cancel()
        for future in self._futures():
            if not future.done():
                future.cancel()
        await self._redis.aclose()

    def _tasks(self) -> list[asyncio.Task | None]:
        return [self._reader]

    def _futures(self) -> list[asyncio.Future]:
        return []


class LoopReplies(PerLoop, Resends):
    """An event loop's own reply list, read by a task of that loop: :class:`ReplyReader` for asyncio callers.

    The one place where the two ways to wait read replies differently. Measured with ``bench/gateway.py``
    (three alternated runs), resolving a loop's waiters from the reader thread cost the gateway 0.04-0.07 ms of
    CPU per request and 8-16% of its rate: the thread takes the GIL from a busy loop at every read."""

    _instances = weakref.WeakKeyDictionary()

    def __init__(self, s: Settings) -> None:
        Resends.__init__(self)
        self.key = stream.reply_key(s, stream.new_client_id())
        self._redis = async_redis(s)
        self._waiters: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    def expect(self, job_id: str, resend: Callable[[], None] | None = None) -> asyncio.Future:
        """A future that gets the reply to ``job_id``; register it before the job is sent. ``resend`` sends
        the job again (see :class:`Resends`)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = future
        self._remember(job_id, resend)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._run(), name="m3q-replies")
        return future

    def forget(self, job_id: str) -> None:
        """Stop waiting for ``job_id``: a late reply is dropped."""
        self._waiters.pop(job_id, None)
        self._resends.pop(job_id, None)

    def _futures(self) -> list[asyncio.Future]:
        return list(self._waiters.values())

    async def _run(self) -> None:
        idle_since = time.monotonic()
        delay_s = 0.2
        while self._waiters or time.monotonic() - idle_since < IDLE_EXIT_S:
            try:
                got = await self._redis.blpop([self.key], timeout=BLOCK_S)
                raws = [got[1], *(await self._redis.lpop(self.key, DRAIN) or [])] if got else []
                delay_s = 0.2
            except (redis.RedisError, OSError) as e:  # Redis restarting, or failing over
                log.warning("reading replies from %s: %s; retrying in %.1fs", self.key, brief(e), delay_s)
                self._outage()
                await asyncio.sleep(delay_s)
                delay_s = _backoff(delay_s)
                continue
            if self._outage_since is not None:
                self._back()
            for job_id, reply in map(_decoded, raws):  # a job sent again may be answered twice in one read
                self._resends.pop(job_id, None)
                _resolve(self._waiters.pop(job_id, None), reply)
            if self._waiters:
                idle_since = time.monotonic()


# ---- asyncio: Celery results through one pub/sub connection per event loop ----------------------------------

class AsyncResults(PerLoop):
    """Awaits Celery results: SUBSCRIBE to the result key's channel (the Redis backend PUBLISHes each result
    there when it stores it), then GET it once (a result stored before the subscription), plus a GET sweep
    of every pending key each :data:`SWEEP_S` (subscriptions lost in a Redis restart)."""

    _instances = weakref.WeakKeyDictionary()

    def __init__(self, s: Settings, backend: Any) -> None:
        self.backend = backend
        self._redis = async_redis(s, s.backend_url)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._pending: dict[bytes, asyncio.Future] = {}
        self._watches: dict[bytes, tuple[Callable[[float], None], float]] = {}  # key -> (watch, started)
        self._reader: asyncio.Task | None = None
        self._watching: asyncio.Task | None = None
        # redis-py's PubSub opens its connection on the first command: concurrent first subscribes would
        # each open one, and all but the last would be lost.
        self._subscribing = asyncio.Lock()

    async def wait(self, task_id: str, watch: Callable[[float], None] | None = None) -> dict[str, Any]:
        """The task's final meta (status, result), decoded by the backend; cancel to stop waiting.

        ``watch(waited_s)``, if given, is called with the other waits' every :data:`SWEEP_S` while this one
        lasts, all in one worker thread (it may block on Redis): the client's check for a job a worker lost.
        """
        key = _as_bytes(self.backend.get_key_for_task(task_id))
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        if watch is not None:
            self._watches[key] = (watch, time.monotonic())
        try:
            await self._watch(key)
            return await future
        finally:
            self._pending.pop(key, None)
            self._watches.pop(key, None)
            await self._unwatch(key)

    def _futures(self) -> list[asyncio.Future]:
        return list(self._pending.values())

    def _tasks(self) -> list[asyncio.Task | None]:
        return [self._reader, self._watching]

    async def aclose(self) -> None:
        await super().aclose()
        await self._pubsub.aclose()

    async def _watch(self, key: bytes) -> None:
        try:
            async with self._subscribing:
                await self._pubsub.subscribe(key)
        except (redis.RedisError, OSError, RuntimeError) as e:
            # Redis down, or the listener reconnecting on the same connection ("readuntil() called while
            # another coroutine is already waiting"): the sweep reads the key once it is back.
            log.debug("subscribing to %r: %s", key, e)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._run(), name="m3q-results")
        try:
            self._offer(key, await self._redis.get(key))
        except (redis.RedisError, OSError):
            pass

    async def _unwatch(self, key: bytes) -> None:
        try:
            async with self._subscribing:
                await self._pubsub.unsubscribe(key)
        except (redis.RedisError, OSError, RuntimeError):
            pass  # dropped with the connection anyway, or unsubscribed when the listener reconnects

    def _offer(self, key: bytes, raw: bytes | None) -> None:
        """Resolve ``key``'s waiter if ``raw`` is a final state."""
        future = self._pending.get(key)
        if raw is None or future is None or future.done():
            return
        meta = self.backend.decode_result(raw)
        if meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
            future.set_result(meta)

    async def _run(self) -> None:
        swept = time.monotonic()
        delay_s = 0.2
        try:
            while self._pending:
                try:
                    await self._listen()
                    delay_s = 0.2
                except (redis.RedisError, OSError, RuntimeError) as e:
                    log.debug("result listener: %s; retrying in %.1fs", brief(e), delay_s)
                    await asyncio.sleep(delay_s)
                    delay_s = _backoff(delay_s)
                if time.monotonic() - swept >= SWEEP_S:
                    swept = time.monotonic()
                    await self._sweep()
                    if self._watches and (self._watching is None or self._watching.done()):
                        # A task of its own: the listener goes on while the checks wait on Redis.
                        self._watching = asyncio.get_running_loop().create_task(
                            asyncio.to_thread(self._run_watches, list(self._watches.values())))
        finally:
            self._reader = None

    @staticmethod
    def _run_watches(watches: list[tuple[Callable[[float], None], float]]) -> None:
        for watch, started in watches:
            try:
                watch(time.monotonic() - started)
            except Exception as e:  # noqa: BLE001 - a check that fails (Redis down) is tried at the next sweep
                log.debug("watching a pending result: %s", e)

    async def _listen(self) -> None:
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=BLOCK_S)
        if message and message.get("type") == "message":
            self._offer(_as_bytes(message["channel"]), message["data"])

    async def _sweep(self) -> None:
        keys = list(self._pending)
        try:
            for start in range(0, len(keys), DRAIN):
                chunk = keys[start:start + DRAIN]
                for key, raw in zip(chunk, await self._redis.mget(chunk)):
                    self._offer(key, raw)
        except (redis.RedisError, OSError) as e:
            log.debug("result sweep: %s", e)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def call_once_per_loop(holder: "weakref.WeakKeyDictionary", key: Any,
                       start: Callable[[], Awaitable[Any]]) -> "asyncio.Future":
    """The future of ``start()`` for ``key`` on this loop while it runs, a new one once it is done: concurrent
    callers share one check instead of one each. ``holder`` maps loops (weakly) to their running checks."""
    running = holder.setdefault(asyncio.get_running_loop(), {})
    if key not in running or running[key].done():
        running[key] = asyncio.ensure_future(start())
    return running[key]
