"""The query stream: every query job a client sends, blocking or awaited, device-routed or not, and the
tokenizer's and ``m3q.info``'s jobs, as entries on a Redis stream (wire contract:
:mod:`producer.contract.stream`).

A send never blocks its caller: :meth:`QueryStream.submit` registers the job's waiter with the process's one
reply reader (:class:`~producer.replies.ReplyReader`), hands the entry to the process's one sending thread
(:class:`StreamSender`, which puts every entry queued by then in one pipeline), and returns a
:class:`StreamHandle`. ``handle.result()`` blocks on the reply; ``await handle`` awaits the same reply on the
event loop, without a thread of its own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable

from producer import redis_errors
from producer.celery_jobs import RESULT_POLL_S, failed_message, timeout_message
from producer.contract import stream, wire
from producer.contract.errors import JobFailed, JobTimeout
from producer.contract.settings import Settings
from producer.contract.wire import Item, PayloadError, decode_item
from producer.replies import Reply, reply_reader

log = logging.getLogger(__name__)

IDLE_EXIT_S = 10.0
"""A sending thread with nothing to send for this long stops; the next send starts a new one."""


@dataclass
class StreamHandle:
    """A job sent on the query stream; its reply comes through this process's reader."""

    id: str
    reply: Future
    forget: Callable[[str], None]
    task: str
    size: int
    timeout_s: float
    first_index: int = 0
    watch: Callable[[float], None] | None = None
    rows: list[int] | None = None

    def raw(self, timeout_s: float | None = None) -> dict:
        """The job's result as the worker sent it, waiting up to the timeout."""
        timeout_s = timeout_s or self.timeout_s
        started = time.monotonic()
        while not self.reply.done():
            waited_s = time.monotonic() - started
            if waited_s >= timeout_s:
                self.forget(self.id)
                raise JobTimeout(timeout_message(self.id, self.task, self.size, timeout_s))
            try:
                self.reply.result(timeout=min(RESULT_POLL_S, timeout_s - waited_s))
            except FutureTimeout:
                if self.watch:
                    self.watch(time.monotonic() - started)
        return self._outcome(self.reply.result())

    async def araw(self, timeout_s: float | None = None) -> dict:
        """:meth:`raw` for asyncio, without a thread: the reader's future, awaited on this loop."""
        timeout_s = timeout_s or self.timeout_s
        try:
            reply = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.reply)), timeout_s)
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
    caller, blocking or asyncio, go out together, one pipeline per round trip, retried with
    :class:`~producer.redis_errors.Backoff` while Redis restarts."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self._redis = wire.redis_client(s)
        self._outbox: list[tuple[str, dict[bytes, bytes], Future]] = []
        self._cond = threading.Condition()
        self._running = False

    def send(self, key: str, fields: dict[bytes, bytes]) -> Future:
        """Queue one ``XADD`` to ``key``; the future resolves once Redis has it (or with why it never will)."""
        sent: Future = Future()
        with self._cond:
            self._outbox.append((key, fields, sent))
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="m3q-stream-sender", daemon=True).start()
            self._cond.notify()
        return sent

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._outbox and not self._cond.wait_for(lambda: self._outbox, IDLE_EXIT_S):
                    self._running = False
                    return
                batch, self._outbox = self._outbox, []
            self._flush(batch)

    def _flush(self, batch: list[tuple[str, dict[bytes, bytes], Future]]) -> None:
        s = self.settings
        backoff = redis_errors.Backoff(s, f"{len(batch)} job(s) on the query stream")
        while True:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for key, fields, _ in batch:
                    pipe.xadd(key, fields, maxlen=s.query_stream_max, approximate=True)
                pipe.execute()
                [sent.set_result(None) for _, _, sent in batch]
                return
            except Exception as e:  # noqa: BLE001 - sorted by Backoff: unreachable is retried, the rest raised
                try:
                    delay_s = backoff.after(e)
                except Exception as final:  # noqa: BLE001 - refused, or past the deadline: every sender is told
                    [sent.set_exception(final) for _, _, sent in batch]
                    return
            time.sleep(delay_s)


_senders: dict[tuple[int, str, str], StreamSender] = {}
_senders_lock = threading.Lock()


def stream_sender(s: Settings) -> StreamSender:
    """This process's sender for ``s``'s Redis and queue prefix (created on first use)."""
    key = (os.getpid(), s.broker_url, s.queue_prefix)  # the pid: a forked child gets one of its own
    with _senders_lock:
        if key not in _senders:
            _senders[key] = StreamSender(s)
        return _senders[key]


class QueryStream:
    """One client's sends on the query stream."""

    def __init__(self, s: Settings, watch: Callable[[str], Callable[[float], None]]) -> None:
        self.settings = s
        self._watch = watch

    def submit(self, task: str, payload: dict[str, Any], body: bytes, device: str | None = None,
               first_index: int = 0) -> StreamHandle:
        """Send one job (``body``: ``payload`` packed, size-checked) on the stream every worker reads, or on
        ``device``'s own; the handle waits for its reply."""
        s = self.settings
        reader = reply_reader(s)
        job_id = str(uuid.uuid4())
        reply = reader.expect(job_id)  # before the send: a fast worker's reply must find its waiter
        sent = stream_sender(s).send(stream.stream_key(s, device),
                                     stream.request_fields(job_id, reader.key, payload, body, task))
        sent.add_done_callback(lambda f: _fail_unsent(f, reply, reader.forget, job_id))
        queue = wire.device_queue(s, device) if device else wire.query_queue(s)
        size = len(payload.get("texts") or payload.get("sequences") or ())
        return StreamHandle(job_id, reply, reader.forget, task, size, s.job_timeout_s, first_index,
                            watch=self._watch(queue))


def _fail_unsent(sent: Future, reply: Future, forget: Callable[[str], None], job_id: str) -> None:
    error = sent.exception()
    if error is not None:
        forget(job_id)
        if not reply.done():
            reply.set_exception(error)
