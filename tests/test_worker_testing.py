"""The worker's test-only hooks (worker/testing.py) stay off without their one switch, M3Q_TESTING=1.

The hooks themselves run in real worker processes elsewhere: the crash hook in tests/test_faults.py,
tests/test_redelivery.py and tests/test_query_stream.py, the stand-in in tests/test_scale.py.
"""
from __future__ import annotations

import pytest

from producer.contract.errors import ConfigError
from producer.contract.settings import Settings
from worker import testing
from worker.runtime import load_encoder

STANDIN = "test-stand-in:sleep-us-per-token=1"


def test_a_stand_in_model_is_refused_without_the_switch(monkeypatch) -> None:
    monkeypatch.delenv(testing.SWITCH_ENV, raising=False)
    with pytest.raises(ConfigError) as refused:
        load_encoder(Settings(model=STANDIN))
    assert "M3Q_TESTING=1" in str(refused.value) and STANDIN in str(refused.value)
    monkeypatch.setenv(testing.SWITCH_ENV, "yes")  # only "1" turns it on
    with pytest.raises(ConfigError):
        load_encoder(Settings(model=STANDIN))


def test_a_stand_in_model_loads_with_the_switch(monkeypatch) -> None:
    monkeypatch.setenv(testing.SWITCH_ENV, "1")
    encoder = load_encoder(Settings(model=STANDIN, max_batch_tokens=777))
    assert isinstance(encoder, testing.SleepPerTokenEncoder)
    assert encoder.limits.max_batch_tokens == 777  # the settings' limits, as for a real model
    with pytest.raises(ConfigError, match="unknown stand-in"):
        load_encoder(Settings(model="test-stand-in:nonsense"))


def test_the_crash_hook_is_armed_only_with_the_switch() -> None:
    assert testing.crash_hook({}) is None
    assert testing.crash_hook({testing.CRASH_ENV: "boom"}) is None  # the text alone arms nothing
    assert testing.crash_hook({testing.SWITCH_ENV: "1"}) is None  # the switch alone arms nothing
    hook = testing.crash_hook({testing.SWITCH_ENV: "1", testing.CRASH_ENV: "boom"})
    assert hook is not None
    hook({"texts": ["a harmless text"]})  # returns: only a job holding the text ends the process
    hook(None)
