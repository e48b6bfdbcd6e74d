"""The query stream: every query job a client sends, blocking or awaited, device-routed or not, and the
tokenizer's and ``m3q.info``'s jobs, as entries on a Redis stream (wire contract:
:mod:`producer.contract.stream`).

A send never blocks its caller: :meth:`QueryStream.submit` registers the job's waiter with a reply reader,
hands the entry to a sender, which writes every entry queued by then at once, and returns a
:class:`StreamHandle`: ``handle.result()`` blocks on the reply, ``await handle`` awaits it without a thread.
A blocking caller's reader and sender are the process's threads (:class:`~producer.replies.ReplyReader`,
:class:`StreamSender`); an asyncio caller's are tasks of its event loop
(:class:`~producer.replies.LoopReplies`, :class:`LoopSender`), since a thread that takes the GIL from a busy
loop costs it measurably (the docstrings give the figures).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable

import hiredis

from producer import redis_errors
from producer.celery_jobs import RESULT_POLL_S, failed_message, timeout_message
from producer.contract import stream, wire
from producer.contract.errors import JobFailed, JobTimeout
from producer.contract.redis_conn import AsyncHeld, Held, async_redis, redis_client
from producer.contract.settings import Settings
from producer.contract.wire import Item, PayloadError, decode_item
from producer.replies import LoopReplies, PerLoop, Reply, fail, per_process, reply_reader
from producer.waiter import Waiter

log = logging.getLogger(__name__)

IDLE_EXIT_S = 10.0
"""A sending thread with nothing to send for this long stops; the next send starts a new one."""


@dataclass
class StreamHandle:
    """A job sent on the query stream; its reply comes through this process's reader."""

    id: str
    reply: Waiter | asyncio.Future
    """Resolved by the process's reply reader: a blocking sender's waiter, or the sending loop's own future."""
    forget: Callable[[str], None]
    task: str
    size: int
    timeout_s: float
    first_index: int = 0
    watch: Callable[[float], None] | None = None
    rows: list[int] | None = None
    expire: Callable[[str, float], None] | None = None
    """For a reply of the sending loop: ends the wait at a deadline (:meth:`~producer.replies.LoopReplies.expire`)."""

    def raw(self, timeout_s: float | None = None) -> dict:
        """The job's result as the worker sent it, waiting up to the timeout."""
        if isinstance(self.reply, asyncio.Future):
            raise TypeError("this job was sent from an event loop: await it")
        timeout_s = timeout_s or self.timeout_s
        started = time.monotonic()
        while True:
            waited_s = time.monotonic() - started
            if waited_s >= timeout_s and not self.reply.done():
                self.forget(self.id)
                raise JobTimeout(timeout_message(self.id, self.task, self.size, timeout_s))
            try:
                return self._outcome(self.reply.result(timeout=min(RESULT_POLL_S, max(0.0, timeout_s - waited_s))))
            except FutureTimeout:
                if self.watch:
                    self.watch(time.monotonic() - started)

    async def araw(self, timeout_s: float | None = None) -> dict:
        """:meth:`raw` for asyncio, without a thread: the reader's future, awaited on this loop."""
        timeout_s = timeout_s or self.timeout_s
        if self.expire is not None:  # the loop's own reply reader ends the wait at its deadline
            self.expire(self.id, timeout_s)
            waiter = self.reply
        else:  # sent blocking, awaited here
            waiter = asyncio.wait_for(self.reply.loop_future(), timeout_s)
        try:
            reply = await waiter
        except asyncio.TimeoutError:
            self.forget(self.id)
            raise JobTimeout(timeout_message(self.id, self.task, self.size, timeout_s)) from None
        except asyncio.CancelledError:
            self.forget(self.id)
            raise
        return self._outcome(reply)

    def result(self, timeout_s: float | None = None) -> list[Item]:
        """Decoded items, in order."""
        return [decode_item(d) for d in self.raw(timeout_s)["items"]]

    async def aresult(self, timeout_s: float | None = None) -> list[Item]:
        """:meth:`result` for asyncio."""
        return [decode_item(d) for d in (await self.araw(timeout_s))["items"]]

    def __await__(self):
        return self.aresult().__await__()

    def _outcome(self, reply: Reply) -> dict:
        """The result, or the job's error raised: PayloadError for a payload the worker refused (the worker
        names the type first, ``PayloadError: ...``), JobFailed naming the job and its items otherwise."""
        result, error = reply
        if error is None:
            return result or {}
        kind, _, message = error.partition(": ")
        if kind == PayloadError.__name__:
            raise PayloadError(message)
        raise JobFailed(failed_message(self.id, self.task, self.first_index, self.size, error))


