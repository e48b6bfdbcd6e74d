"""Every Redis client of m3-queue, built in one place from the settings, and the matching Celery options.

Two forms of Redis URL are accepted for ``M3Q_BROKER_URL`` and ``M3Q_RESULT_BACKEND``:

- ``redis://[:PASSWORD@]HOST[:PORT][/DB]``, or ``rediss://`` for TLS: one Redis, or a managed service's
  endpoint that stays the same name when the service fails over (ElastiCache, Memorystore, Azure Cache).
- ``sentinel://[:PASSWORD@]HOST:PORT;sentinel://HOST:PORT;...[/DB]``: Celery's form for Redis Sentinel. The
  Sentinels at these addresses name the primary of ``M3Q_SENTINEL_MASTER``; every connection asks them again
  once it has lost its primary, so a failover is a short outage like a restart. ``PASSWORD`` is the primary's
  (and its replicas'), ``M3Q_SENTINEL_PASSWORD`` the Sentinels' own; ``M3Q_SENTINEL_TLS`` reaches both over
  TLS. The database, user and password are read from the first address, as kombu and Celery read them.

The producers' and workers' own clients (the query stream, reply readers, heartbeats, the dead-worker sweep,
re-index checkpoints and leases, the gateway) come from :func:`redis_client` and :func:`async_redis`;
Celery's broker and result backend get the same addresses and options from :func:`celery_redis_config`.
"""
from __future__ import annotations

import asyncio
import math
import re
import ssl
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from redis import sentinel as sync_sentinel
from redis.asyncio import sentinel as async_sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer.contract.redis_urls import SentinelURL, is_sentinel, parse_sentinel
from producer.contract.settings import Settings

SENTINEL_TIMEOUT_S = 1.0
"""How long one Sentinel may take to answer before the next is asked (a dead one must not stall a failover)."""
RETRY_CAP_S = 2.0
"""Longest pause between two tries of a command of a retrying client (:func:`redis_client`'s ``retry_s``)."""
HELD_IDLE_S = 1.0
"""A :class:`Held` connection unused this long may have been closed by the server: if it was, its commands are
sent again at once on a new connection, not failed."""


# ---- m3-queue's own clients ------------------------------------------------------------------------------

def redis_client(s: Settings, url: str | None = None, retry_s: float = 0) -> redis.Redis:
    """A Redis client on ``url`` (default the broker): through its Sentinels for sentinel://, with TLS
    certificate checks for rediss://. ``retry_s``: each command is tried again on a lost connection for
    about this long (a restart, a failover), for callers that have no retry of their own; every command
    they send must be safe to repeat."""
    url = url or s.broker_url
    options = redis_options(s, url)
    if retry_s > 0:
        retries = int(retry_s / RETRY_CAP_S) + 5  # the first five pauses are shorter than the cap
        options.update(retry=Retry(ExponentialBackoff(cap=RETRY_CAP_S, base=0.2), retries),
                       retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    return _connect(s, url, options, redis.Redis, sync_sentinel.Sentinel)


def async_redis(s: Settings, url: str | None = None) -> aioredis.Redis:
    """The ``redis.asyncio`` twin of :func:`redis_client`."""
    url = url or s.broker_url
    return _connect(s, url, {**redis_options(s, url), **_no_maint_notifications()}, aioredis.Redis,
                    async_sentinel.Sentinel)


def _no_maint_notifications() -> dict[str, Any]:
    # redis-py (8.1 checked) tries Redis Cloud's maintenance notifications by default ("auto"), and while
    # they are on, its asyncio pool gives out a connection without checking that the server has not closed
    # it: a Redis that closes idle clients (``timeout``, as managed services may) then fails the first
    # command after a pause. They need RESP3, which m3-queue does not use. A redis-py without them has no
    # such setting.
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def _connect(s: Settings, url: str, options: dict[str, Any], redis_class: type, sentinel_class: type) -> Any:
    """A ``redis_class`` client on ``url``: directly, or on the primary the Sentinels name."""
    if not is_sentinel(url):
        if url.startswith(("redis://", "rediss://")):
            options["connection_class"] = connection_class(sentinel=False, tls=url.startswith("rediss://"),
                                                           asyncio=redis_class is aioredis.Redis)
        return redis_class.from_url(url, **options)
    where = parse_sentinel(url)
    manager = sentinel_class(list(where.nodes), sentinel_kwargs=sentinel_options(s), **options)
    asyncio_side = sentinel_class is async_sentinel.Sentinel
    connection = connection_class(sentinel=True, tls=bool(options.get("ssl")), asyncio=asyncio_side)
    return manager.master_for(s.sentinel_master, redis_class=redis_class, connection_class=connection,
                              **_primary(where))


def _primary(where: SentinelURL) -> dict[str, Any]:
    credentials = {"username": where.username, "password": where.password}
    return {"db": where.db, **{k: v for k, v in credentials.items() if v is not None}}


def redis_options(s: Settings, url: str | None = None) -> dict[str, Any]:
    """Connection options of every client on ``url`` (default the broker), primaries and replicas alike."""
    url = url or s.broker_url
    kwargs: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5, "health_check_interval": 30}
    if uses_tls(s, url):
        kwargs.update(tls_options(s))
        if is_sentinel(url):
            kwargs["ssl"] = True  # a rediss:// URL says so itself; a Sentinel's primary is reached by address
    return kwargs


