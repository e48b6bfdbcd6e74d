"""Cutting a long forward pass into short slices, so that waiting queries can run between them.

A document step over 16k tokens takes seconds on a CPU. The model therefore runs each layer of a document
step in row slices (the linear parts by token rows, attention by query rows), and calls ``pause`` between
slices; the engine's ``pause`` runs any waiting queries to completion and returns. Each slice is sized to
about ``target_s`` of work: the work is counted in floating-point operations, and the device's rate is
learnt from the slices already run. On CUDA, where kernels run asynchronously, the slicer instead waits
for each layer's kernels before the next layer is queued, so that a query queues behind one layer at most.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch

# Slices smaller than this cost more in lost efficiency than they save in latency (attention kernels
# need a few hundred query rows to stream keys and values efficiently).
MIN_ROWS = {"attention": 256}
DEFAULT_MIN_ROWS = 64
RELAXED = 8  # slices are this much longer while no query is about


class Slicer:
    """Yields row ranges of about ``target_s`` of work each, and calls ``pause`` between them."""

    def __init__(self, pause: Callable[[], None], target_s: float, device: torch.device,
                 urgent: Callable[[], bool] = lambda: True) -> None:
        self.pause = pause
        self.target_s = target_s
        self.urgent = urgent
        self.cuda = device.type == "cuda"
        self.rates: dict[str, float] = {}
        self.paused_s = 0.0

    def ranges(self, rows: int, flops_per_row: float, kind: str) -> Iterator[tuple[int, int]]:
        """``[start, end)`` ranges covering ``rows``; the caller computes each range before asking for the next."""
        start = 0
        while start < rows:
            end = rows if self.cuda else min(rows, start + self._rows_per_slice(flops_per_row, kind))
            began = time.perf_counter()
            yield start, end
            if not self.cuda:
                self._learn(kind, (end - start) * flops_per_row, time.perf_counter() - began)
            start = end
            if start < rows:
                self.checkpoint()

    def checkpoint(self) -> None:
        """A point where waiting queries may run (between slices and between layers)."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        began = time.perf_counter()
        self.pause()
        self.paused_s += time.perf_counter() - began

    def _rows_per_slice(self, flops_per_row: float, kind: str) -> int:
        rate = self.rates.get(kind)
        least = MIN_ROWS.get(kind, DEFAULT_MIN_ROWS)
        if rate is None:  # the first slice of a kind is small, and times the device
            return least
        target_s = self.target_s if self.urgent() else RELAXED * self.target_s
        return max(least, math.floor(rate * target_s / max(flops_per_row, 1.0)))

    def _learn(self, kind: str, flops: float, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = flops / seconds
        old = self.rates.get(kind)
        self.rates[kind] = rate if old is None else 0.7 * old + 0.3 * rate
