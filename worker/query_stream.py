"""The query stream, a worker's side: query jobs on Redis streams, many per round trip, answered on per-client
reply lists.

The wire contract is :mod:`producer.contract.stream`. One reader thread takes up to the free prefetch
(``M3Q_QUERY_PREFETCH`` minus the jobs it holds) in one ``XREADGROUP``, checks each payload exactly as the
Celery path does and hands the read's jobs to the device loop together (their texts tokenized in one call;
a rerank's ``m3q.score`` job too: :mod:`worker.scoring`), which batches across jobs. One writer thread
answers every job finished by then in one write: the replies first, then one ``XACK`` and one ``XDEL``
(at least once: a worker that dies before the acknowledgement leaves its entries pending).

A dead worker's entries come back within ``M3Q_DEAD_WORKER_S``, like Celery jobs: at each
heartbeat the reader lists the entries pending longer than a heartbeat's lifetime on consumers whose
heartbeat has expired, claims them (``XCLAIM``) and answers them. Their times-delivered count bounds poison
queries: past ``M3Q_TASK_MAX_RETRIES + 1`` deliveries a job is answered with a PoisonJob error instead.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

import hiredis
import redis
from celery import bootsteps

from producer.contract import stream, wire
from producer.contract.redis_conn import Held, brief
from producer.contract.wire import PayloadError
from worker import celery_internals, runtime, scoring, threads
from worker.jobs import Job, poison
from worker.stream_stats import StreamStats
from worker.tasks import INSTANT_TASKS, encode_options, encode_result

log = logging.getLogger(__name__)

TASK = wire.TASK_ENCODE_QUERIES
BLOCK_MS = 1000
"""How long one XREADGROUP waits for entries (the reader notices a stop within this)."""
DRAIN_S = 30.0
"""At a warm shutdown, how long the jobs already taken get to be answered; the rest stay pending (another
worker answers them once this one's heartbeat has expired)."""
RETRY_S = 1.0
"""Pause after a Redis error (Redis restarting) before the next try."""


@dataclass
class Done:
    """A job ready to be answered: its entry, its life cycle, and its result or why it failed."""

    request: stream.Request
    job: Job
    result: dict | None = None
    error: Exception | None = None


class Encode(NamedTuple):
    """An encode job taken from the stream, checked, waiting for the rest of its read to be submitted."""

    request: stream.Request
    job: Job
    texts: list
    options: dict[str, Any]


class StreamReader:
    """The reader and writer threads of one worker's query stream."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.s = rt.settings
        self.r = rt.redis()
        self.name = rt.hostname  # the heartbeat hostname: the dead-worker sweep tells live consumers by it
        # The stream every worker reads, and this worker's device's own (queries routed to the device).
        self.streams = [stream.stream_key(self.s), stream.stream_key(self.s, self.s.device)]
        self.reply_prefix = stream.reply_key(self.s, "")
        # The reader's reads and the writer's answers, each on a connection its thread holds (redis_conn.Held).
        self._in, self._out = Held(self.r), Held(self.r)
        self.stats = StreamStats(getattr(rt.metrics, "registry", None))
        self._held: dict[tuple[str, bytes], float] = {}  # (stream, entry) taken, not acknowledged -> when
        self._cond = threading.Condition()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()  # the reader takes nothing more
        self._drain_until = float("inf")  # past this, the writer gives up on Redis and leaves entries pending
        self._writer_stop = threading.Event()
        self._groups_ready = False
        self._reader = threads.thread(self._read_loop, threads.STREAM_READER)
        self._writer = threads.thread(self._write_loop, threads.STREAM_WRITER)

    # ---- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the stream."""
        self.stats.watch_pending(lambda: len(self._held))
        self._writer.start()
        self._reader.start()
        log.info("query stream: reading %s as %s (prefetch %d)", " and ".join(self.streams), self.name,
                 self.s.query_prefetch)

    def running(self) -> bool:
        """Whether the reader still runs."""
        return self._reader.is_alive()

    def stop(self, drain_s: float = DRAIN_S) -> None:
        """Take nothing more, answer what was taken within ``drain_s``, leave the rest pending; join."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._reader.join(BLOCK_MS / 1000 + 10)
        self._drain_until = time.monotonic() + drain_s
        with self._cond:
            while self._held and time.monotonic() < self._drain_until:
                self._cond.wait(min(0.5, max(0.0, self._drain_until - time.monotonic())))
            left = len(self._held)
        self._writer_stop.set()
        self._writer.join(10)
        if left:
            log.warning("query stream stopped with %d query job(s) unanswered: they stay pending for another worker",
                        left)

    def status(self) -> dict:
        """The query stream as the heartbeat shows it: entries held (taken, not acknowledged), reads, replies."""
        st = self.stats
        with self._cond:
            held = len(self._held)
        return {"stream": self.streams[0], "streams": self.streams, "pending": held, "reads": st.reads,
                "entries": st.entries, "replies": st.replies, "replies_per_s": st.replies_per_s(),
                "claimed": st.claimed, "poison": st.poison}

    # ---- the reader --------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        next_sweep = 0.0
        failing = False
        while self._taking():
            try:
                self._ensure_groups()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + wire.heartbeat_s(self.s)
                    self._sweep()
                free = self._wait_capacity(next_sweep)
                if free and self._taking():
                    self._read(free)
                failing = False
            except redis.ResponseError as e:
                if _stream_gone(e):  # deleted, or lost by a Redis without persistence: make it again
                    log.warning("query stream: a stream is gone (%s); creating it and its group again", e)
                    self._groups_ready = False
                    continue
                failing = self._pause(e, failing)
            except redis.RedisError as e:
                failing = self._pause(e, failing)
            except Exception:  # noqa: BLE001 - a bug must not silently end the reader
                log.exception("query stream reader failed; going on")
                self._stopping.wait(RETRY_S)
        self._in.release()

    def _taking(self) -> bool:
        # A warm or cold shutdown stops the reads at once: Celery stops this step only after its own pool,
        # and a worker asked to stop must not keep taking queries meanwhile.
        return not self._stopping.is_set() and not celery_internals.shutdown_requested()

    def _pause(self, error: Exception, failing: bool) -> bool:
        # One warning per outage, not one a second.
        if not failing:
            log.warning("query stream cannot reach Redis (%s: %s); retrying", type(error).__name__, brief(error))
        self._stopping.wait(RETRY_S)
        return True

    def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for key in self.streams:
            try:
                # From "0": entries added before the group existed are read too.
                self.r.xgroup_create(key, stream.GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._groups_ready = True

    def _wait_capacity(self, until: float) -> int:
        """Free prefetch; when none, wait for a completion (or ``until``, the next sweep)."""
        with self._cond:
            while not self._stopping.is_set():
                free = self.s.query_prefetch - len(self._held)
                if free > 0:
                    return free
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return 0
                self._cond.wait(remaining)
        return 0

    def _read(self, count: int) -> None:
        read = ("XREADGROUP", "GROUP", stream.GROUP, self.name, "COUNT", count, "BLOCK", BLOCK_MS, "STREAMS",
                *self.streams, *[">"] * len(self.streams))
        taken = stream.read_entries(self._in.send(hiredis.pack_command(read), 1)[0])
        if taken:
            self.stats.read(len(taken))
        self._take_all(taken)

    def _take_all(self, entries: list[tuple[str, bytes, dict | None]]) -> None:
        """Take entries (read, or claimed from a dead worker); their encode jobs go to the device together."""
        encodes = [encode for encode in (self._take(*entry) for entry in entries) if encode is not None]
        if encodes:
            self._submit(encodes)

    def _take(self, key: str, entry_id: bytes, fields: dict | None) -> Encode | None:
        """Check one entry: an encode job is returned (for :meth:`_submit`), a score job queued, an instant one
        (:data:`INSTANT_TASKS`) answered at once, a bad one answered with why."""
        request = self._held_request(key, entry_id, fields)
        instant = INSTANT_TASKS.get(request.task)  # no device, and not counted as a job
        label = request.task if instant or request.task == scoring.TASK else TASK
        job = Job.start(self.rt, label, request.job_id, None if instant else request.sent)
        try:
            if request.error:
                raise PayloadError(request.error)
            if instant:
                self._done.put(Done(request, job, instant(self.rt, request.payload)))
            elif request.task == scoring.TASK:
                job.run_test_hook(request.payload)
                self._when_done(request, job, scoring.start(self.rt, request.payload), lambda answer: answer)
            elif request.task != TASK:
                raise PayloadError(f"task {request.task!r} does not travel on the query stream")
            else:
                payload, options = encode_options(self.rt, request.payload)
                job.run_test_hook(payload)
                return Encode(request, job, payload["texts"], options)
        except Exception as e:  # noqa: BLE001 - a bad job is answered, never dropped
            self._done.put(Done(request, job, error=e))
        return None

    def _submit(self, encodes: list[Encode]) -> None:
        """The encode jobs of one read, queued on the device together: their texts are tokenized in one call."""
        try:
            futures = self.rt.engine.submit_many([(e.texts, e.options) for e in encodes], "queries")
        except Exception as error:  # noqa: BLE001 - the engine refused them (it stops): each is answered so
            for e in encodes:
                self._done.put(Done(e.request, e.job, error=error))
            return
        for e, future in zip(encodes, futures):
            self._when_done(e.request, e.job, future, partial(encode_result, self.rt))

    def _when_done(self, request: stream.Request, job: Job, future: Future, finish: Callable[[Any], dict]) -> None:
        future.add_done_callback(lambda f: self._done.put((request, job, f, finish)))  # the writer serializes

    def _held_request(self, key: str, entry_id: bytes, fields: dict | None) -> stream.Request:
        request = stream.read_request(entry_id, fields or {})
        request.stream = key
        with self._cond:
            self._held[(key, entry_id)] = time.monotonic()
        return request

    # ---- dead workers --------------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Claim and answer the entries of dead workers; forget dead consumers that hold nothing."""
        for key in self.streams:
            self._sweep_stream(key, int(wire.heartbeat_ttl_s(self.s) * 1000))

    def _sweep_stream(self, key: str, ttl_ms: int) -> None:
        live: set[str] | None = None
        pending = self.r.xpending_range(key, stream.GROUP, "-", "+", 1000, idle=ttl_ms)
        if pending:
            live = self._live()
            with self._cond:
                held = set(self._held)
            # Ours but not held: a reply this process failed to write (Redis was down at its shutdown drain).
            lost = [p for p in pending if stream.text(p["consumer"]) not in live
                    or (stream.text(p["consumer"]) == self.name and (key, p["message_id"]) not in held)]
            if lost:
                self._claim(key, lost, ttl_ms)
        self._forget_consumers(key, ttl_ms, live)

    def _live(self) -> set[str]:
        return {str(w.get("hostname")) for w in wire.live_workers(self.s, self.r)} | {self.name}

    def _claim(self, key: str, lost: list[dict], ttl_ms: int) -> None:
        allowed = self.s.task_max_retries + 1
        # XCLAIM counts one more delivery: the count this claim makes.
        poison = {p["message_id"]: p["times_delivered"] + 1 for p in lost if p["times_delivered"] + 1 > allowed}
        with self._cond:
            free = max(0, self.s.query_prefetch - len(self._held))
        rest = [p["message_id"] for p in lost if p["message_id"] not in poison][:free]
        ids = list(poison) + rest
        if not ids:
            return
        # min-idle again: of several live workers sweeping at once, only the first claims an entry.
        claimed = self.r.xclaim(key, stream.GROUP, self.name, ttl_ms, ids)
        for entry_id, fields in claimed:
            if entry_id in poison:
                self._give_up(key, entry_id, fields, poison[entry_id])
        self._take_all([(key, entry_id, fields) for entry_id, fields in claimed if entry_id not in poison])
        given_up = sum(entry_id in poison for entry_id, _ in claimed)
        if claimed:
            self.stats.reclaimed(len(claimed), given_up)
            log.warning("claimed %d query job(s) from dead workers on %s (%d given up as poison)", len(claimed),
                        key, given_up)

    def _give_up(self, key: str, entry_id: bytes, fields: dict | None, deliveries: int) -> None:
        request = self._held_request(key, entry_id, fields)
        self._done.put(Done(request, Job.start(self.rt, TASK, request.job_id),
                            error=poison(self.rt, request.job_id, deliveries)))

    def _forget_consumers(self, key: str, ttl_ms: int, live: set[str] | None) -> None:
        # A dead worker's consumer with nothing pending is deleted, so the group does not grow without bound.
        idle = [stream.text(c["name"]) for c in self.r.xinfo_consumers(key, stream.GROUP)
                if not c.get("pending") and int(c.get("idle", 0)) > ttl_ms and stream.text(c["name"]) != self.name]
        if not idle:
            return
        live = self._live() if live is None else live
        for name in idle:
            if name not in live:
                self.r.xgroup_delconsumer(key, stream.GROUP, name)

    # ---- the writer --------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            try:
                first = self._done.get(timeout=0.2)
            except queue.Empty:
                if self._writer_stop.is_set():
                    self._out.release()
                    return
                continue
            batch = [first]
            while True:  # every job finished by now goes out in the same pipeline
                try:
                    batch.append(self._done.get_nowait())
                except queue.Empty:
                    break
            try:
                self._answer([self._settle(item) for item in batch])
            except Exception:  # noqa: BLE001 - a bug must not end the writer; the entries stay pending
                log.exception("query stream writer failed on %d job(s)", len(batch))

    def _settle(self, item: Done | tuple[stream.Request, Job, Future, Callable[[Any], dict]]) -> Done:
        if isinstance(item, Done):
            return item
        request, job, future, finish = item
        try:
            return Done(request, job, finish(future.result()))
        except Exception as e:  # noqa: BLE001 - the step failed: this job fails, the stream goes on
            return Done(request, job, error=e)

    def _answer(self, batch: list[Done]) -> None:
        """Replies, then acknowledgements, in one write; then the accounting."""
        replies: dict[str, list[bytes]] = {}
        for done in batch:
            key = self._reply_to(done.request)
            if key:
                replies.setdefault(key, []).append(_reply(done))
        commands: list[tuple] = []
        for key, values in replies.items():
            commands += [("RPUSH", key, *values), ("EXPIRE", key, stream.REPLY_TTL_S)]
        taken: dict[str, list[bytes]] = {}
        for done in batch:
            taken.setdefault(done.request.stream, []).append(done.request.entry_id)
        for key, ids in taken.items():
            commands += [("XACK", key, stream.GROUP, *ids), ("XDEL", key, *ids)]
        if self._execute(b"".join(map(hiredis.pack_command, commands)), len(commands), len(batch)):
            self.stats.replied(sum(len(v) for v in replies.values()))
            for done in batch:
                self._account(done)
        with self._cond:
            for done in batch:
                self._held.pop((done.request.stream, done.request.entry_id), None)
            self._cond.notify_all()

    def _reply_to(self, request: stream.Request) -> str | None:
        # Only this prefix's reply lists: an entry must not make a worker push onto any other key.
        if request.reply_to.startswith(self.reply_prefix) and len(request.reply_to) > len(self.reply_prefix):
            return request.reply_to
        log.error("query job %s has no valid reply list (%r): acknowledged unanswered", request.job_id,
                  request.reply_to[:200])
        return None

    def _execute(self, packed: bytes, commands: int, n: int) -> bool:
        """Send the commands, retrying while Redis is away; False once the shutdown drain gives up."""
        while True:
            try:
                for result in self._out.send(packed, commands, raise_errors=False):
                    if isinstance(result, redis.ResponseError):
                        log.error("query stream reply command failed: %s", result)
                return True
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() >= self._drain_until:
                    log.warning("could not answer %d query job(s) (%s); they stay pending", n, brief(e))
                    return False
                log.warning("could not answer %d query job(s) yet (%s); retrying", n, brief(e))
                time.sleep(RETRY_S)

    def _account(self, done: Done) -> None:
        if done.error is None:
            done.job.ok()
            return
        log.warning("query job %s failed: %s: %s", done.request.job_id, type(done.error).__name__, done.error)
        done.job.failed(done.error)


def _reply(done: Done) -> bytes:
    if done.error is not None:
        return stream.encode_reply(done.request.job_id, error=f"{type(done.error).__name__}: {done.error}")
    return stream.encode_reply(done.request.job_id, done.result)


def _stream_gone(error: redis.ResponseError) -> bool:
    # NOGROUP: no such stream or group; UNBLOCKED: the stream was deleted while XREADGROUP waited on it.
    return str(error).startswith(("NOGROUP", "UNBLOCKED"))


class QueryStreamStep(bootsteps.StartStopStep):
    """A consumer step that runs the query stream beside Celery's own consumers. The reader has its own Redis
    connection: a consumer restart after a broker error leaves it running (it reconnects itself); a worker
    shutdown stops it, answering what it took first."""

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.reader: StreamReader | None = None

    def start(self, c) -> None:
        if self.reader is not None and self.reader.running():
            return
        rt = runtime.current()
        self.reader = StreamReader(rt)
        rt.query_stream = self.reader.status
        self.reader.start()

    def stop(self, c) -> None:
        if self.reader is not None and self.reader.running() and celery_internals.worker_stopping(c):
            self.reader.stop(0.0 if celery_internals.cold_shutdown_requested() else DRAIN_S)

    def shutdown(self, c) -> None:
        if self.reader is not None and self.reader.running():
            self.reader.stop()
