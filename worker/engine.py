"""The device loop: one thread owns the model and runs one step at a time, queries first.

Jobs arrive from any thread (Celery's pool threads, tests, the CLI). Their texts are validated and
tokenized in the caller's thread, so tokenizing the next job overlaps the device's current step. The loop
then picks the next step:

* waiting query texts, from as many jobs as fit the token budget, after waiting at most
  ``batch_wait_ms`` for more to arrive (cross-job batching) when queries come concurrently: a lone query
  after a step of one query job runs at once, since on an idle device waiting only adds latency;
* otherwise one step of document texts, again across jobs, longest first.

A document step runs in slices of about ``preempt_ms`` of device work while queries are arriving (longer
slices otherwise, see worker/slicing.py); between slices the loop runs every waiting query step, then
resumes the document step where it stopped. A query therefore waits for at most one slice of document
work, not for a whole step. Each job gets back exactly
its own items; an exception in a step fails only the jobs that had texts in that step, and the loop goes
on.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from producer.contract.errors import ConfigError
from producer.contract.settings import Settings
from producer.contract.wire import Embedding, Item, ItemError
from worker import threads
from worker.batcher import fits
from worker.encoder import Encoder, EncodeResult, Prepared
from worker.slicing import Slicer

log = logging.getLogger(__name__)

QUERIES_ABOUT_S = 2.0  # a query this recent keeps document slices short (worker/slicing.py)
_DEFAULTS = Settings()  # the engine's defaults are the settings' (M3Q_BATCH_WAIT_MS, ...): written once, there


@dataclass
class Submission:
    """One caller's texts in flight through the engine (a lane's job is :class:`worker.jobs.Job`)."""

    kind: str
    items: list[Item | None]
    pending: deque[Prepared]
    dense: bool
    sparse: bool
    colbert: bool
    truncated: int
    tokens: int
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    open_items: int = 0


EngineJob = tuple[Sequence[object], dict[str, Any]]
"""One job of :meth:`Engine.submit_many`: its texts, and :meth:`Engine.submit`'s options by name."""


@dataclass
class StepStats:
    """What one forward pass did, for metrics."""

    kind: str
    texts: int
    tokens: int
    padded_tokens: int
    seconds: float
    jobs: int


