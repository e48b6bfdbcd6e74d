"""One job's life cycle in a worker, the same on both transports: the Celery tasks (:mod:`worker.tasks`) and
the query stream (:mod:`worker.query_stream`).

A transport makes a :class:`Job` when it takes a job (the queue wait is observed from the ``m3q_sent`` header),
lets it count its delivery (a job that keeps killing its worker becomes a :class:`PoisonJob`) and pass the
test crash hook, then ends it once: :meth:`Job.ok` or :meth:`Job.failed` (counters, metrics and, for a
failure, the record `m3q status` shows). The ``m3q.info`` answer is here too: both transports give the same.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from producer.contract import wire
from producer.contract.errors import PayloadError, PoisonJob
from worker.records import count_delivery, record_failure
from worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job in this worker, from the moment it is taken to its outcome."""

    rt: Runtime
    task: str
    job_id: str
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, rt: Runtime, task: str, job_id: str | None, sent: Any = None) -> "Job":
        """A job just taken; ``sent``: its ``m3q_sent`` header (epoch seconds), for the queue-wait metric."""
        if sent:
            rt.metrics.queue_wait_s.labels(task).observe(max(0.0, time.time() - float(sent)))
        return cls(rt, task, job_id or "?")

    def check_deliveries(self, allowed: int) -> None:
        """Count one more delivery; past ``allowed`` deliveries the job is a :class:`PoisonJob`.

        Acks are late, so a job that kills its worker comes back; this stops it looping.
        """
        try:
            counted = count_delivery(self.rt.settings, self.rt.redis(), self.job_id)
        except Exception as e:  # noqa: BLE001 - Redis restarting: run the job uncounted rather than fail it
            log.warning("could not count the deliveries of job %s (%s); running it anyway", self.job_id, e)
            return
        if counted > allowed:
            raise poison(self.rt, self.job_id, counted)

    def run_test_hook(self, payload: Any) -> None:
        """The test crash hook (:mod:`worker.testing`), armed only under ``M3Q_TESTING=1``."""
        if self.rt.crash_hook is not None:
            self.rt.crash_hook(payload)

    def ok(self) -> None:
        """The job finished: count it and its time in the worker."""
        self.rt.counters.jobs += 1
        self.rt.metrics.jobs.labels(self.task, "ok").inc()
        self.rt.metrics.job_s.labels(self.task).observe(time.monotonic() - self.started)

    def failed(self, error: Exception) -> None:
        """The job failed for good: count it and record it for `m3q status` (best effort)."""
        rt = self.rt
        rt.counters.errors += 1
        rt.metrics.jobs.labels(self.task, "failed").inc()
        rt.metrics.errors.labels(type(error).__name__).inc()
        # Best effort: with Redis down the failure cannot be recorded, and that must not hide the job's own error.
        try:
            record_failure(rt.settings, rt.redis(), self.task, self.job_id, f"{type(error).__name__}: {error}")
        except Exception as why:  # noqa: BLE001
            log.warning("could not record the failure of job %s in Redis: %s", self.job_id, why)


def poison(rt: Runtime, job_id: str, deliveries: int) -> PoisonJob:
    """The error of a job delivered ``deliveries`` times without finishing, past the bound."""
    return PoisonJob(f"job {job_id} was delivered {deliveries} times without finishing "
                     f"(M3Q_TASK_MAX_RETRIES={rt.settings.task_max_retries}); giving up")


def info_answer(rt: Runtime) -> dict:
    """What a worker answers to ``m3q.info``, on both transports: the encoder, its host, the model's identity."""
    return {**rt.encoder.info(), "hostname": rt.hostname, "model_identity": wire.model_identity(rt.encoder.name)}


def check_size(rt: Runtime, payload: dict) -> None:
    """Refuse an oversized job before encoding anything."""
    texts = payload["texts"]
    if len(texts) > rt.settings.max_job_texts:
        raise PayloadError(f"job has {len(texts):,} texts, over the limit of {rt.settings.max_job_texts:,} "
                           "(M3Q_MAX_JOB_TEXTS); the producer client splits large inputs for you")
    # surrogatepass: a lone surrogate (JSON can carry one) is an item error later, not a crash of the whole job
    size = len(msgpack.packb(payload, default=repr, unicode_errors="surrogatepass"))
    if size > rt.settings.max_payload_bytes:
        raise PayloadError(f"job payload is {size:,} bytes, over the limit of {rt.settings.max_payload_bytes:,} "
                           "(M3Q_MAX_PAYLOAD_BYTES)")


def stamp(rt: Runtime) -> wire.Stamp:
    """Which worker, device, model and dtype produced a result."""
    info = rt.encoder.info()
    return {"worker": rt.hostname, "device": info["device"], "model": info["model"], "dtype": info["dtype"]}
