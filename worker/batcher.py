"""Token-budget batching: pure logic, no torch.

Texts are sorted longest first and packed so that ``len(batch) * longest`` (the padded size) stays under
the budget. A text longer than the budget gets a batch of its own.
"""
from __future__ import annotations

from typing import Sequence


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into ``lengths``, grouped into batches under the token budget, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a padded batch of these lengths occupies."""
    return len(lengths) * max(lengths, default=0)
