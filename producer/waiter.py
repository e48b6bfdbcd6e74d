"""A blocking caller's wait for one reply on the query stream: set once by another thread, waited on with a
timeout, or awaited from an event loop."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

_SETTLING = threading.Lock()
"""Held only to set a waiter or add a callback to it: a reply and a sender's failure may come at once."""


class Waiter:
    """The value (or the error) one thread hands to another, once; later ones are dropped.

    A lock the setter releases. ``concurrent.futures.Future`` does the same with a condition variable, which
    cost the blocking client twice the CPU per handoff (about 13 µs against 6, measured with 32 waiting
    threads; docs/benchmarks)."""

    __slots__ = ("_unset", "_outcome", "_callbacks")

    def __init__(self) -> None:
        self._unset = threading.Lock()
        self._unset.acquire()
        self._outcome: tuple[Any, BaseException | None] | None = None
        self._callbacks: list[Callable[[tuple[Any, BaseException | None]], None]] | None = None  # rarely any

    def done(self) -> bool:
        return self._outcome is not None

    def set_result(self, value: Any) -> None:
        self._settle((value, None))

    def set_exception(self, error: BaseException) -> None:
        self._settle((None, error))

    def result(self, timeout: float | None = None) -> Any:
        """The value, or its error raised; ``concurrent.futures.TimeoutError`` if none came within ``timeout``."""
        if not self._unset.acquire(timeout=-1 if timeout is None else timeout):
            raise FutureTimeout()
        self._unset.release()  # for the next look
        value, error = self._outcome  # type: ignore[misc]
        if error is not None:
            raise error
        return value

    def loop_future(self) -> asyncio.Future:
        """A future of the running loop that gets the outcome: for a caller that awaits what it sent blocking."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def copy(outcome: tuple[Any, BaseException | None]) -> None:
            if not future.done():  # cancelled meanwhile by its waiter
                value, error = outcome
                future.set_exception(error) if error is not None else future.set_result(value)

        with _SETTLING:
            if self._outcome is None:
                self._callbacks = [*(self._callbacks or ()), lambda outcome: loop.call_soon_threadsafe(copy, outcome)]
                return future
        copy(self._outcome)
        return future

    def _settle(self, outcome: tuple[Any, BaseException | None]) -> None:
        with _SETTLING:
            if self._outcome is not None:
                return
            self._outcome = outcome
        self._unset.release()
        for callback in self._callbacks or ():
            callback(outcome)
