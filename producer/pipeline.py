"""Many texts through the queue: split into jobs, a bounded number in flight, results in input order.

:func:`window` is the one pipelining loop of the project: the client's blocking and asyncio calls and the
re-index driver all send through it. It submits jobs (a submit never waits for a result) and hands each back
once ``limit`` are open; the caller waits for that one, blocking or with ``await``, before more are sent.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from producer.contract import checks, wire
from producer.contract.wire import Item

T = TypeVar("T")
H = TypeVar("H")


def window(items: Iterable[T], submit: Callable[[T], H], limit: int) -> Iterator[tuple[T, H]]:
    """(item, submit(item)) for each item, in order, each yielded once ``limit`` later ones are not yet sent
    or the input is spent: wait for the yielded job before asking for the next."""
    open_jobs: deque[tuple[T, H]] = deque()
    for item in items:
        if len(open_jobs) >= limit:
            yield open_jobs.popleft()
        open_jobs.append((item, submit(item)))
    while open_jobs:
        yield open_jobs.popleft()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def split(texts: Sequence[object], job_texts: int) -> tuple[list[Item | None], list[list[int]]]:
    """Item errors for texts that cannot travel (answered here, in place), and the positions of the others
    in jobs of ``job_texts``."""
    out: list[Item | None] = [None] * len(texts)
    send = []
    for i, text in enumerate(texts):
        reason = checks.unsendable_text(text)
        if reason:
            out[i] = wire.ItemError(reason)
        else:
            send.append(i)
    return out, list(chunked(send, job_texts))


def place(out: list[Any], positions: list[int], items: list[Item]) -> None:
    """Put a job's items at their input positions."""
    for i, item in zip(positions, items):
        out[i] = item
