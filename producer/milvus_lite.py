"""The embedded Milvus Lite server: start ``milvus-lite server`` as a subprocess, wait until it answers,
and stop it, so that several worker processes can share one local Milvus when M3Q_MILVUS_URI is empty
(``m3q milvus``, ``m3q demo``, the tests and benchmarks).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from pymilvus import MilvusClient

from producer.contract.milvus import GRPC_OPTIONS, LITE_HOST, MilvusError
from producer.contract.settings import Settings

LITE_LOG_NAME = "milvus-lite.log"
"""The embedded server's log, in its data directory."""


def lite_command() -> list[str]:
    """How to run ``milvus-lite``: the script next to this Python first, then PATH, then ``-m``."""
    beside = Path(sys.executable).parent / "milvus-lite"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("milvus-lite")
    if found:
        return [found]
    try:
        import milvus_lite  # noqa: F401 - only to know whether `python -m milvus_lite` can work
    except ImportError:
        raise MilvusError("milvus-lite is not installed (pip install milvus-lite); "
                          "or set M3Q_MILVUS_URI to a Milvus server") from None
    return [sys.executable, "-m", "milvus_lite"]


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _answers(uri: str) -> bool:
    try:
        client = MilvusClient(uri=uri, timeout=2.0, grpc_options=GRPC_OPTIONS)
    except Exception:  # noqa: BLE001 - not ready yet
        return False
    try:
        client.list_collections(timeout=2.0)
        return True
    except Exception:  # noqa: BLE001 - not ready yet
        return False
    finally:
        client.close()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_lite_server(data_dir: str | os.PathLike, port: int, timeout_s: float = 60.0,
                      host: str = LITE_HOST) -> subprocess.Popen:
    """Start ``milvus-lite server`` on ``host:port`` with data in ``data_dir`` and wait until it answers.

    The server's output goes to ``data_dir/milvus-lite.log``; if it exits or is not ready within
    ``timeout_s``, it is stopped and MilvusError is raised with the tail of that log.
    """
    data = Path(data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    log_path = data / LITE_LOG_NAME
    cmd = [*lite_command(), "server", "--data-dir", str(data), "--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, host, port, timeout_s, log_path)
    except BaseException:
        stop_lite_server(proc)
        raise
    return proc


def _wait_ready(proc: subprocess.Popen, host: str, port: int, timeout_s: float, log_path: Path) -> None:
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else host
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MilvusError(f"milvus-lite server on port {port} exited with code {proc.returncode}; "
                              f"log {log_path}:\n{_log_tail(log_path)}")
        if port_open(probe, port) and _answers(f"http://{probe}:{port}"):
            return
        time.sleep(0.1)
    raise MilvusError(f"milvus-lite server on port {port} did not answer within {timeout_s:g} s; "
                      f"log {log_path}:\n{_log_tail(log_path)}")


def stop_lite_server(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a server from :func:`start_lite_server`: SIGTERM, then SIGKILL after ``timeout_s``."""
    from producer.devstack import stop_process

    stop_process(proc, timeout_s)


class LiteServer:
    """An embedded Milvus Lite server this process started; a context manager that stops it on exit."""

    def __init__(self, data_dir: str | os.PathLike, port: int, host: str = LITE_HOST) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.port = port
        self.host = host
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """The URI clients use (M3Q_MILVUS_URI)."""
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "LiteServer":
        """Start the server and wait until it answers (see :func:`start_lite_server`)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = start_lite_server(self.data_dir, self.port, timeout_s, self.host)
        return self

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.proc is not None:
            stop_lite_server(self.proc)
            self.proc = None

    def __enter__(self) -> "LiteServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_lite_server(settings: Settings, timeout_s: float = 60.0) -> LiteServer | None:
    """Make sure the embedded server of M3Q_MILVUS_PORT runs: reuse one that already answers there
    (returns None), else start one with data in M3Q_MILVUS_DATA_DIR (returns it; the caller stops it).
    Raises MilvusError when something else holds the port or the server cannot start."""
    port = settings.milvus_port
    if port_open(LITE_HOST, port):
        if _answers(f"http://{LITE_HOST}:{port}"):
            return None
        raise MilvusError(f"port {port} is taken by something that is not Milvus; set M3Q_MILVUS_PORT")
    return LiteServer(settings.milvus_data_dir, port).start(timeout_s)


def serve(settings: Settings) -> int:
    """`m3q milvus`: run the embedded server in the foreground until it exits, Ctrl-C or SIGTERM; the
    server is stopped in every case."""
    from producer.devstack import exit_on_sigterm

    exit_on_sigterm()
    server = start_lite_server(settings.milvus_data_dir, settings.milvus_port)
    try:
        print(f"Milvus Lite serving http://{LITE_HOST}:{settings.milvus_port} (data in {settings.milvus_data_dir}); "
              "Ctrl-C stops it", flush=True)
        return server.wait()
    finally:
        stop_lite_server(server)
