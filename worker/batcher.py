"""Token-budget batching: pure logic, no torch.

The one budget rule (:func:`fits`): a batch's padded size, ``len(batch) * longest``, stays under the budget.
Texts are sorted longest first and packed under it; a text longer than the budget gets a batch of its own.
The encoder plans one call's steps with :func:`plan_batches`; the engine fills its cross-job steps with
:func:`fits` too.
"""
from __future__ import annotations

from typing import Sequence


def fits(count: int, longest: int, max_batch_tokens: int) -> bool:
    """Whether ``count`` texts padded to ``longest`` tokens stay within the token budget."""
    return count * longest <= max_batch_tokens


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into ``lengths``, grouped into batches under the token budget, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and not fits(len(current) + 1, longest, max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
