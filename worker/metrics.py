"""Prometheus metrics of one worker, served on ``M3Q_METRICS_PORT`` (0 turns the endpoint off)."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """Counters and histograms; each worker process has its own registry."""

    def __init__(self, port: int = 0) -> None:
        r = self.registry = CollectorRegistry()
        self.jobs = Counter("m3q_jobs", "Jobs finished, by task and outcome", ["task", "outcome"], registry=r)
        self.texts = Counter("m3q_texts", "Texts encoded, by kind", ["kind"], registry=r)
        self.tokens = Counter("m3q_tokens", "Tokens encoded, by kind", ["kind"], registry=r)
        self.padded = Counter("m3q_padded_tokens", "Tokens of the padded batches, by kind", ["kind"], registry=r)
        self.errors = Counter("m3q_errors", "Rejected texts and failed jobs, by kind of error", ["kind"], registry=r)
        self.batch_texts = Histogram("m3q_batch_texts", "Texts per forward pass", ["kind"], buckets=_SIZES, registry=r)
        self.batch_jobs = Histogram("m3q_batch_jobs", "Jobs merged into one forward pass", ["kind"],
                                    buckets=_SIZES, registry=r)
        self.encode_s = Histogram("m3q_encode_seconds", "Forward pass time", ["kind"], buckets=_SECONDS, registry=r)
        self.queue_wait_s = Histogram("m3q_queue_wait_seconds", "Time from send to start, by task", ["task"],
                                      buckets=_SECONDS, registry=r)
        self.job_s = Histogram("m3q_job_seconds", "Time a job spends in the worker, by task", ["task"],
                               buckets=_SECONDS, registry=r)
        if port:
            start_http_server(port, registry=r)
            log.info("Prometheus metrics on :%d/metrics", port)

    def step(self, s) -> None:
        """Record one forward pass (a worker.engine.StepStats)."""
        self.texts.labels(s.kind).inc(s.texts)
        self.tokens.labels(s.kind).inc(s.tokens)
        self.padded.labels(s.kind).inc(s.padded_tokens)
        self.batch_texts.labels(s.kind).observe(s.texts)
        self.batch_jobs.labels(s.kind).observe(s.jobs)
        self.encode_s.labels(s.kind).observe(s.seconds)
