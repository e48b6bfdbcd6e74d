"""Every private part of kombu and Celery that m3-queue touches, and the only module that touches them.

Each entry below was checked in the sources of kombu 5.2.4 to 5.7.0 and Celery 5.3.0 to 5.7.0 (the releases
that have it unchanged are named); CI runs kombu 5.7.0 and Celery 5.7.0. The tested range is
:data:`TESTED_KOMBU` and :data:`TESTED_CELERY` (pyproject.toml bounds both to it), and a worker that starts
with versions outside it logs a warning naming them (:func:`check_versions`) and goes on.

kombu's Redis transport (``kombu.transport.redis``):

- ``Channel._connparams(asynchronous)``: the parameters a channel builds its connection pool from, read
  off its connection. :class:`Channel` (and :class:`SentinelChannel`, the same for ``sentinel://`` brokers)
  overrides it so that a channel whose connection was closed (Redis
  went away, Celery reconnected) raises a Redis ``ConnectionError``, which Celery and kombu handle (the
  acknowledgement is logged as lost, the job comes back), instead of kombu's ``AttributeError``
  ("'NoneType' object has no attribute 'hostname'"), which Celery takes for a bug and stops the worker on.
  kombu 5.2.4 to 5.7.0.
- ``Channel.connection_class`` and ``Channel.connection_class_ssl`` (``SentinelChannel``'s too): the redis-py
  connection classes ``_connparams`` gives a channel's pool. :class:`Channel` and :class:`SentinelChannel`
  set m3-queue's (:func:`producer.contract.redis_conn.connection_class`), on which a demoted primary's
  READONLY or UNBLOCKED is a lost connection: Celery reconnects instead of stopping the worker on a
  ``ResponseError``. Checked in kombu 5.7.0.
- ``QoS._delivered`` and ``QoS._dirty`` (from ``kombu.transport.virtual.base.QoS``): delivery tag -> message,
  the messages a channel was delivered, and the set of those acknowledged since. An acknowledged tag only
  goes into ``_dirty``; it leaves ``_delivered`` at the channel's next delivery, so an idle worker keeps its
  last jobs there. :func:`delivered` reads the first less the second for the heartbeat's list of held jobs.
  kombu 5.2.4 to 5.7.0.
- ``QoS.restore_by_tag(tag)``: puts one unacknowledged message back on its queue, in a transaction on the
  ``unacked`` hash (so two workers restoring the same tag push it once); :func:`restore`. kombu 5.2.4 to
  5.7.0.
- the Redis keys ``unacked`` (hash: delivery tag -> JSON ``[message, exchange, routing key]``) and
  ``unacked_index`` (sorted set: delivery tag scored by its delivery time, epoch seconds), the transport's
  defaults for ``unacked_key`` and ``unacked_index_key`` (the project sets neither), one pair per Redis
  database; :func:`taken_before` and :func:`routing_keys` read them for the dead-worker sweep. kombu 5.2.4
  to 5.7.0.

The contract sets kombu's ``unacked_restore_throttle`` transport option (``producer.contract.wire``), which
kombu reads from 5.7.0 on and earlier releases ignore: that, and Celery 5.7's own ``kombu>=5.7``, is why the
tested range starts at 5.7.

Celery's worker:

- ``celery.worker.state.should_stop`` and ``should_terminate``: set by Celery's signal handlers at a warm
  and a cold shutdown (``None`` or ``False`` until then); :func:`shutdown_requested`,
  :func:`cold_shutdown_requested`. Celery 5.3.0 to 5.7.0.
- ``Consumer.controller.blueprint.state``: whether the worker's blueprint still runs (a consumer restarting
  after a broker error runs on; a worker that shuts down does not); :func:`worker_stopping`. Celery 5.3.0 to
  5.7.0.
- ``Consumer.task_consumer``: the kombu consumer of Celery's own queues, set by the consumer's
  ``celery.worker.consumer.tasks:Tasks`` step (which ``worker.reclaim.HeldJobs`` requires); its channel's
  QoS is read above (:func:`task_channel`). Celery 5.3.0 to 5.7.0.
- ``celery.app.trace.LOG_SUCCESS``: the format of the line the ``celery.app.trace`` logger writes at INFO for
  each job that succeeded, with a dict of ``name``, ``id``, ``runtime`` and ``return_value`` (the result's
  repr) as its argument; :func:`short_success_lines` puts a summary in place of the result. Celery 5.3.0 to
  5.7.0.
- ``RedisBackend._get_pool(**params)`` and ``SentinelBackend._get_pool(**params)``
  (``celery.backends.redis``): where the result backend builds its connection pool from the parameters it
  read off its URL. :class:`RedisBackend` and :class:`SentinelBackend` put m3-queue's connection classes in
  them (as for the broker), so a result stored on a demoted primary is retried
  (``result_backend_always_retry``) until a primary takes it. The worker names them in ``result_backend``
  with Celery's ``CLASS+URL`` form (:func:`backend_for`). Checked in Celery 5.7.0.
- ``app.amqp.queues.consume_from``: the queues a worker consumes (``task_queues``, or ``-Q``);
  :func:`consumed_queues`. Celery 5.3.0 to 5.7.0.
"""
from __future__ import annotations

