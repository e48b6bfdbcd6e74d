"""TEST-ONLY code of the worker, in one module, active only under one explicit switch: ``M3Q_TESTING=1``.

Two hooks live here, for the test suite and the benchmarks; a production worker never sets the switch:

* **The crash hook.** With ``M3Q_TESTING=1`` and ``M3Q_TEST_CRASH_ON_TEXT=TEXT``, a worker exits at once
  (``os._exit(86)``) on a job holding TEXT: a real process death mid-job, for the redelivery and poison-job
  tests. Both variables are read once, when the worker starts; without the switch the hook is never armed
  and a job pays nothing for it.
* **The stand-in encoder.** ``M3Q_MODEL=test-stand-in:sleep-us-per-token=N`` with ``M3Q_TESTING=1`` loads
  an encoder that sleeps N microseconds per token instead of running a model, to measure the queue's own
  scaling (1, 2, 4, 8 workers) apart from the machine's cores. Its vectors are deterministic and
  meaningless, and it says so loudly when loaded. Without the switch such a model is refused with a
  ConfigError naming ``M3Q_TESTING``.

The switch is an environment variable, not a setting: it is no knob of a production worker.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from producer.contract.errors import ConfigError
from producer.contract.wire import Embedding, Item
from worker.encoder import Encoder, Limits, Prepared
from worker.slicing import Slicer
from worker.tokenizer import SpecialIds

log = logging.getLogger(__name__)

SWITCH_ENV = "M3Q_TESTING"
"""The one switch: ``1`` turns this module's hooks on."""
CRASH_ENV = "M3Q_TEST_CRASH_ON_TEXT"
"""With the switch: a worker exits at once on a job holding this text."""
CRASH_EXIT_CODE = 86
STANDIN_PREFIX = "test-stand-in:"
"""``M3Q_MODEL`` names the stand-in encoder with this prefix."""


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the test switch is on (``M3Q_TESTING=1``)."""
    return (os.environ if environ is None else environ).get(SWITCH_ENV) == "1"


# ---- the crash hook -------------------------------------------------------------------------------------

def crash_hook(environ: Mapping[str, str] | None = None) -> Callable[[Any], None] | None:
    """The crash hook the environment arms, or None (always None without the switch). Read once, at start."""
    env = os.environ if environ is None else environ
    text = env.get(CRASH_ENV)
    if not text:
        return None
    if not enabled(env):
        log.warning("%s is set but %s=1 is not: the test crash hook stays off", CRASH_ENV, SWITCH_ENV)
        return None
    log.warning("TEST-ONLY crash hook armed: this worker exits on a job holding %r", text)

    def crash_if_asked(payload: Any) -> None:
        if isinstance(payload, dict) and text in (payload.get("texts") or []):
            log.error("%s matched a text of this job: exiting at once (test hook)", CRASH_ENV)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)

    return crash_if_asked


# ---- the stand-in encoder -------------------------------------------------------------------------------

def is_standin(model: str) -> bool:
    """Whether ``model`` names the stand-in encoder."""
    return model.startswith(STANDIN_PREFIX)


def load_standin(model: str, limits: Limits, device: str,
                 environ: Mapping[str, str] | None = None) -> "SleepPerTokenEncoder":
    """Parse ``test-stand-in:sleep-us-per-token=N``; refused (ConfigError) unless the switch is on."""
    if not enabled(environ):
        raise ConfigError(f"M3Q_MODEL={model!r} is the test-only stand-in encoder; it loads only with "
                          f"{SWITCH_ENV}=1 (tests and benchmarks). Set M3Q_MODEL to a real checkpoint")
    key, _, value = model[len(STANDIN_PREFIX):].partition("=")
    if key != "sleep-us-per-token" or not value:
        raise ConfigError(f"unknown stand-in {model!r}: use {STANDIN_PREFIX}sleep-us-per-token=N")
    return SleepPerTokenEncoder(float(value), limits, device)


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
        super().__init__(_Model(), _WordTokenizer(), limits, f"{STANDIN_PREFIX}sleep-us-per-token={us_per_token:g}",
                         device)
        self.seconds_per_token = us_per_token / 1e6
        log.warning("TEST-ONLY stand-in encoder (sleeps %.0f us per token): vectors are meaningless", us_per_token)

    @property
    def dtype(self) -> torch.dtype:
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