class Engine:
    """Serializes device work across jobs and threads."""

    def __init__(self, encoder: Encoder, batch_wait_ms: float = _DEFAULTS.batch_wait_ms,
                 cross_job_batching: bool = _DEFAULTS.cross_job_batching,
                 on_step: Callable[[StepStats], None] | None = None, preempt_ms: float = _DEFAULTS.preempt_ms) -> None:
        self.encoder = encoder
        self.batch_wait_s = batch_wait_ms / 1000
        self.cross_job = cross_job_batching
        self.on_step = on_step
        self._slicer = Slicer(self._serve_queries, preempt_ms / 1000, encoder.model.device,
                              self._queries_about) if preempt_ms > 0 else None
        self._last_query = float("-inf")
        self._last_query_jobs = 0  # jobs in the last query step: more than one means queries come concurrently
        self._queues: dict[str, deque[Submission]] = {"queries": deque(), "documents": deque()}
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threads.thread(self._loop, threads.DEVICE)
        self._thread.start()

    @classmethod
    def from_settings(cls, encoder: Encoder, s: Settings,
                      on_step: Callable[[StepStats], None] | None = None) -> "Engine":
        """The engine that settings describe (M3Q_BATCH_WAIT_MS, M3Q_CROSS_JOB_BATCHING, M3Q_PREEMPT_MS)."""
        return cls(encoder, s.batch_wait_ms, s.cross_job_batching, on_step, s.preempt_ms)

    def submit(self, texts: Sequence[object], kind: str = "documents", *, dense: bool = True, sparse: bool = True,
               colbert: bool = False, max_length: int | None = None, truncation_side: str = "right",
               normalize: bool = True) -> Future:
        """Queue texts; the future resolves to an :class:`EncodeResult` in input order (options as
        :meth:`Encoder.encode <worker.encoder.Encoder.encode>`)."""
        options = {"dense": dense, "sparse": sparse, "colbert": colbert, "max_length": max_length,
                   "truncation_side": truncation_side, "normalize": normalize}
        return self.submit_many([(texts, options)], kind)[0]

    def submit_many(self, jobs: Sequence[EngineJob], kind: str = "queries") -> list[Future]:
        """:meth:`submit` for many jobs at once, each ``(texts, options)``: the texts of jobs with the same
        token limit, truncation side and normalization are tokenized in one call (the tokenizer's batch call
        costs about what one text costs), and the device is woken once."""
        if kind not in self._queues:
            raise ConfigError(f"kind must be 'queries' or 'documents', got {kind!r}")
        prepared = self._prepare_all(jobs, kind)
        submissions = [self._submission(kind, items, options) for (_, options), items in zip(jobs, prepared)]
        waiting = [job for job in submissions if job.open_items]
        for job in submissions:
            if not job.open_items:
                job.future.set_result(self._result(job))
        if waiting:
            with self._cond:
                if self._stopped:
                    raise RuntimeError("engine is stopped")
                self._queues[kind].extend(waiting)
                if kind == "queries":
                    self._last_query = waiting[-1].submitted
                self._cond.notify()
        return [job.future for job in submissions]

    def _prepare_all(self, jobs: Sequence[EngineJob], kind: str) -> list[list[Prepared | ItemError]]:
        """Each job's texts prepared, with one :meth:`Encoder.prepare` call per set of tokenizing options."""
        groups: dict[tuple, list[int]] = {}
        for n, (_, options) in enumerate(jobs):
            key = (options.get("max_length"), options.get("truncation_side", "right"), options.get("normalize", True))
            groups.setdefault(key, []).append(n)
        out: list[list[Prepared | ItemError]] = [[] for _ in jobs]
        for (max_length, side, normalize), members in groups.items():
            texts = [text for n in members for text in jobs[n][0]]
            prepared = self.encoder.prepare(texts, kind, max_length, side, normalize)
            start = 0
            for n in members:
                size = len(jobs[n][0])
                out[n] = [_reindexed(p, start) for p in prepared[start:start + size]]
                start += size
        return out

    @staticmethod
    def _submission(kind: str, prepared: list[Prepared | ItemError], options: dict[str, Any]) -> Submission:
        good = sorted((p for p in prepared if isinstance(p, Prepared)), key=lambda p: -len(p.ids))
        return Submission(kind, [p if isinstance(p, ItemError) else None for p in prepared], deque(good),
                          options.get("dense", True), options.get("sparse", True), options.get("colbert", False),
                          sum(p.truncated for p in good), sum(len(p.ids) for p in good), open_items=len(good))

    def encode(self, texts: Sequence[object], kind: str = "documents", timeout_s: float | None = None,
               **options) -> EncodeResult:
        """Blocking :meth:`submit`."""
        return self.submit(texts, kind, **options).result(timeout_s)

    def pending(self) -> dict[str, int]:
        """Jobs waiting per kind."""
        with self._cond:
            return {k: len(q) for k, q in self._queues.items()}

    def stop(self) -> None:
        """Finish the queued work, then end the loop."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=60)

    # ---- the device thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            picked = self._next_step()
            if picked is None:
                return
            self._run_guarded(*picked)

    def _run_guarded(self, kind: str, step: list[tuple[Submission, Prepared]]) -> None:
        try:
            self._run(kind, step)
        except Exception as e:  # noqa: BLE001 - a failed step fails its own jobs, never the loop
            log.exception("step of %d texts failed", len(step))
            for job in {id(j): j for j, _ in step}.values():
                if not job.future.done():
                    job.future.set_exception(e)

    def _queries_about(self) -> bool:
        # Queries arrived lately, so more are likely: keep document slices short.
        return time.monotonic() - self._last_query < QUERIES_ABOUT_S

    def _serve_queries(self) -> None:
        """Run every waiting query step now, in the middle of a document step (the slicer's pause)."""
        while True:
            with self._cond:
                if not self._queues["queries"]:
                    return
                step = self._take(self._queues["queries"])
            self._run_guarded("queries", step)

    def _next_step(self) -> tuple[str, list[tuple[Submission, Prepared]]] | None:
        with self._cond:
            while not (self._queues["queries"] or self._queues["documents"]):
                if self._stopped:
                    return None
                self._cond.wait()
            if self._queues["queries"]:
                self._gather_queries()
                return "queries", self._take(self._queues["queries"])
            return "documents", self._take(self._queues["documents"])

    def _gather_queries(self) -> None:
        # Wait a moment for more queries, unless a full step is already waiting or the query comes alone: one
        # job waiting and the last query step had one too (an idle device, or a single caller).
        if not self.cross_job or (len(self._queues["queries"]) == 1 and self._last_query_jobs <= 1):
            return
        deadline = self._queues["queries"][0].submitted + self.batch_wait_s
        while time.monotonic() < deadline and self._waiting_tokens("queries") < self.encoder.limits.max_batch_tokens:
            self._cond.wait(deadline - time.monotonic())

    def _waiting_tokens(self, kind: str) -> int:
        return sum(len(p.ids) for job in self._queues[kind] for p in job.pending)

    def _take(self, queue: deque[Submission]) -> list[tuple[Submission, Prepared]]:
        """Texts for one step under the token budget, from the oldest jobs first."""
        budget = self.encoder.limits.max_batch_tokens
        step: list[tuple[Submission, Prepared]] = []
        longest = 0
        while queue:
            job = queue[0]
            while job.pending:
                n = len(job.pending[0].ids)
                if step and not fits(len(step) + 1, max(longest, n), budget):
                    return step
                longest = max(longest, n)
                step.append((job, job.pending.popleft()))
            queue.popleft()
            if not self.cross_job:
                break
        return step

    def _run(self, kind: str, step: list[tuple[Submission, Prepared]]) -> None:
        slicer = self._slicer if kind == "documents" else None
        started, paused = time.perf_counter(), slicer.paused_s if slicer else 0.0
        want = [any(getattr(j, f) for j, _ in step) for f in ("dense", "sparse", "colbert")]
        items = self.encoder.run([p for _, p in step], *want, slicer=slicer)
        lengths = [len(p.ids) for _, p in step]
        jobs = {id(j): j for j, _ in step}
        if kind == "queries":
            self._last_query_jobs = len(jobs)
        if self.on_step:
            seconds = time.perf_counter() - started - ((slicer.paused_s - paused) if slicer else 0.0)
            self.on_step(StepStats(kind, len(step), sum(lengths), len(step) * max(lengths), seconds, len(jobs)))
        for (job, p), item in zip(step, items):
            job.items[p.index] = _only_requested(item, job)
            job.open_items -= 1
            if job.open_items == 0 and not job.future.done():
                job.future.set_result(self._result(job))

    @staticmethod
    def _result(job: Submission) -> EncodeResult:
        return EncodeResult(job.items, job.truncated, job.tokens)  # type: ignore[arg-type]


def _only_requested(item: Item, job: Submission) -> Item:
    # A step computes the union of what its jobs asked for; each job gets back only its own request.
    if isinstance(item, ItemError):
        return item
    return Embedding(item.dense if job.dense else None, item.sparse_ids if job.sparse else None,
                     item.sparse_weights if job.sparse else None, item.colbert if job.colbert else None,
                     item.n_tokens, item.truncated)


def _reindexed(p: Prepared | ItemError, start: int) -> Prepared | ItemError:
    """``p`` with its index counted from ``start`` (its place in its own job, not in the batch it was prepared in)."""
    return p if isinstance(p, ItemError) or not start else dataclasses.replace(p, index=p.index - start)
