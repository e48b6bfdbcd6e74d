"""The stream lane: query jobs on a Redis stream, many per round trip, answered on per-client reply lists.

The wire contract is :mod:`producer.contract.stream`. One reader thread takes up to the free prefetch
(``M3Q_QUERY_PREFETCH`` minus the jobs it holds) in one ``XREADGROUP``, checks each payload exactly as the
Celery path does and hands it to the device loop, which batches across jobs. One writer thread answers every
job finished by then in one pipeline: the replies first, then one ``XACK`` and one ``XDEL`` (at least once:
a worker that dies before the acknowledgement leaves its entries pending).

A dead worker's entries come back within ``M3Q_DEAD_WORKER_S``, like the Celery lanes' jobs: at each
heartbeat the reader lists the entries pending longer than a heartbeat's lifetime on consumers whose
heartbeat has expired, claims them (``XCLAIM``) and answers them. Their times-delivered count bounds poison
queries: past ``M3Q_TASK_MAX_RETRIES + 1`` deliveries a job is answered with a PoisonJob error instead.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps
from celery.worker import state as worker_state

from producer.contract import stream, wire
from producer.contract.wire import PayloadError
from worker import runtime
from worker.jobs import Job, poison
from worker.tasks import encode_options, encode_result

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


class LaneStats:
    """Running totals of the lane, for the status heartbeat and Prometheus."""

    def __init__(self, registry=None) -> None:
        self.reads = self.entries = self.replies = self.claimed = self.poison = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, replies) of each write
        self._lock = threading.Lock()  # the writer appends while the heartbeat thread reads
        self._prom = _prometheus(registry) if registry is not None else None

    def read(self, n: int) -> None:
        """Count one XREADGROUP that returned ``n`` entries."""
        self.reads += 1
        self.entries += n
        if self._prom:
            self._prom["reads"].inc()
            self._prom["entries"].inc(n)

    def replied(self, n: int) -> None:
        """Count ``n`` replies written in one pipeline."""
        self.replies += n
        with self._lock:
            self._recent.append((time.monotonic(), n))
        if self._prom:
            self._prom["replies"].inc(n)

    def reclaimed(self, n: int, poison: int) -> None:
        """Count entries claimed from dead workers, ``poison`` of them given up on."""
        self.claimed += n
        self.poison += poison
        if self._prom:
            self._prom["claimed"].inc(n)

    def watch_pending(self, held) -> None:
        """Let Prometheus read the number of held entries from ``held()``."""
        if self._prom:
            self._prom["pending"].set_function(held)

    def replies_per_s(self, window_s: float = 60.0) -> float:
        """Replies per second over the last ``window_s`` (or since the first reply)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > window_s:
                self._recent.popleft()
            recent = list(self._recent)
        span = max(1.0, min(window_s, now - recent[0][0])) if recent else window_s
        return sum(n for _, n in recent) / span


_PROMETHEUS: dict[int, dict[str, Any]] = {}


def _prometheus(registry) -> dict[str, Any]:
    # Once per registry: a lane started again in the same process (a consumer restart) reuses its metrics.
    if id(registry) not in _PROMETHEUS:
        from prometheus_client import Counter, Gauge

        _PROMETHEUS[id(registry)] = {
            "reads": Counter("m3q_lane_reads", "XREADGROUP calls of the stream lane that returned entries",
                             registry=registry),
            "entries": Counter("m3q_lane_entries", "Query jobs the stream lane read", registry=registry),
            "replies": Counter("m3q_lane_replies", "Replies the stream lane wrote", registry=registry),
            "claimed": Counter("m3q_lane_claimed", "Query jobs claimed from dead workers", registry=registry),
            "pending": Gauge("m3q_lane_pending", "Query jobs the stream lane took and has not acknowledged yet",
                             registry=registry),
        }
    return _PROMETHEUS[id(registry)]


