"""A worker process's resources: settings, the encoder and its device loop, metrics, the status heartbeat.

Created once at start-up (before the first job is taken) and reached by the tasks through :func:`current`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from producer.contract import wire
from producer.contract.redis_conn import brief
from producer.contract.settings import Settings
from worker import testing, threads
from worker.encoder import Encoder, Limits
from worker.engine import Engine, StepStats

log = logging.getLogger(__name__)


def load_encoder(s: Settings) -> Encoder:
    """The encoder that settings describe (the test-only stand-in only under M3Q_TESTING=1, see worker.testing)."""
    if testing.is_standin(s.model):
        return testing.load_standin(s.model, Limits.from_settings(s), s.device)
    encoder = Encoder.load(s.model, s.device, s.dtype, Limits.from_settings(s))
    log.info("warm-up pass on %s took %.2f s", s.device, encoder.warm_up())
    return encoder


@dataclass
class Counters:
    """Running totals for the status heartbeat (Prometheus has its own)."""

    jobs: int = 0
    texts: int = 0
    tokens: int = 0
    errors: int = 0
    busy_s: float = 0.0
    recent: list[tuple[float, int, int]] = field(default_factory=list)  # (time, texts, tokens)

    def rate(self, window_s: float = 60.0) -> dict[str, float]:
        """Texts/s and tokens/s over the last ``window_s``."""
        now = time.monotonic()
        self.recent = [r for r in self.recent if now - r[0] <= window_s]
        span = max(1.0, min(window_s, now - self.recent[0][0])) if self.recent else window_s
        return {"texts_per_s": sum(r[1] for r in self.recent) / span,
                "tokens_per_s": sum(r[2] for r in self.recent) / span}


class Runtime:
    """Everything one worker process owns."""

    def __init__(self, settings: Settings, encoder: Encoder, hostname: str | None = None, reclaimer=None) -> None:
        from worker import metrics

        self.settings = settings
        self.encoder = encoder
        self.hostname = hostname or f"m3q@{socket.gethostname()}:{os.getpid()}"
        self.counters = Counters()
        self.metrics = metrics.Metrics(settings.metrics_port)
        self.engine = Engine.from_settings(encoder, settings, self._on_step)
        self.crash_hook = testing.crash_hook()  # None unless M3Q_TESTING=1 arms it: read once, here
        self._milvus = None
        self._redis = None
        self.held: Callable[[], dict[str, list[str]]] = dict  # jobs held now (set by worker.reclaim.HeldJobs)
        self.query_stream: Callable[[], dict] = dict  # its figures (set by worker.query_stream.QueryStreamStep)
        self.reclaimer = reclaimer  # a worker.reclaim.Reclaimer: jobs of dead workers go back at each heartbeat
        self._stop = threading.Event()
        self._heartbeat = threads.thread(self._beat, threads.HEARTBEAT)

    def start(self) -> None:
        """Start the heartbeat (the device loop runs already)."""
        self._heartbeat.start()
        info = self.encoder.info()
        log.info("m3q worker %s ready: device=%s model=%s dtype=%s dims=%s%s", self.hostname, info["device"],
                 info["model"], info["dtype"], info["dims"], " (RANDOM-WEIGHT REPLICA)" if info["replica"] else "")

    def stop(self) -> None:
        """Drain the device loop and stop the heartbeat."""
        self._stop.set()
        self.engine.stop()
        self._forget()

    def milvus(self):
        """A Milvus client, created on first use and reused."""
        if self._milvus is None:
            from producer.contract import milvus

            self._milvus = milvus.connect(self.settings)
        return self._milvus

    def reset_milvus(self) -> None:
        """Drop the Milvus client after a failure, so the next try reconnects."""
        self._milvus = None

    def redis(self):
        """A Redis client on the broker, created on first use and shared by all threads (it reconnects itself)."""
        if self._redis is None:
            from producer.contract.redis_conn import redis_client

            self._redis = redis_client(self.settings)
        return self._redis

    def _on_step(self, step: StepStats) -> None:
        c = self.counters
        c.texts += step.texts
        c.tokens += step.tokens
        c.busy_s += step.seconds
        c.recent.append((time.monotonic(), step.texts, step.tokens))
        self.metrics.step(step)

    # ---- status heartbeat in Redis (read by `m3q status`) ----------------------------------------------

    def status(self) -> wire.Heartbeat:
        """This worker as `m3q status` shows it."""
        return {**self.encoder.info(), "hostname": self.hostname, "pid": os.getpid(), "jobs": self.counters.jobs,
                "texts": self.counters.texts, "tokens": self.counters.tokens, "errors": self.counters.errors,
                **self.counters.rate(), "pending": self.engine.pending(), "held": [], "held_jobs": [], **self.held(),
                "unheld": self.reclaimer.unheld if self.reclaimer else {}, "query_stream": self.query_stream(),
                "time": time.time()}

    def _key(self) -> str:
        return wire.heartbeat_key(self.settings, self.hostname)

    def beat(self) -> None:
        """Write the heartbeat now (also done every M3Q heartbeat interval by the beat thread)."""
        try:
            self.redis().set(self._key(), json.dumps(self.status()),
                             px=int(wire.heartbeat_ttl_s(self.settings) * 1000))
        except Exception as e:  # noqa: BLE001 - Redis may be restarting; the next beat retries
            log.debug("heartbeat failed: %s", e)

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._sweep()  # first: the heartbeat then carries what the sweep found (`m3q status` counts it)
            self.beat()
            self._stop.wait(wire.heartbeat_s(self.settings))

    def _sweep(self) -> None:
        if self.reclaimer is None or self._stop.is_set():
            return
        try:
            self.reclaimer.sweep(self.redis(), also_held=self.held().get("held", ()))
        except Exception as e:  # noqa: BLE001 - Redis may be restarting; the next beat sweeps again
            log.warning("sweep for jobs of dead workers failed: %s", brief(e))
            self.reclaimer.close()

    def _forget(self) -> None:
        try:
            self.redis().delete(self._key())
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


_current: Runtime | None = None


def install(runtime: Runtime) -> Runtime:
    """Make ``runtime`` the process's runtime."""
    global _current
    _current = runtime
    return runtime


def current() -> Runtime:
    """The process's runtime; a task before start-up is a bug."""
    if _current is None:
        raise RuntimeError("the m3q worker runtime is not started (the model loads in the worker_init hook)")
    return _current