class StreamSender:
    """The process's sending thread for the query stream (per Redis and queue prefix): the entries of every
    caller, blocking or asyncio, go out together, one write per round trip (:func:`_packed`), retried with
    :class:`~producer.redis_errors.Backoff` while Redis restarts."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self._redis = redis_client(s)
        self._outbox: list[Entry] = []
        self._cond = threading.Condition()
        self._running = False

    def send(self, key: str, fields: dict[bytes, bytes], failed: Callable[[BaseException], None]) -> None:
        """Queue one ``XADD`` to ``key``; ``failed(why)`` if Redis refuses it or stays away too long."""
        with self._cond:
            self._outbox.append((key, fields, failed))
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="m3q-stream-sender", daemon=True).start()
            self._cond.notify()

    def _run(self) -> None:
        held = Held(self._redis)
        while True:
            with self._cond:
                if not self._outbox and not self._cond.wait_for(lambda: self._outbox, IDLE_EXIT_S):
                    self._running = False
                    break
                batch, self._outbox = self._outbox, []
            self._flush(batch, held)
        held.release()

    def _flush(self, batch: list[Entry], held: Held) -> None:
        backoff = redis_errors.Backoff(self.settings, f"{len(batch)} job(s) on the query stream")
        while True:
            try:
                held.send(_packed(batch, self.settings), len(batch))
                return
            except Exception as e:  # noqa: BLE001 - sorted by Backoff: unreachable is retried, the rest raised
                delay_s = _retry_after(backoff, e, batch)
            if delay_s is None:
                return
            time.sleep(delay_s)


class LoopSender(PerLoop):
    """An event loop's sends on the query stream, in one write per round trip on the loop itself: the
    asyncio side of :class:`StreamSender`, with the same batches, retry and failures. Why a loop sends and
    reads (:class:`~producer.replies.LoopReplies`) on its own: a thread that takes the GIL from a busy loop
    at every batch cost the gateway 8-16% of its rate."""

    _instances = weakref.WeakKeyDictionary()

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self._redis = async_redis(s)
        self._held = AsyncHeld(self._redis)
        self._outbox: list[Entry] = []
        self._reader: asyncio.Task | None = None  # the flushing task (PerLoop cancels it at aclose)

    def send(self, key: str, fields: dict[bytes, bytes], failed: Callable[[BaseException], None]) -> None:
        """Queue one ``XADD`` to ``key``; ``failed(why)`` if Redis refuses it or stays away too long."""
        self._outbox.append((key, fields, failed))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox, []
            backoff = redis_errors.Backoff(self.settings, f"{len(batch)} job(s) on the query stream")
            while True:
                try:
                    await self._held.send(_packed(batch, self.settings), len(batch))
                    break
                except Exception as e:  # noqa: BLE001 - sorted by Backoff: unreachable is retried, the rest raised
                    delay_s = _retry_after(backoff, e, batch)
                if delay_s is None:
                    break
                await asyncio.sleep(delay_s)


Entry = tuple[str, dict[bytes, bytes], Callable[[BaseException], None]]
"""(stream key, fields, what to call if it is never sent) of one queued ``XADD``."""


def _packed(batch: list[Entry], s: Settings) -> bytes:
    """The batch's ``XADD``s as one write, packed by hiredis in C: with redis-py's pipeline, which packs in
    Python on asyncio and times each reply, a send cost the client 2-2.5x the CPU (docs/benchmarks)."""
    head = (b"MAXLEN", b"~", str(s.query_stream_max).encode(), b"*")
    return b"".join(hiredis.pack_command((b"XADD", key, *head, *chain.from_iterable(fields.items())))
                    for key, fields, _ in batch)


def _retry_after(backoff: redis_errors.Backoff, error: Exception, batch: list[Entry]) -> float | None:
    """The pause before the batch is sent again, or None once every sender was told why it never will be."""
    try:
        return backoff.after(error)
    except Exception as final:  # noqa: BLE001 - refused, or past the deadline: every sender is told
        for _, _, failed in batch:
            failed(final)
        return None


def stream_sender(s: Settings) -> StreamSender:
    """This process's sender for ``s``'s Redis and queue prefix."""
    return per_process(StreamSender, s)


class QueryStream:
    """One client's sends on the query stream."""

    def __init__(self, s: Settings, watch: Callable[[str], Callable[[float], None]]) -> None:
        self.settings = s
        self._watch = watch
        self._watches: dict[str, Callable[[float], None]] = {}  # queue -> its watch (the same for every job)
        self._ends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (its replies, its sender)

    def _loop_ends(self, loop: asyncio.AbstractEventLoop) -> tuple[LoopReplies, LoopSender]:
        ends = self._ends.get(loop)
        if ends is None or ends[0].closed or ends[1].closed:  # closed by Client.aclose: open new ones
            ends = self._ends[loop] = (LoopReplies.for_loop(self.settings), LoopSender.for_loop(self.settings))
        return ends

    def submit(self, task: str, payload: dict[str, Any], body: bytes, device: str | None = None,
               first_index: int = 0, loop: asyncio.AbstractEventLoop | None = None) -> StreamHandle:
        """Send one job (``body``: ``payload`` packed, size-checked) on the stream every worker reads, or on
        ``device``'s own; the handle waits for its reply (``loop``: the running loop, which awaits it)."""
        s = self.settings
        replies, sender = self._loop_ends(loop) if loop is not None else (reply_reader(s), stream_sender(s))
        job_id = stream.new_job_id()
        key, fields = stream.stream_key(s, device), stream.request_fields(job_id, replies.key, payload, body, task)

        def failed(why: BaseException) -> None:
            replies.forget(job_id)
            fail(reply, why)
        # Registered before the send: a fast worker's reply must find its waiter.
        reply = replies.expect(job_id, resend=lambda: sender.send(key, fields, failed))
        sender.send(key, fields, failed)
        size = len(payload.get("pairs") or payload.get("texts") or payload.get("sequences") or ())
        return StreamHandle(job_id, reply, replies.forget, task, size, s.job_timeout_s, first_index,
                            watch=self._watch_of(device), expire=replies.expire if loop is not None else None)

    def _watch_of(self, device: str | None) -> Callable[[float], None]:
        queue = wire.device_queue(self.settings, device) if device else wire.query_queue(self.settings)
        if queue not in self._watches:
            self._watches[queue] = self._watch(queue)
        return self._watches[queue]