import json
import logging
from importlib import metadata
from typing import Any, Callable

import redis
from celery import bootsteps, signals
from celery.app import trace
from celery.backends import redis as celery_redis
from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis

from producer.contract import redis_conn

log = logging.getLogger(__name__)

TESTED_CELERY = ">=5.7,<5.8"
"""Celery releases the worker was tested with (pyproject.toml requires the same)."""
TESTED_KOMBU = ">=5.7,<5.8"
"""kombu releases the worker was tested with (pyproject.toml requires the same)."""

UNACKED_KEY = "unacked"
"""kombu's hash of delivered, unacknowledged messages: delivery tag -> JSON [message, exchange, routing key]."""
UNACKED_INDEX_KEY = "unacked_index"
"""kombu's sorted set of the same delivery tags, scored by delivery time (epoch seconds)."""

TRANSPORT = f"{__name__}:Transport"
"""The worker's Redis transport, as Celery's ``broker_transport`` names it."""


# ---- versions ------------------------------------------------------------------------------------------

def untested_versions(celery: str, kombu: str) -> str | None:
    """A warning naming both versions and the tested range when either is outside it; None when both are in."""
    from packaging.specifiers import SpecifierSet

    if SpecifierSet(TESTED_CELERY).contains(celery, prereleases=True) and \
            SpecifierSet(TESTED_KOMBU).contains(kombu, prereleases=True):
        return None
    return (f"celery {celery} and kombu {kombu} are installed; this worker is tested with celery {TESTED_CELERY} "
            f"and kombu {TESTED_KOMBU}. It relies on private parts of both (listed in {__name__}), which may "
            f"differ in these versions: the broker transport, the dead-worker sweep and the shutdown check may "
            f"misbehave")


def check_versions(celery: str | None = None, kombu: str | None = None) -> str | None:
    """Log a warning when Celery or kombu (the installed ones unless given) is outside the tested range, and
    return it; the worker starts all the same."""
    warning = untested_versions(celery or metadata.version("celery"), kombu or metadata.version("kombu"))
    if warning:
        log.warning(warning)
    return warning


# ---- the broker transport ------------------------------------------------------------------------------

class _ClosedConnection:
    """kombu's Redis channel, except once its connection is closed (see the module's docstring)."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError(
                "this channel's broker connection is closed (Redis went away and the worker reconnected); "
                "a job acknowledged on it is delivered again")
        return super()._connparams(asynchronous)


class Channel(_ClosedConnection, kombu_redis.Channel):
    """kombu's Redis channel with :class:`_ClosedConnection`, on m3-queue's connections (a demoted primary is
    a lost connection: :func:`producer.contract.redis_conn.connection_class`)."""

    connection_class = redis_conn.connection_class(sentinel=False, tls=False)
    connection_class_ssl = redis_conn.connection_class(sentinel=False, tls=True)


class SentinelChannel(_ClosedConnection, kombu_redis.SentinelChannel):
    """kombu's Redis Sentinel channel (a primary found through the Sentinels) with :class:`_ClosedConnection`,
    on m3-queue's connections, as :class:`Channel`."""

    connection_class = redis_conn.connection_class(sentinel=True, tls=False)
    connection_class_ssl = redis_conn.connection_class(sentinel=True, tls=True)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with :class:`SentinelChannel`."""

    Channel = SentinelChannel


def transport_for(broker_url: str) -> str | None:
    """The worker's transport for a redis://, rediss:// or sentinel:// broker; None (kombu's choice) for any
    other URL."""
    if broker_url.startswith("sentinel://"):
        return f"{__name__}:SentinelTransport"
    return TRANSPORT if broker_url.startswith(("redis://", "rediss://")) else None


# ---- the result backend --------------------------------------------------------------------------------

def _demotable(params: dict[str, Any], sentinel: bool) -> dict[str, Any]:
    """A backend's pool parameters on m3-queue's connections (a demoted primary is a lost connection, which
    ``result_backend_always_retry`` retries), TLS or not as they were; a Unix socket's as they are."""
    kind = params.get("connection_class") or redis.Connection
    if issubclass(kind, redis.UnixDomainSocketConnection):
        return params
    return {**params, "connection_class": redis_conn.connection_class(sentinel=sentinel,
                                                                      tls=issubclass(kind, redis.SSLConnection))}


class RedisBackend(celery_redis.RedisBackend):
    """Celery's Redis result backend on m3-queue's connections."""

    def _get_pool(self, **params: Any) -> Any:
        return super()._get_pool(**_demotable(params, sentinel=False))


class SentinelBackend(celery_redis.SentinelBackend):
    """Celery's Redis Sentinel result backend on m3-queue's connections."""

    def _get_pool(self, **params: Any) -> Any:
        return super()._get_pool(**_demotable(params, sentinel=True))


