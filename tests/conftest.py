"""Shared fixtures: the tiny committed checkpoint, real Redis, real worker processes, real Milvus Lite."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-bge-m3"
REDIS_URL = os.environ.get("M3Q_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(**overrides) -> Settings:
    """Test settings: the tiny model, a private queue prefix on the test Redis database."""
    base = dict(broker_url=REDIS_URL, model=str(TINY), queue_prefix=f"t{uuid.uuid4().hex[:10]}",
                job_timeout_s=120.0, batch_wait_ms=2.0)
    base.update(overrides)
    return Settings(**base)


def settings_env(s: Settings) -> dict[str, str]:
    """The environment that hands ``s`` to a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3Q_")}
    for name, value in vars(s).items():
        env["M3Q_" + name.upper()] = str(value)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """A real `m3q worker` process."""

    def __init__(self, s: Settings, log_path: Path, device: str = "cpu", extra: list[str] | None = None) -> None:
        self.settings = s.replace(device=device)
        self.log_path = log_path
        cmd = [sys.executable, "-m", "producer.cli", "worker", "--device", device, *(extra or [])]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=settings_env(self.settings), stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 90) -> "WorkerProcess":
        """Until the worker logs that it is ready for jobs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if " ready." in self.output():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout_s}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    assert (TINY / "model.safetensors").exists(), "the tiny checkpoint is committed under tests/data"
    return TINY


@pytest.fixture(scope="session")
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis at {REDIS_URL}: start one (redis-server) or set M3Q_TEST_REDIS_URL")
    return client


@pytest.fixture
def spawn_worker(tmp_path, redis_client):
    """Start real worker processes; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def spawn(s: Settings, device: str = "cpu", extra: list[str] | None = None, wait: bool = True) -> WorkerProcess:
        w = WorkerProcess(s, tmp_path / f"worker{len(started)}.log", device, extra)
        started.append(w)
        return w.wait_ready() if wait else w

    yield spawn
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def shared_worker(tmp_path_factory, redis_client):
    """One worker on the tiny model, shared by a module's tests."""
    s = make_settings()
    w = WorkerProcess(s, tmp_path_factory.mktemp("worker") / "worker.log").wait_ready()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus Lite server on a free port, for the whole session."""
    from producer.milvus_lite import start_lite_server

    port = free_port()
    proc = start_lite_server(str(tmp_path_factory.mktemp("milvus")), port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
