"""Shared fixtures: the tiny committed checkpoint, real Redis, real worker and gateway processes, real Milvus
Lite."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from producer import devstack
from producer.contract import wire
from producer.contract.errors import InfraError
from producer.contract.settings import Settings
from producer.devstack import RedisServer, free_port  # noqa: F401 - used by the tests

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "tiny-bge-m3"
WORKER_READY_S = 180
"""How long a test waits for a worker to load the tiny model (2 shared cores, a busy suite)."""
REDIS_URL = os.environ.get("M3Q_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def make_settings(**overrides) -> Settings:
    """Test settings: the tiny model, a private queue prefix on the test Redis database."""
    base = dict(broker_url=REDIS_URL, model=str(TINY), queue_prefix=f"t{uuid.uuid4().hex[:10]}",
                job_timeout_s=120.0, batch_wait_ms=2.0)
    base.update(overrides)
    return Settings(**base)


def settings_env(s: Settings) -> dict[str, str]:
    """The environment that hands ``s`` to a child process."""
    return devstack.settings_env(s)


class WorkerProcess(devstack.WorkerProcess):
    """A real `m3q worker` process, with what the tests read from its log and /proc."""

    def __init__(self, s: Settings, log_path: Path, device: str = "cpu", extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(s, log_path, device, extra, env, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 90) -> "WorkerProcess":
        super().wait_ready(timeout_s)
        return self

    def rss_kb(self) -> int:
        """Resident memory of the worker process (VmRSS), in KiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))

    def task_ids(self, event: str, task: str = wire.TASK_INDEX_DOCUMENTS) -> list[str]:
        """Ids of ``task`` jobs that this worker logged as ``event`` (received, succeeded, ...)."""
        return re.findall(rf"Task {re.escape(task)}\[([0-9a-f-]+)\] {event}", self.output())

    def owns(self, raw: dict) -> bool:
        """Whether a job result was stamped by this worker (its hostname carries the pid)."""
        return f"-{self.proc.pid}@" in str(raw.get("worker"))


Worker = WorkerProcess


def wait_for(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None, interval_s: float = 0.1):
    """Poll ``check`` until it returns something truthy; fail the test naming ``what``."""
    try:
        return devstack.wait_until(check, timeout_s, what, proc, interval_s)
    except InfraError as e:
        raise AssertionError(str(e)) from None


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


@pytest.fixture(scope="module")
def encoder():
    """The tiny checkpoint in this process: what a worker's answers are compared with."""
    from worker.encoder import Encoder

    return Encoder.load(str(TINY), "cpu", "float32")


@pytest.fixture(scope="module")
def client(shared_worker):
    """A producer client on the module's shared worker."""
    from producer.client import Client

    return Client(shared_worker.settings)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus Lite server on a free port, for the whole session."""
    from producer.milvus_lite import start_lite_server, stop_lite_server

    port = free_port()
    proc = start_lite_server(str(tmp_path_factory.mktemp("milvus")), port)
    yield f"http://127.0.0.1:{port}"
    stop_lite_server(proc, 20)


@pytest.fixture
def private_redis(tmp_path):
    """Start private redis-servers; all are stopped after the test."""
    servers: list[RedisServer] = []

    def start(*args: str, tls: tuple[Path, Path, Path] | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", args, tls)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def workers(tmp_path, redis_client):
    """Start worker processes (``wait`` for them to be ready, or not); all are stopped after the test."""
    started: list[WorkerProcess] = []

    def spawn(s: Settings, env: dict[str, str] | None = None, wait: bool = True) -> WorkerProcess:
        w = WorkerProcess(s, tmp_path / f"worker{len(started)}.log", env=env)
        started.append(w)
        return w.wait_ready(WORKER_READY_S) if wait else w

    yield spawn
    for w in started:
        w.stop(timeout_s=30)


class GatewayProcess:
    """A real `m3q serve` process on a free port."""

    def __init__(self, s: Settings, log_path: Path) -> None:
        self.settings = s
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "serve", "--port", port],
                                     env=settings_env(s), stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 60) -> "GatewayProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/metrics", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway not ready after {timeout_s}s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def threads(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