def backend_for(backend_url: str) -> str:
    """The worker's ``result_backend`` for a redis://, rediss:// or sentinel:// URL (Celery's ``CLASS+URL``
    form); any other URL as it is."""
    if backend_url.startswith("sentinel://"):
        return f"{__name__}:SentinelBackend+{backend_url}"
    if backend_url.startswith(("redis://", "rediss://")):
        return f"{__name__}:RedisBackend+{backend_url}"
    return backend_url


# ---- unacknowledged messages ---------------------------------------------------------------------------

def task_channel(consumer) -> Any | None:
    """The channel of Celery's own task consumer (None before the consumer's Tasks step has started)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    return None if task_consumer is None else task_consumer.channel


def delivered(channel) -> list[tuple[Any, Any]]:
    """(delivery tag, message) of each message ``channel`` holds unacknowledged."""
    qos = channel.qos
    acked = set(_snapshot(lambda: list(qos._dirty)))  # first: a tag acked in between is listed, never lost
    return [(tag, message) for tag, message in _snapshot(lambda: list(qos._delivered.items())) if tag not in acked]


def _snapshot(read: Callable[[], list]) -> list:
    # Written by the consumer thread while the heartbeat thread reads: retry a copy that raced a change.
    for _ in range(10):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


def restore(channel, tag: str) -> None:
    """Put the unacknowledged message ``tag`` back on its queue (a no-op when it was restored or acked already)."""
    channel.qos.restore_by_tag(tag)


def taken_before(r: redis.Redis, ceiling: float) -> dict[str, float]:
    """Delivery tag -> delivery time (epoch s) of every message delivered before ``ceiling`` and still
    unacknowledged, on the database of ``r`` (all apps sharing it)."""
    pairs = r.zrangebyscore(UNACKED_INDEX_KEY, "-inf", ceiling, withscores=True)
    return {(tag.decode() if isinstance(tag, bytes) else str(tag)): float(at) for tag, at in pairs}


def routing_keys(r: redis.Redis, tags: list[str]) -> dict[str, str]:
    """The routing key of each unacknowledged message in ``tags`` (one acknowledged meanwhile is left out)."""
    if not tags:
        return {}
    return {tag: json.loads(raw)[2] for tag, raw in zip(tags, r.hmget(UNACKED_KEY, tags)) if raw}


# ---- Celery's worker -----------------------------------------------------------------------------------

def shutdown_requested() -> bool:
    """Whether Celery was told to stop (a warm or cold shutdown), from the moment of the signal."""
    return _set(worker_state.should_stop) or _set(worker_state.should_terminate)


def cold_shutdown_requested() -> bool:
    """Whether Celery was told to stop at once (a cold shutdown), rather than to finish its jobs first."""
    return _set(worker_state.should_terminate)


def worker_stopping(consumer) -> bool:
    """Whether the worker shuts down, rather than its consumer restarting after a broker error."""
    if shutdown_requested():
        return True
    blueprint = getattr(getattr(consumer, "controller", None), "blueprint", None)
    return blueprint is None or blueprint.state != bootsteps.RUN


def _set(flag: object) -> bool:
    # As Celery's own check reads them: an exit code (0 included) or True is set; None and False are not.
    return flag is not None and flag is not False


def consumed_queues(app) -> list[str]:
    """The queues Celery's consumer reads in this worker (``task_queues``, or ``-Q``), sorted."""
    return sorted(app.amqp.queues.consume_from or ())


# ---- Celery's line for each job that succeeded ---------------------------------------------------------

SUCCESS_LINE = "Task %(name)s[%(id)s] succeeded in %(runtime).3fs: %(summary)s"
"""The worker's INFO line for a job that succeeded: Celery's, with a summary in place of the whole result."""

_summaries: dict[str, str] = {}  # job id -> summary, from task_success (sent just before the line is logged)
SUMMARIES_MAX = 1000
"""Summaries kept for lines not logged yet: a bound, so lines that are never logged cannot pile them up."""


class _ShortSuccess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        if record.msg != trace.LOG_SUCCESS or not isinstance(context, dict):
            return True
        summary = _summaries.pop(str(context.get("id")), "done")
        log.debug("Task %s[%s] result: %s", context.get("name"), context.get("id"), context.get("return_value"))
        record.msg, record.args = SUCCESS_LINE, {**context, "summary": summary, "runtime": float(context["runtime"])}
        return True


def short_success_lines(summarize: Callable[[Any], str]) -> None:
    """Celery's INFO line for each job that succeeded says ``summarize(result)`` instead of the whole result
    (an index job's 64 ids); the whole result goes to this module's logger at DEBUG. Once per process."""
    trace_log = logging.getLogger(trace.logger.name)

    def remember(sender=None, result: Any = None, **_: object) -> None:
        if not trace_log.isEnabledFor(logging.INFO):
            return  # no success line is logged: nothing to summarize, nothing kept
        if len(_summaries) >= SUMMARIES_MAX:
            _summaries.pop(next(iter(_summaries)))
        _summaries[str(sender.request.id)] = summarize(result)

    signals.task_success.connect(remember, weak=False, dispatch_uid=f"{__name__}.short_success_lines")
    if not any(isinstance(f, _ShortSuccess) for f in trace_log.filters):
        trace_log.addFilter(_ShortSuccess())
