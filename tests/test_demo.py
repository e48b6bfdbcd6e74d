"""README's main command, `m3q demo`, as a user runs it: end to end on a local checkpoint, and failing fast at
the default model on a machine that cannot reach the Hugging Face hub."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from producer.demo import QUERIES, SAMPLE
from producer.milvus_lite import port_open
from tests.conftest import REDIS_URL, ROOT, TINY, free_port

TIMEOUT_S = 240


def _env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3Q_")}
    env.update(M3Q_BROKER_URL=REDIS_URL, M3Q_QUEUE_PREFIX=f"demo{uuid.uuid4().hex[:8]}",
               M3Q_MILVUS_PORT=str(free_port()), M3Q_MILVUS_DATA_DIR=str(tmp_path / "milvus"),
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", "demo"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def test_demo_end_to_end_on_a_local_checkpoint(tmp_path, redis_client):
    env = _env(tmp_path, M3Q_MODEL=str(TINY))
    done = _demo(env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    n = sum(1 for line in SAMPLE.read_text().splitlines() if line.strip())
    assert f"stored {n} of {n} documents; rejected 0" in out
    assert "RANDOM-WEIGHT REPLICA" in out.splitlines()[0]  # a replica says what it is
    assert re.search(rf"stored {n} of {n} documents; rejected 0 in \d+\.\d s", out)  # with its timing
    assert "Scores are reciprocal rank fusion (RRF)" in out and "0.0328 is the most" in out
    for query in QUERIES:
        block = out.split(f"hybrid search: {query}  (", 1)[1].split("\n\n", 1)[0]
        assert re.match(r"^\d+ ms\)\n", block), block
        ranks = [re.match(r"^\s+(\d)\. (\d\.\d{4})  (\S+)", line) for line in block.splitlines()]
        assert [int(m[1]) for m in ranks if m] == [1, 2, 3], block
    assert not Path(out.split("(log: ", 1)[1].split(",", 1)[0]).exists()  # no worker log left in /tmp
    # Everything it started, it stopped: the Milvus Lite server and the worker (its heartbeat is gone).
    assert not port_open("127.0.0.1", int(env["M3Q_MILVUS_PORT"]))
    assert not redis_client.keys(f"{env['M3Q_QUEUE_PREFIX']}:worker:*")


def test_demo_at_the_default_model_fails_fast_without_the_hub(tmp_path):
    env = _env(tmp_path)
    started = time.monotonic()
    done = _demo(env)
    assert time.monotonic() - started < 60
    assert done.returncode == 2
    assert "M3Q_MODEL" in done.stderr and "m3q replica" in done.stderr
    assert "BAAI/bge-m3" in done.stderr and "not in the Hugging Face cache" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "milvus").exists()  # it failed before starting anything
