"""A Redis lease: the right to do something, held by one process at a time, that lapses when its holder dies.

    lease = Lease(redis_client, "prefix:thing:lock", ttl_s=30.0)
    with lease:                       # LeaseBusy at once when another owner holds it
        for step in work:
            if lease.lost_reason():   # expired or taken: someone else may hold it now
                break
            step()

The lease is one key set with NX and a TTL, whose value is its owner's token (host:pid:random, so a busy
error can name the holder). A daemon thread renews it every third of its TTL, and only while the key
still holds this token; release deletes it on the same condition, since once it has expired it may be
another owner's. A holder that dies stops renewing, so its lease expires at most ``ttl_s`` later.

This module knows only keys and tokens; what a lease guards, and what to tell a user who is refused,
is the caller's business.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import TypeVar

import redis

from producer.contract.errors import LeaseBusy

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
"""Extend the lease only while it is still ours."""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""
"""Delete the lease only while it is still ours: once expired, it may be another owner's."""

_L = TypeVar("_L", bound="Lease")


class Lease:
    """A Redis key held with NX and a TTL, renewed by a daemon heartbeat thread and deleted only by its
    owner. Re-entrant within the owning process: each ``acquire`` needs a ``release``, and the last
    release frees the key, so a caller may take it early and hand it on to code that holds it again."""

    def __init__(self, r: redis.Redis, key: str, ttl_s: float, *, thread_name: str | None = None) -> None:
        self.redis, self.key, self.ttl_s = r, key, ttl_s
        self.token = f"{socket.gethostname()}:pid{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._thread_name = thread_name or f"m3q-lease-{key}"
        self._holds = 0
        self._stop = threading.Event()
        self._lost: str | None = None
        self._renewed_at = 0.0

    def acquire(self: _L) -> _L:
        """Take the lease, or hold it once more; raise LeaseBusy at once when another owner holds it."""
        if self._holds == 0:
            self._take()
            self._stop, self._lost = threading.Event(), None
            threading.Thread(target=self._beat, args=(self._stop,), name=self._thread_name, daemon=True).start()
        self._holds += 1
        return self

    def release(self) -> None:
        """Leave the lease; the last holder stops the heartbeat and deletes the key if it is still ours."""
        self._holds -= 1
        if self._holds == 0:
            self._stop.set()
            self.redis.register_script(_RELEASE)(keys=[self.key], args=[self.token])

    def __enter__(self: _L) -> _L:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def lost_reason(self) -> str | None:
        """Why the lease may no longer be ours, or None while it is. Without a renewal for a whole TTL the
        key has expired on the server even if Redis could not say so (a pause, a network cut)."""
        if self._lost is None and time.monotonic() - self._renewed_at > self.ttl_s:
            return f"not renewed for {self.ttl_s:g} s"
        return self._lost

    def _take(self) -> None:
        while True:
            asked = time.monotonic()  # the TTL runs from the request: this side's deadline is never late
            if self.redis.set(self.key, self.token, nx=True, px=int(self.ttl_s * 1000)):
                self._renewed_at = asked
                return
            holder = self.redis.get(self.key)
            if holder is not None:  # else it expired between the two calls: try again
                raise LeaseBusy(self.key, holder.decode(), max(self.redis.pttl(self.key), 0) / 1000)

    def _beat(self, stop: threading.Event) -> None:
        """Renew the lease every third of its TTL until released; note it lost when it is no longer ours."""
        renew = self.redis.register_script(_RENEW)
        while not stop.wait(self.ttl_s / 3):
            asked = time.monotonic()
            try:
                if renew(keys=[self.key], args=[self.token, int(self.ttl_s * 1000)]):
                    self._renewed_at = asked
                    continue
                holder = self.redis.get(self.key)
            except redis.RedisError:
                continue  # lost_reason() gives up once a whole TTL passed without a renewal
            self._lost = f"taken by {holder.decode()}" if holder else "its key expired or was deleted"
            return
