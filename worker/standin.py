"""TEST-ONLY stand-in encoder with a fixed cost per token: it sleeps instead of running a model.

It exists to measure the queue's own scaling (1, 2, 4, 8 workers) apart from this machine's two cores:
``M3Q_MODEL=test-stand-in:sleep-us-per-token=50``. Its vectors are deterministic and meaningless, and it
says so loudly when loaded. Nothing ever selects it unless ``M3Q_MODEL`` names it.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Sequence

import numpy as np
import torch

from producer.wire import Embedding, Item
from worker.encoder import Encoder, Limits, Prepared
from worker.slicing import Slicer
from worker.tokenizer import SpecialIds
from producer.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "test-stand-in:"


class _WordTokenizer:
    """Whitespace tokens with stable ids; enough for the encoder's pre-processing."""

    specials = SpecialIds(cls=0, pad=1, eos=2, unk=3)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [[4 + int(hashlib.md5(w.encode()).hexdigest()[:6], 16) for w in t.split()] for t in texts]


class _Config:
    max_position_embeddings, pad_token_id = 8194, 1


class _Model:
    config = _Config()
    device = torch.device("cpu")
    dims = {"dense": 8, "colbert_vecs": 8, "sparse": 250002}


class SleepPerTokenEncoder(Encoder):
    """An Encoder whose forward pass is ``sleep(tokens * cost)``."""

    def __init__(self, us_per_token: float, limits: Limits, device: str) -> None:
        super().__init__(_Model(), _WordTokenizer(), limits, f"{PREFIX}sleep-us-per-token={us_per_token:g}", device)
        self.seconds_per_token = us_per_token / 1e6
        log.warning("TEST-ONLY stand-in encoder (sleeps %.0f us per token): vectors are meaningless", us_per_token)

    @property
    def dtype(self):
        return torch.float32

    def _forward(self, step: Sequence[Prepared], dense: bool, sparse: bool, colbert: bool,
                 slicer: Slicer | None = None) -> list[Item]:
        tokens = sum(len(p.ids) for p in step)
        if slicer is None:
            time.sleep(tokens * self.seconds_per_token)
        for a, b in slicer.ranges(tokens, 1.0, "sleep") if slicer else ():
            time.sleep((b - a) * self.seconds_per_token)
        return [Embedding(np.full(8, len(p.ids), np.float32), np.array([4], np.int64), np.ones(1, np.float32),
                          None, len(p.ids), p.truncated) for p in step]


def load(model: str, limits: Limits, device: str) -> SleepPerTokenEncoder:
    """Parse ``test-stand-in:sleep-us-per-token=N``."""
    key, _, value = model[len(PREFIX):].partition("=")
    if key != "sleep-us-per-token" or not value:
        raise ConfigError(f"unknown stand-in {model!r}: use {PREFIX}sleep-us-per-token=N")
    return SleepPerTokenEncoder(float(value), limits, device)