class Lane:
    """The reader and writer threads of one worker's stream lane."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.s = rt.settings
        self.r = rt.redis()
        self.name = rt.hostname  # the heartbeat hostname: the dead-worker sweep tells live consumers by it
        self.stream = stream.stream_key(self.s)
        self.reply_prefix = stream.reply_key(self.s, "")
        self.stats = LaneStats(getattr(rt.metrics, "registry", None))
        self._held: dict[bytes, float] = {}  # entries taken and not yet acknowledged -> when taken
        self._cond = threading.Condition()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()  # the reader takes nothing more
        self._drain_until = float("inf")  # past this, the writer gives up on Redis and leaves entries pending
        self._writer_stop = threading.Event()
        self._group_ready = False
        self._reader = threading.Thread(target=self._read_loop, name="m3q-lane-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="m3q-lane-writer", daemon=True)

    # ---- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the stream."""
        self.stats.watch_pending(lambda: len(self._held))
        self._writer.start()
        self._reader.start()
        log.info("stream lane reading %s as %s (prefetch %d)", self.stream, self.name, self.s.query_prefetch)

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
            log.warning("stream lane stopped with %d query job(s) unanswered: they stay pending for another worker",
                        left)

    def status(self) -> dict:
        """The lane as the heartbeat shows it: entries held (taken, not acknowledged), reads, replies."""
        st = self.stats
        with self._cond:
            held = len(self._held)
        return {"stream": self.stream, "pending": held, "reads": st.reads, "entries": st.entries,
                "replies": st.replies, "replies_per_s": st.replies_per_s(), "claimed": st.claimed,
                "poison": st.poison}

    # ---- the reader --------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        next_sweep = 0.0
        failing = False
        while self._taking():
            try:
                self._ensure_group()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + wire.heartbeat_s(self.s)
                    self._sweep()
                free = self._wait_capacity(next_sweep)
                if free and self._taking():
                    self._read(free)
                failing = False
            except redis.ResponseError as e:
                if _stream_gone(e):  # deleted, or lost by a Redis without persistence: make it again
                    log.warning("stream lane: %s is gone (%s); creating it and its group again", self.stream, e)
                    self._group_ready = False
                    continue
                failing = self._pause(e, failing)
            except redis.RedisError as e:
                failing = self._pause(e, failing)
            except Exception:  # noqa: BLE001 - a bug must not silently end the lane
                log.exception("stream lane reader failed; going on")
                self._stopping.wait(RETRY_S)

    def _taking(self) -> bool:
        # A warm or cold shutdown stops the reads at once: Celery stops this step only after its own pool,
        # and a worker asked to stop must not keep taking queries meanwhile.
        return not self._stopping.is_set() and not _shutting_down()

    def _pause(self, error: Exception, failing: bool) -> bool:
        # One warning per outage, not one a second.
        if not failing:
            log.warning("stream lane cannot reach Redis (%s: %s); retrying", type(error).__name__, error)
        self._stopping.wait(RETRY_S)
        return True

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From "0": entries added before the group existed are read too.
            self.r.xgroup_create(self.stream, stream.GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

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
        response = self.r.xreadgroup(stream.GROUP, self.name, {self.stream: ">"}, count=count, block=BLOCK_MS)
        for _, entries in _streams(response):
            if entries:
                self.stats.read(len(entries))
            for entry_id, fields in entries:
                self._take(entry_id, fields)

    def _take(self, entry_id: bytes, fields: dict | None) -> None:
        """Check one entry and queue it for the device; a bad one is answered with why."""
        request = stream.read_request(entry_id, fields or {})
        with self._cond:
            self._held[entry_id] = time.monotonic()
        job = Job.start(self.rt, TASK, request.job_id, request.sent)
        if request.error:
            self._done.put(Done(request, job, error=PayloadError(request.error)))
            return
        try:
            payload, options = encode_options(self.rt, request.payload)
            job.run_test_hook(payload)
            future = self.rt.engine.submit(payload["texts"], "queries", **options)
        except Exception as e:  # noqa: BLE001 - a bad job is answered, never dropped
            self._done.put(Done(request, job, error=e))
            return
        # Runs on the device thread: only a queue put there; results are serialized by the writer.
        future.add_done_callback(lambda f: self._done.put((request, job, f)))

    # ---- dead workers --------------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Claim and answer the entries of dead workers; forget dead consumers that hold nothing."""
        ttl_ms = int(wire.heartbeat_ttl_s(self.s) * 1000)
        live: set[str] | None = None
        pending = self.r.xpending_range(self.stream, stream.GROUP, "-", "+", 1000, idle=ttl_ms)
        if pending:
            live = self._live()
            with self._cond:
                held = set(self._held)
            # Ours but not held: a reply this process failed to write (Redis was down at its shutdown drain).
            lost = [p for p in pending if _text(p["consumer"]) not in live
                    or (_text(p["consumer"]) == self.name and p["message_id"] not in held)]
            if lost:
                self._claim(lost, ttl_ms)
        self._forget_consumers(ttl_ms, live)

    def _live(self) -> set[str]:
        return {str(w.get("hostname")) for w in wire.live_workers(self.s, self.r)} | {self.name}

    def _claim(self, lost: list[dict], ttl_ms: int) -> None:
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
        claimed = self.r.xclaim(self.stream, stream.GROUP, self.name, ttl_ms, ids)
        given_up = 0
        for entry_id, fields in claimed:
            if entry_id in poison:
                self._give_up(entry_id, fields, poison[entry_id])
                given_up += 1
            else:
                self._take(entry_id, fields)
        if claimed:
            self.stats.reclaimed(len(claimed), given_up)
            log.warning("claimed %d query job(s) from dead workers on %s (%d given up as poison)", len(claimed),
                        self.stream, given_up)

    def _give_up(self, entry_id: bytes, fields: dict | None, deliveries: int) -> None:
        request = stream.read_request(entry_id, fields or {})
        with self._cond:
            self._held[entry_id] = time.monotonic()
        self._done.put(Done(request, Job.start(self.rt, TASK, request.job_id),
                            error=poison(self.rt, request.job_id, deliveries)))

    def _forget_consumers(self, ttl_ms: int, live: set[str] | None) -> None:
        # A dead worker's consumer with nothing pending is deleted, so the group does not grow without bound.
        idle = [_text(c["name"]) for c in self.r.xinfo_consumers(self.stream, stream.GROUP)
                if not c.get("pending") and int(c.get("idle", 0)) > ttl_ms and _text(c["name"]) != self.name]
        if not idle:
            return
        live = self._live() if live is None else live
        for name in idle:
            if name not in live:
                self.r.xgroup_delconsumer(self.stream, stream.GROUP, name)

    # ---- the writer --------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            try:
                first = self._done.get(timeout=0.2)
            except queue.Empty:
                if self._writer_stop.is_set():
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
            except Exception:  # noqa: BLE001 - a bug must not end the lane; the entries stay pending
                log.exception("stream lane writer failed on %d job(s)", len(batch))

    def _settle(self, item: Done | tuple[stream.Request, Job, Future]) -> Done:
        if isinstance(item, Done):
            return item
        request, job, future = item
        try:
            return Done(request, job, encode_result(self.rt, future.result()))
        except Exception as e:  # noqa: BLE001 - the step failed: this job fails, the lane goes on
            return Done(request, job, error=e)

    def _answer(self, batch: list[Done]) -> None:
        """Replies, then acknowledgements, in one round trip; then the accounting."""
        pipe = self.r.pipeline(transaction=False)
        replies: dict[str, list[bytes]] = {}
        for done in batch:
            key = self._reply_to(done.request)
            if key:
                replies.setdefault(key, []).append(_reply(done))
        for key, values in replies.items():
            pipe.rpush(key, *values)
            pipe.expire(key, stream.REPLY_TTL_S)
        ids = [done.request.entry_id for done in batch]
        pipe.xack(self.stream, stream.GROUP, *ids)
        pipe.xdel(self.stream, *ids)
        if self._execute(pipe, len(batch)):
            self.stats.replied(sum(len(v) for v in replies.values()))
            for done in batch:
                self._account(done)
        with self._cond:
            for entry_id in ids:
                self._held.pop(entry_id, None)
            self._cond.notify_all()

    def _reply_to(self, request: stream.Request) -> str | None:
        # Only this prefix's reply lists: an entry must not make a worker push onto any other key.
        if request.reply_to.startswith(self.reply_prefix) and len(request.reply_to) > len(self.reply_prefix):
            return request.reply_to
        log.error("query job %s has no valid reply list (%r): acknowledged unanswered", request.job_id,
                  request.reply_to[:200])
        return None

    def _execute(self, pipe, n: int) -> bool:
        """Run the pipeline, retrying while Redis is away; False once the shutdown drain gives up."""
        while True:
            try:
                for result in pipe.execute(raise_on_error=False):
                    if isinstance(result, Exception):
                        log.error("stream lane reply command failed: %s", result)
                return True
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() >= self._drain_until:
                    log.warning("could not answer %d query job(s) (%s); they stay pending", n, e)
                    return False
                log.warning("could not answer %d query job(s) yet (%s); retrying", n, e)
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


def _streams(response: Any) -> list:
    # RESP2 answers a list of [stream, entries]; RESP3 a map.
    if not response:
        return []
    return list(response.items()) if isinstance(response, dict) else response


def _stream_gone(error: redis.ResponseError) -> bool:
    # NOGROUP: no such stream or group; UNBLOCKED: the stream was deleted while XREADGROUP waited on it.
    return str(error).startswith(("NOGROUP", "UNBLOCKED"))


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _shutting_down() -> bool:
    """Whether Celery was told to stop (a warm or cold shutdown), from the moment of the signal."""
    from worker import celery_internals

    return celery_internals.shutdown_requested()


def _worker_stopping(c) -> bool:
    """Whether the worker shuts down (rather than its consumer restarting after a broker error)."""
    if _shutting_down():
        return True
    blueprint = getattr(getattr(c, "controller", None), "blueprint", None)
    return blueprint is None or blueprint.state != bootsteps.RUN


class StreamLane(bootsteps.StartStopStep):
    """A consumer step that runs the stream lane beside Celery's own consumers.

    The lane has its own Redis connection: a consumer restart after a broker error leaves it running (it
    reconnects itself); a worker shutdown stops it, answering what it took first.
    """

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.lane: Lane | None = None

    def start(self, c) -> None:
        if self.lane is not None and self.lane.running():
            return
        rt = runtime.current()
        self.lane = Lane(rt)
        rt.lane = self.lane.status
        self.lane.start()

    def stop(self, c) -> None:
        if self.lane is not None and self.lane.running() and _worker_stopping(c):
            self.lane.stop(0.0 if worker_state.should_terminate is not None else DRAIN_S)

    def shutdown(self, c) -> None:
        if self.lane is not None and self.lane.running():
            self.lane.stop()
