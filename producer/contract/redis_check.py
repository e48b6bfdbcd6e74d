"""Is Redis there, and does it let us in? One ping per Redis URL of the settings (the broker, the result backend),
and the sorting of what came back: unreachable for now (a restart: retry), or refused (a wrong password, an
untrusted certificate: report at once, naming the setting). Both sides use it: the CLI and a client before
their first job, a worker before it loads its model."""
from __future__ import annotations

import ssl
from typing import Iterator

import redis
from kombu.exceptions import OperationalError

from producer.contract.errors import BrokerError
from producer.contract.redis_conn import brief, describe, is_sentinel, lost_primary, redis_client
from producer.contract.settings import Settings


def check_broker(settings: Settings) -> None:
    """Raise :class:`BrokerError` at once, naming the setting (password masked), when Redis cannot be reached
    or refuses us: the CLI's first step. (A client instead retries an unreachable Redis, which may be
    restarting, up to ``M3Q_JOB_TIMEOUT_S``.)"""
    for url, name in redis_urls(settings):
        reason = ping(settings, url, name)
        if reason is not None:
            raise BrokerError(f"cannot reach Redis at {describe(url)} ({name}): {reason}; "
                              f"is Redis running, and is {name} right?{sentinel_hint(settings, url)}")


def check_redis(settings: Settings) -> bool:
    """Whether every Redis of ``settings`` answered; BrokerError if one refused us. Unreachable is not judged
    here: down for now, a send retries."""
    return all([ping(settings, url, name) is None for url, name in redis_urls(settings)])


def redis_urls(s: Settings) -> list[tuple[str, str]]:
    """(url, setting) of the broker and the result backend, the Redis ones only, each once."""
    urls = {s.broker_url: "M3Q_BROKER_URL"}
    urls.setdefault(s.backend_url, "M3Q_RESULT_BACKEND")
    return [(url, name) for url, name in urls.items() if url.startswith(("redis://", "rediss://", "sentinel://"))]


def ping(s: Settings, url: str, name: str) -> str | None:
    """None if Redis at ``url`` answered, why not if it cannot be reached now; BrokerError if it refused us."""
    client = redis_client(s, url)
    try:
        client.ping()
        return None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if unreachable(e):
            return brief(e).rstrip(".")
        hint = "; check M3Q_REDIS_TLS_CA_FILE" if tls_failure(e) else "; check the password in the URL"
        raise BrokerError(f"Redis at {describe(url)} ({name}) refused the producer: {e}{hint}") from None
    finally:
        client.close()


def sentinel_hint(s: Settings, url: str) -> str:
    """For a sentinel:// URL, the other settings that must agree with the Sentinels."""
    if not is_sentinel(url):
        return ""
    return (f" Do the Sentinels know the primary as M3Q_SENTINEL_MASTER={s.sentinel_master!r}, and is "
            f"M3Q_SENTINEL_PASSWORD their password?")


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


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` says Redis cannot be reached right now (retry), not that it refused us (report)."""
    chain = list(causes(e))
    if any(lost_primary(c) for c in chain):  # a failover under way: a primary again soon, by the same name
        return True
    if any(isinstance(c, (redis.AuthenticationError, redis.exceptions.AuthorizationError,
                          redis.exceptions.ResponseError)) for c in chain) or tls_failure(e):
        return False
    return any(isinstance(c, (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)) for c in chain)