def sentinel_options(s: Settings) -> dict[str, Any]:
    """Connection options of the Sentinels themselves: their own password and TLS, and short timeouts."""
    kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
    if s.sentinel_password:
        kwargs["password"] = s.sentinel_password
    if s.sentinel_tls:
        kwargs.update(tls_options(s), ssl=True)
    return kwargs


def uses_tls(s: Settings, url: str) -> bool:
    """Whether connections to ``url`` use TLS: rediss://, or sentinel:// with ``M3Q_SENTINEL_TLS``."""
    return url.startswith("rediss://") or (is_sentinel(url) and s.sentinel_tls)


def tls_options(s: Settings) -> dict[str, Any]:
    """The TLS options of every Redis connection that uses TLS (:func:`uses_tls`), from the
    ``M3Q_REDIS_TLS_*`` settings: the server's certificate is always checked, against
    ``M3Q_REDIS_TLS_CA_FILE`` when set (else the system's CAs). In the form redis-py's clients take as keyword
    arguments, which Celery's ``broker_use_ssl`` and ``redis_backend_use_ssl`` take as they are."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if s.redis_tls_ca_file:
        options["ssl_ca_certs"] = s.redis_tls_ca_file
    return options


# ---- many commands in one write, on a connection held by one thread ----------------------------------------

class _HeldBase:
    """What :class:`Held` and :class:`AsyncHeld` share: the connection, when it was last used."""

    def __init__(self, r: redis.Redis | aioredis.Redis) -> None:
        self._pool = r.connection_pool
        self._connection: Any = None
        self._used = 0.0

    def _idle(self) -> bool:
        """Whether the connection went unused for :data:`HELD_IDLE_S` before this use (which it records)."""
        now = time.monotonic()
        idle, self._used = now - self._used > HELD_IDLE_S, now
        return idle


class Held(_HeldBase):
    """One of ``r``'s connections, held by the one thread that sends on it, which sends commands already packed
    (``hiredis.pack_command``s joined) as one write and reads their replies: a pipeline without redis-py's
    costs per command. A blocking read of a list cost 44 µs of CPU this way against 117 µs through
    ``Redis.blpop`` (docs/benchmarks). It reconnects as the pool's connections do (through the Sentinels where
    they are used). A connection that was unused for :data:`HELD_IDLE_S` and turns out lost is tried once more
    at once, on a new one: the server may close idle clients (a managed Redis's ``timeout``)."""

    def send(self, packed: bytes, replies: int, raise_errors: bool = True) -> list[Any]:
        """The replies to the commands in ``packed``. The first error reply is raised (the connection dropped,
        with what it had not read), or with ``raise_errors=False`` returned in its command's place, as a
        ``redis.ResponseError``. On any other error the connection is dropped. The commands must be safe to
        repeat."""
        if self._connection is None:
            self._connection = self._pool.get_connection()
        idle = self._idle()
        try:
            return self._send(packed, replies, raise_errors)
        except redis.ConnectionError:
            if not idle:
                raise
            return self._send(packed, replies, raise_errors)

    def _send(self, packed: bytes, replies: int, raise_errors: bool) -> list[Any]:
        try:
            self._connection.send_packed_command([packed])
            return [self._reply(raise_errors) for _ in range(replies)]
        except BaseException:
            self._connection.disconnect()
            raise

    def _reply(self, raise_errors: bool) -> Any:
        try:
            return self._connection.read_response()
        except redis.ResponseError as e:  # read whole: the next reply follows it on the connection
            if raise_errors:
                raise
            return e

    def release(self) -> None:
        if self._connection is not None:
            self._pool.release(self._connection)
            self._connection = None


class AsyncHeld(_HeldBase):
    """:class:`Held` for ``redis.asyncio``, used by one task at a time: one timeout (the socket's) for all the
    replies of a write, not one each."""

    async def send(self, packed: bytes, replies: int) -> list[Any]:
        if self._connection is None:
            self._connection = await self._pool.get_connection()
        idle = self._idle()
        try:
            return await self._send(packed, replies)
        except redis.ConnectionError:
            if not idle:
                raise
            return await self._send(packed, replies)

    async def _send(self, packed: bytes, replies: int) -> list[Any]:
        connection = self._connection
        try:
            await connection.send_packed_command(packed)
            try:
                return await asyncio.wait_for(_read_all(connection, replies), connection.socket_timeout)
            except asyncio.TimeoutError:  # a lost connection to every caller, as redis-py's own timeout is
                raise redis.TimeoutError("Timeout reading from Redis") from None
        except BaseException:
            await connection.disconnect()
            raise


async def _read_all(connection: Any, replies: int) -> list[Any]:
    # no timer per reply: AsyncHeld.send's covers them all
    return [await connection.read_response(timeout=math.inf) for _ in range(replies)]


# ---- connections that notice a lost primary ----------------------------------------------------------------
# A managed service (ElastiCache, Memorystore, Azure Cache) fails over by demoting the primary and pointing its
# endpoint's name at the promoted replica, and may leave connections open on the demoted server. That server
# answers each write with READONLY, and each command blocked at that moment (BRPOP, XREADGROUP) with
# UNBLOCKED. Both mean a lost primary, not a refusal: these connections drop themselves and raise
# ConnectionError, which every retry and resend of m3-queue, and Celery, handle by reconnecting through the
# name. (Sentinel closes the demoted server's client connections itself; its connections do the same all the
# same.)

def lost_primary(error: BaseException) -> bool:
    """Whether ``error`` is a demoted primary's answer (READONLY, or UNBLOCKED as it became a replica)."""
    text = str(error)
    return isinstance(error, redis.exceptions.ReadOnlyError) or (
        isinstance(error, redis.ResponseError) and text.startswith("UNBLOCKED") and "master -> replica" in text)


def _demoted(connection: Any, error: redis.ResponseError) -> redis.ConnectionError:
    return redis.ConnectionError(f"{error} (the server was demoted by a failover: reconnecting to "
                                 f"{connection.host}:{connection.port})")


class _Demotable:
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as e:
            if not lost_primary(e):
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise _demoted(self, e) from e


class _AsyncDemotable:
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as e:
            if not lost_primary(e):
                raise
            await self.disconnect()  # type: ignore[attr-defined]
            raise _demoted(self, e) from e


class _Primary(_Demotable, redis.Connection):
    pass


class _PrimarySSL(_Primary, redis.SSLConnection):
    pass


class _AsyncPrimary(_AsyncDemotable, aioredis.Connection):
    pass


class _AsyncPrimarySSL(_AsyncPrimary, aioredis.SSLConnection):
    pass


# A command that loses its connection is tried again on the same connection object, which redis-py reconnects
# at the address it last had (send_packed_command calls connect_check_health, not the Sentinel-aware
# connect). After a failover that address is the dead primary, so every try of the command fails. These
# connections ask the Sentinels for the primary each time they reconnect.

class _Rediscovering(_Demotable, sync_sentinel.SentinelManagedConnection):
    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()
        super().send_packed_command(command, check_health)


class _RediscoveringSSL(_Rediscovering, sync_sentinel.SentinelManagedSSLConnection):
    pass


class _AsyncRediscovering(_AsyncDemotable, async_sentinel.SentinelManagedConnection):
    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()
        await super().send_packed_command(command, check_health)


class _AsyncRediscoveringSSL(_AsyncRediscovering, async_sentinel.SentinelManagedSSLConnection):
    pass


_CLASSES: dict[tuple[bool, bool, bool], type] = {
    (False, False, False): _Primary, (False, False, True): _PrimarySSL,
    (False, True, False): _AsyncPrimary, (False, True, True): _AsyncPrimarySSL,
    (True, False, False): _Rediscovering, (True, False, True): _RediscoveringSSL,
    (True, True, False): _AsyncRediscovering, (True, True, True): _AsyncRediscoveringSSL}


def connection_class(*, sentinel: bool, tls: bool, asyncio: bool = False) -> type:
    """The redis-py connection class of every m3-queue pool (Celery's broker channels too): for a primary
    reached directly or through the Sentinels, over TLS or not, for ``redis.asyncio`` or not."""
    return _CLASSES[sentinel, asyncio, tls]


# ---- Celery's broker and result backend -----------------------------------------------------------------

def celery_redis_config(s: Settings, transport: dict[str, Any]) -> dict[str, Any]:
    """Celery settings that point its broker and result backend where :func:`redis_client` points: TLS
    options, and for Sentinel the master's name and the Sentinels' options. ``transport`` holds the
    transport options both share."""
    broker, backend = dict(transport), dict(transport)
    for options, url in ((broker, s.broker_url), (backend, s.backend_url)):
        if is_sentinel(url):
            options.update(master_name=s.sentinel_master, sentinel_kwargs=sentinel_options(s))
    config: dict[str, Any] = {"broker_transport_options": broker, "result_backend_transport_options": backend}
    if uses_tls(s, s.broker_url):
        config["broker_use_ssl"] = tls_options(s)
    if uses_tls(s, s.backend_url):
        config["redis_backend_use_ssl"] = tls_options(s)
    return config


def describe(url: str) -> str:
    """``url`` with its password masked, for messages."""
    from kombu.utils.url import maybe_sanitize_url

    return ";".join(maybe_sanitize_url(chunk) for chunk in url.split(";"))


def brief(e: BaseException) -> str:
    """What a Redis error says, in one short line. redis-py's "no master" error lists every Sentinel client it
    asked, some kilobytes: this keeps the kinds of error the Sentinels gave (a wrong password, say)."""
    if not isinstance(e, (sync_sentinel.MasterNotFoundError, async_sentinel.MasterNotFoundError)):
        return str(e)
    head = str(e).split(" : ")[0]
    kinds = list(dict.fromkeys(_SENTINEL_ERROR.findall(str(e))))
    if not kinds:
        return f"{head} (no Sentinel names a primary now: a failover under way, or a wrong M3Q_SENTINEL_MASTER)"
    hint = ": a wrong M3Q_SENTINEL_PASSWORD?" if "AuthenticationError" in kinds else ""
    return f"{head} (the Sentinels answered {', '.join(kinds)}{hint})"


_SENTINEL_ERROR = re.compile(r" - (?:\w+:)?(\w+Error)\b")
"""The kind of one Sentinel's error in redis-py's "no master" message (``... - auth:AuthenticationError``)."""
