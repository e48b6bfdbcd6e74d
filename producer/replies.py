"""The query stream's reply readers: replies without a thread per waiter.

- :class:`ReplyReader`: one daemon thread per process (per broker URL and queue prefix) reads the process's
  reply list (``BLPOP``, and ``LPOP`` of what else is there, in one write) and hands each reply to its
  :class:`~producer.waiter.Waiter`, found by job id: every blocking caller of the process.
- :class:`LoopReplies`: the same for an event loop's callers, one reader task per loop on a reply list of
  its own (why a second reader: its docstring has the measurement).

A reply for an id nobody waits for (a duplicate after a redelivery, or a waiter that gave up) is dropped.
Waiting itself (error messages, a blocking caller's timeout) is the client's; an event loop's waits end at
their deadlines here (:meth:`LoopReplies.expire`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from typing import Any, Awaitable, Callable

import hiredis
import redis

from producer.contract import stream
from producer.contract.redis_conn import AsyncHeld, Held, async_redis, brief, redis_client
from producer.contract.settings import Settings
from producer.waiter import Waiter

log = logging.getLogger(__name__)

BLOCK_S = 1
"""How long one ``BLPOP`` of a reader waits: also how soon an idle reader notices it may stop."""
DRAIN = 500
"""Replies taken by one ``LPOP`` after a ``BLPOP`` returned (all of a worker's step, usually)."""
IDLE_EXIT_S = 10.0
"""A reader with no waiter for this long stops; the next waiter starts a new one."""
BACKOFF_MAX_S = 5.0
"""Longest pause of a reader between two tries while Redis is down (doubling from 0.2 s)."""
EXPIRY_S = 0.25
"""How often an event loop's waits are held against their deadlines: a wait ends up to this long after its
timeout."""

Reply = tuple[dict[str, Any] | None, str | None]
"""(result, error) of one query job, as a worker answered it."""


def _settings_key(s: Settings) -> tuple[int, str, str]:
    # The pid: a forked child gets a reader (and a reply list) of its own.
    return os.getpid(), s.broker_url, s.queue_prefix


def backoff(delay_s: float) -> float:
    """The next pause of a reader that could not reach Redis, after ``delay_s``."""
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
        held, read = Held(self._redis), _read_command(self.key)
        idle_since = time.monotonic()
        delay_s = 0.2
        while not self._stop_if_idle(idle_since):
            try:
                raws = _popped(held.send(read, 2))
                delay_s = 0.2
            except redis.RedisError as e:  # Redis restarting, or failing over
                log.warning("reading replies from %s: %s; retrying in %.1fs", self.key, brief(e), delay_s)
                self._outage()
                time.sleep(delay_s)
                delay_s = backoff(delay_s)
                continue
            if self._outage_since is not None:
                with self._lock:
                    self._back()
            self._dispatch(raws)
            if self._waiters:
                idle_since = time.monotonic()
        held.release()

    def _stop_if_idle(self, idle_since: float) -> bool:
        with self._lock:
            if self._waiters or time.monotonic() - idle_since < IDLE_EXIT_S:
                return False
            self._thread = None
            return True

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


def _read_command(key: str) -> bytes:
    """One read of a reply list: wait up to :data:`BLOCK_S` for a reply, then take what else is there. One
    write: Redis runs the ``LPOP`` once the ``BLPOP`` is served, and both replies come back together."""
    return hiredis.pack_command(("BLPOP", key, BLOCK_S)) + hiredis.pack_command(("LPOP", key, DRAIN))


def _popped(replies: list[Any]) -> list[bytes]:
    got, rest = replies
    return [got[1], *(rest or ())] if got else []


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
        self._held, self._read = AsyncHeld(self._redis), _read_command(self.key)
        self._waiters: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._deadlines: dict[str, float] = {}  # job id -> the loop's time at which its wait ends
        self._expiry: asyncio.TimerHandle | None = None

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
        self._deadlines.pop(job_id, None)

    def expire(self, job_id: str, timeout_s: float) -> None:
        """End the wait for ``job_id`` with ``asyncio.TimeoutError`` if no reply came ``timeout_s`` from now,
        within :data:`EXPIRY_S`. One timer of the loop checks every wait: ``asyncio.wait_for``, a timer and a
        future for each, cost about 5 µs of CPU per query (docs/benchmarks)."""
        loop = asyncio.get_running_loop()
        self._deadlines[job_id] = loop.time() + timeout_s
        if self._expiry is None:
            self._expiry = loop.call_later(EXPIRY_S, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for job_id in [job_id for job_id, deadline in self._deadlines.items() if deadline <= now]:
            future = self._waiters.get(job_id)
            self.forget(job_id)
            if future is not None and not future.done():
                future.set_exception(asyncio.TimeoutError())
        self._expiry = loop.call_later(EXPIRY_S, self._expire, loop) if self._deadlines else None

    def _futures(self) -> list[asyncio.Future]:
        return list(self._waiters.values())

    async def aclose(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await super().aclose()

    async def _run(self) -> None:
        idle_since = time.monotonic()
        delay_s = 0.2
        while self._waiters or time.monotonic() - idle_since < IDLE_EXIT_S:
            try:
                raws = _popped(await self._held.send(self._read, 2))
                delay_s = 0.2
            except (redis.RedisError, OSError) as e:  # Redis restarting, or failing over
                log.warning("reading replies from %s: %s; retrying in %.1fs", self.key, brief(e), delay_s)
                self._outage()
                await asyncio.sleep(delay_s)
                delay_s = backoff(delay_s)
                continue
            if self._outage_since is not None:
                self._back()
            for job_id, reply in map(_decoded, raws):  # a job sent again may be answered twice in one read
                self._resends.pop(job_id, None)
                self._deadlines.pop(job_id, None)
                _resolve(self._waiters.pop(job_id, None), reply)
            if self._waiters:
                idle_since = time.monotonic()


def call_once_per_loop(holder: "weakref.WeakKeyDictionary", key: Any,
                       start: Callable[[], Awaitable[Any]]) -> "asyncio.Future":
    """The future of ``start()`` for ``key`` on this loop while it runs, a new one once it is done: concurrent
    callers share one check instead of one each. ``holder`` maps loops (weakly) to their running checks."""
    running = holder.setdefault(asyncio.get_running_loop(), {})
    if key not in running or running[key].done():
        running[key] = asyncio.ensure_future(start())
    return running[key]
