"""Redis errors, as a producer sorts them: unreachable for now (wait and retry), or refused (report at once).

A Redis that restarts is unreachable for a few seconds: sends retry with :class:`Backoff` up to
``M3Q_JOB_TIMEOUT_S``. A wrong password or an untrusted certificate is no outage: :func:`check_redis` reports
it on a client's first job, naming the setting, where Celery would retry it as a lost connection.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from kombu.utils.url import maybe_sanitize_url

from producer.contract.errors import BrokerError
from producer.contract.redis_check import (  # noqa: F401 - re-exported: the producer's names for them
    causes,
    check_broker,
    check_redis,
    ping,
    redis_urls,
    tls_failure,
    unreachable,
)
from producer.contract.redis_conn import brief
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
        log.warning("sending %s: Redis unreachable (%s); retrying in %.1fs", self.what, brief(e), self.delay_s)
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


def listener_gave_up(e: BaseException) -> bool:
    """Celery's result listener stopped reconnecting after a long Redis outage (it never tries again)."""
    return isinstance(e, RuntimeError) and "Retry limit exceeded while trying to reconnect" in str(e)

