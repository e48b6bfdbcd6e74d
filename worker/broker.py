"""The worker's Redis transport: kombu's own, except for what a channel does once its connection is closed.

When Redis goes away, Celery closes the broker connection and opens a new one; the jobs running meanwhile
finish later and acknowledge on the channel they came on, which belongs to the closed connection. kombu's
Redis channel then builds a connection pool from the closed connection's parameters, which are gone, and
raises ``AttributeError`` (seen as "'NoneType' object has no attribute 'hostname'"). Celery counts that as
a bug, not a connection error, and stops the whole worker ("Unrecoverable error").

Here the channel raises a Redis ``ConnectionError`` instead, which both Celery and kombu handle: the
acknowledgement is logged as lost ("Couldn't ack") and the job comes back as any unacknowledged job does
(kombu's restore when the channel closed, the visibility timeout, or the dead-worker sweep), so it runs at
least once, as README's Guarantees say, and the worker goes on.
"""
from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis

TRANSPORT = f"{__name__}:Transport"


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError(
                "this channel's broker connection is closed (Redis went away and the worker reconnected); "
                "a job acknowledged on it is delivered again")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """This transport for a redis:// or rediss:// broker; None (kombu's choice) for any other URL."""
    return TRANSPORT if broker_url.startswith(("redis://", "rediss://")) else None
