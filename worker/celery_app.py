"""The worker's Celery app: ``celery -A worker.celery_app worker`` works, and so does ``m3q worker``.

Settings come from ``M3Q_*`` variables when the app is built. The model is loaded in ``worker_init``, before
the worker takes its first job; the pool is threads (safe with CUDA: nothing forks after the model loads),
and all threads share one device loop.
"""
from __future__ import annotations

import logging
import os

from celery import Celery, signals

from producer.contract import wire
from producer.contract.redis_check import check_broker
from producer.contract.settings import Settings
from worker import celery_internals, runtime
from worker.query_stream import QueryStreamStep
from worker.reclaim import HeldJobs, Reclaimer
from worker.tasks import register, summary

log = logging.getLogger(__name__)


def worker_queues(s: Settings) -> list[str]:
    """Queues of Celery's own consumer: documents, this device's queue, and the query queue, where Celery
    callers (``send_task("m3q.encode_queries")``) send queries as ordinary tasks. The producer client sends
    queries on the query stream instead (:mod:`worker.query_stream`), where they never wait behind documents."""
    return [wire.query_queue(s), wire.document_queue(s), wire.device_queue(s, s.device)]


def make_app(s: Settings) -> Celery:
    """A worker app: the shared wire config plus the worker's pool and queues."""
    app = wire.make_celery(s, name="m3q-worker")
    app.conf.update(
        worker_pool="threads",
        worker_concurrency=s.worker_threads,
        task_queues=[wire.kombu_queue(q) for q in worker_queues(s)],
    )
    if transport := celery_internals.transport_for(s.broker_url):
        app.conf.broker_transport = transport  # acknowledgements after a reconnect (worker.celery_internals)
    # A demoted primary is a lost connection to the broker and the result backend (worker.celery_internals)
    app.conf.result_backend = celery_internals.backend_for(s.backend_url)
    register(app)
    celery_internals.short_success_lines(summary)  # one short line per job at INFO, not its 64 ids
    app.steps["consumer"].add(HeldJobs)
    app.steps["consumer"].add(QueryStreamStep)
    app.m3q_settings = s  # type: ignore[attr-defined]
    return app


@signals.worker_init.connect
def _check_versions(**_: object) -> None:
    celery_internals.check_versions()  # a warning only: the worker starts whatever the versions


@signals.worker_init.connect
def _load_model(sender=None, **_: object) -> None:
    # Load before consuming, so the first job never waits for the model, and a bad model stops the worker.
    if runtime._current is not None:
        return
    s: Settings = getattr(sender.app, "m3q_settings", None) or Settings.from_env()
    try:
        check_broker(s)  # before the model: a broker or result backend it cannot use ends it in one line
        rt = runtime.Runtime(s, runtime.load_encoder(s), hostname=getattr(sender, "hostname", None),
                             reclaimer=Reclaimer(sender.app, s))
    except Exception as e:  # noqa: BLE001 - any load failure ends the worker with the reason
        log.error("m3q worker cannot start: %s", e)
        os._exit(3)
    runtime.install(rt).start()


@signals.worker_shutdown.connect
def _stop(**_: object) -> None:
    if runtime._current is not None:
        runtime._current.stop()


def __getattr__(name: str) -> Celery:
    # ``app`` for ``celery -A worker.celery_app``, built on first use rather than at import: `m3q worker`
    # imports this module and builds its own app, and a second app registers every task twice.
    if name != "app":
        raise AttributeError(name)
    globals()["app"] = built = make_app(Settings.from_env())
    return built
