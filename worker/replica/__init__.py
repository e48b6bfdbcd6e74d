"""Random-weight BGE-M3 replicas (`m3q replica`): checkpoints in BGE-M3's exact on-disk layout, for tests
and capacity planning without the Hugging Face hub. Their vectors mean nothing.

Tooling, not part of a running worker: ``checkpoint`` writes the model and heads, ``tokenizer`` builds the
offline XLM-R style tokenizer from ``corpus.txt`` (text written for this project). Needs transformers (the
``replica`` extra). Also ``python -m worker.replica DIR --size tiny|small|base|large [--seed N]``.
"""
from __future__ import annotations

from worker.replica.checkpoint import SIZES, main, write_replica

__all__ = ["SIZES", "main", "write_replica"]
