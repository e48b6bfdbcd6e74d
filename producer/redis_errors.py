"""Redis errors, as a producer sorts them: unreachable for now (wait and retry), or refused (report at once).

A Redis that restarts is unreachable for a few seconds: sends retry with :class:`Backoff` up to
``M3Q_JOB_TIMEOUT_S``. A wrong password or an untrusted certificate is no outage: :func:`check_redis` reports
it on a client's first job, naming the setting, where Celery would retry it as a lost connection.
"""
from __future__ import annotations

import logging
import ssl
import time
from typing import Any, Callable, Iterator

import redis
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.contract import wire
from producer.contract.errors import BrokerError
from producer.contract.settings import Settings

log = logging.getLogger(__name__)

RETRY_MAX_DELAY_S = 5.0
"""Longest pause between two tries to reach Redis while it is down (the delay doubles from 0.2 s)."""


class Backoff:
    """The pauses between tries to send while Redis is unreachable: 0.2 s, doubling up to
    :data:`RETRY_MAX_DELAY_S`, until ``M3Q_JOB_TIMEOUT_S`` has passed."""

    def __init__(self, s: Settings, what: str) -> None:
        self.settings = s
        self.what = what
        self.deadline = time.monotonic() + s.job_timeout_s
        self.delay_s = 0.2

    def after(self, e: BaseException) -> float:
        """How long to wait before the next try after ``e``; ``e`` raised when Redis refused us, BrokerError
        once the deadline would pass."""
        if not unreachable(e):
            raise e
        if time.monotonic() + self.delay_s >= self.deadline:
            raise BrokerError(f"cannot send {self.what}: Redis at {maybe_sanitize_url(self.settings.broker_url)} "
                              f"unreachable for {self.settings.job_timeout_s:.0f}s (M3Q_JOB_TIMEOUT_S): {e}") from e
        log.warning("sending %s: Redis unreachable (%s); retrying in %.1fs", self.what, e, self.delay_s)
        delay_s, self.delay_s = self.delay_s, min(2 * self.delay_s, RETRY_MAX_DELAY_S)
        return delay_s


def retrying(s: Settings, what: str, send: Callable[[], Any]) -> Any:
    """``send()``, tried again with :class:`Backoff` while Redis is unreachable."""
    backoff = Backoff(s, what)
    while True:
        try:
            return send()
        except Exception as e:  # noqa: BLE001 - sorted by Backoff: unreachable is retried, the rest raised
            time.sleep(backoff.after(e))


def check_broker(settings: Settings) -> None:
    """Raise :class:`BrokerError` at once, naming the setting (password masked), when Redis cannot be reached
    or refuses us: the CLI's first step. (A client instead retries an unreachable Redis, which may be
    restarting, up to ``M3Q_JOB_TIMEOUT_S``.)"""
    for url, name in redis_urls(settings):
        reason = ping(settings, url, name)
        if reason is not None:
            raise BrokerError(f"cannot reach Redis at {maybe_sanitize_url(url)} ({name}): {reason}; "
                              f"is Redis running, and is {name} right?")


def check_redis(settings: Settings) -> bool:
    """Whether every Redis of ``settings`` answered; BrokerError if one refused us. Unreachable is not judged
    here: down for now, a send retries."""
    return all([ping(settings, url, name) is None for url, name in redis_urls(settings)])


def redis_urls(s: Settings) -> list[tuple[str, str]]:
    """(url, setting) of the broker and the result backend, the Redis ones only, each once."""
    urls = {s.broker_url: "M3Q_BROKER_URL"}
    urls.setdefault(s.backend_url, "M3Q_RESULT_BACKEND")
    return [(url, name) for url, name in urls.items() if url.startswith(("redis://", "rediss://"))]


def ping(s: Settings, url: str, name: str) -> str | None:
    """None if Redis at ``url`` answered, why not if it cannot be reached now; BrokerError if it refused us."""
    client = wire.redis_client(s.replace(broker_url=url))
    try:
        client.ping()
        return None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if unreachable(e):
            return str(e).rstrip(".")
        hint = "; check M3Q_REDIS_TLS_CA_FILE" if tls_failure(e) else "; check the password in the URL"
        raise BrokerError(f"Redis at {maybe_sanitize_url(url)} ({name}) refused the producer: {e}{hint}") from None
    finally:
        client.close()


def causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions that caused it, each once."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def tls_failure(e: BaseException) -> bool:
    """Whether ``e`` is a TLS handshake that failed (an untrusted certificate)."""
    return any(isinstance(c, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(c) for c in causes(e))


def listener_gave_up(e: BaseException) -> bool:
    """Celery's result listener stopped reconnecting after a long Redis outage (it never tries again)."""
    return isinstance(e, RuntimeError) and "Retry limit exceeded while trying to reconnect" in str(e)


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` says Redis cannot be reached right now (retry), not that it refused us (report)."""
    chain = list(causes(e))
    if any(isinstance(c, (redis.AuthenticationError, redis.exceptions.AuthorizationError,
                          redis.exceptions.ResponseError)) for c in chain) or tls_failure(e):
        return False
    return any(isinstance(c, (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)) for c in chain)
