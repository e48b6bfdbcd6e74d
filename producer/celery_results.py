"""Celery results awaited without a thread per await: one ``redis.asyncio`` pub/sub connection per event loop,
subscribed to each pending job's result key (:class:`AsyncResults`), for ``await handle`` of a Celery job
(:mod:`producer.celery_jobs`)."""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Callable

import redis

from producer.contract.redis_conn import async_redis, brief
from producer.contract.settings import Settings
from producer.replies import BLOCK_S, DRAIN, PerLoop, backoff

log = logging.getLogger(__name__)

SWEEP_S = 5.0
"""Pending Celery results are also read directly this often (a Redis restart drops subscriptions)."""


class AsyncResults(PerLoop):
    """Awaits Celery results: SUBSCRIBE to the result key's channel (the Redis backend PUBLISHes each result
    there when it stores it), then GET it once (a result stored before the subscription), plus a GET sweep
    of every pending key each :data:`SWEEP_S` (subscriptions lost in a Redis restart)."""

    _instances = weakref.WeakKeyDictionary()

    def __init__(self, s: Settings, backend: Any) -> None:
        self.backend = backend
        self._redis = async_redis(s, s.backend_url)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._pending: dict[bytes, asyncio.Future] = {}
        self._watches: dict[bytes, tuple[Callable[[float], None], float]] = {}  # key -> (watch, started)
        self._reader: asyncio.Task | None = None
        self._watching: asyncio.Task | None = None
        # redis-py's PubSub opens its connection on the first command: concurrent first subscribes would
        # each open one, and all but the last would be lost.
        self._subscribing = asyncio.Lock()

    async def wait(self, task_id: str, watch: Callable[[float], None] | None = None) -> dict[str, Any]:
        """The task's final meta (status, result), decoded by the backend; cancel to stop waiting.

        ``watch(waited_s)``, if given, is called with the other waits' every :data:`SWEEP_S` while this one
        lasts, all in one worker thread (it may block on Redis): the client's check for a job a worker lost.
        """
        key = _as_bytes(self.backend.get_key_for_task(task_id))
        future = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        if watch is not None:
            self._watches[key] = (watch, time.monotonic())
        try:
            await self._watch(key)
            return await future
        finally:
            self._pending.pop(key, None)
            self._watches.pop(key, None)
            await self._unwatch(key)

    def _futures(self) -> list[asyncio.Future]:
        return list(self._pending.values())

    def _tasks(self) -> list[asyncio.Task | None]:
        return [self._reader, self._watching]

    async def aclose(self) -> None:
        await super().aclose()
        await self._pubsub.aclose()

    async def _watch(self, key: bytes) -> None:
        try:
            async with self._subscribing:
                await self._pubsub.subscribe(key)
        except (redis.RedisError, OSError, RuntimeError) as e:
            # Redis down, or the listener reconnecting on the same connection ("readuntil() called while
            # another coroutine is already waiting"): the sweep reads the key once it is back.
            log.debug("subscribing to %r: %s", key, e)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._run(), name="m3q-results")
        try:
            self._offer(key, await self._redis.get(key))
        except (redis.RedisError, OSError):
            pass

    async def _unwatch(self, key: bytes) -> None:
        try:
            async with self._subscribing:
                await self._pubsub.unsubscribe(key)
        except (redis.RedisError, OSError, RuntimeError):
            pass  # dropped with the connection anyway, or unsubscribed when the listener reconnects

    def _offer(self, key: bytes, raw: bytes | None) -> None:
        """Resolve ``key``'s waiter if ``raw`` is a final state."""
        future = self._pending.get(key)
        if raw is None or future is None or future.done():
            return
        meta = self.backend.decode_result(raw)
        if meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
            future.set_result(meta)

    async def _run(self) -> None:
        swept = time.monotonic()
        delay_s = 0.2
        try:
            while self._pending:
                try:
                    await self._listen()
                    delay_s = 0.2
                except (redis.RedisError, OSError, RuntimeError) as e:
                    log.debug("result listener: %s; retrying in %.1fs", brief(e), delay_s)
                    await asyncio.sleep(delay_s)
                    delay_s = backoff(delay_s)
                if time.monotonic() - swept >= SWEEP_S:
                    swept = time.monotonic()
                    await self._sweep()
                    if self._watches and (self._watching is None or self._watching.done()):
                        # A task of its own: the listener goes on while the checks wait on Redis.
                        self._watching = asyncio.get_running_loop().create_task(
                            asyncio.to_thread(self._run_watches, list(self._watches.values())))
        finally:
            self._reader = None

    @staticmethod
    def _run_watches(watches: list[tuple[Callable[[float], None], float]]) -> None:
        for watch, started in watches:
            try:
                watch(time.monotonic() - started)
            except Exception as e:  # noqa: BLE001 - a check that fails (Redis down) is tried at the next sweep
                log.debug("watching a pending result: %s", e)

    async def _listen(self) -> None:
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=BLOCK_S)
        if message and message.get("type") == "message":
            self._offer(_as_bytes(message["channel"]), message["data"])

    async def _sweep(self) -> None:
        keys = list(self._pending)
        try:
            for start in range(0, len(keys), DRAIN):
                chunk = keys[start:start + DRAIN]
                for key, raw in zip(chunk, await self._redis.mget(chunk)):
                    self._offer(key, raw)
        except (redis.RedisError, OSError) as e:
            log.debug("result sweep: %s", e)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
