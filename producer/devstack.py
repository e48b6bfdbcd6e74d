"""A local stack of real processes: a private redis-server and `m3q worker` processes, each with its log.

One helper for everything that starts them: `m3q demo`, the benchmarks under ``bench/`` and the tests.
Milvus Lite is started by :mod:`producer.milvus_lite`. Nothing here imports the worker: a worker is a
child process, handed its settings through the environment (:func:`settings_env`).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from producer.contract.errors import InfraError
from producer.contract.settings import ENV_PREFIX, Settings

READY_MARK = " ready."
"""What a Celery worker logs once it consumes (after the model has loaded)."""


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(s: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that hands ``s`` to a child process: this one's, less its own ``M3Q_*`` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({ENV_PREFIX + name.upper(): str(value) for name, value in vars(s).items()})
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, proc: subprocess.Popen | None = None,
               interval_s: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy (exceptions count as not yet); InfraError naming
    ``what`` after ``timeout_s``, or as soon as ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc is not None and proc.poll() is not None:
            raise InfraError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise InfraError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(interval_s)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30, sig: int = signal.SIGTERM) -> None:
    """Ask ``proc`` to stop (``sig``), wait up to ``timeout_s``, then kill it and its process group."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): nothing else is in it
        except (PermissionError, ProcessLookupError):
            proc.kill()
        proc.wait()


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind the main thread (``finally`` blocks and ExitStack callbacks run), so a command
    stops what it started either way; it exits 143. A no-op off the main thread."""
    _on_sigterm(lambda signum: SystemExit(128 + signum))


def interrupt_on_sigterm() -> None:
    """Make SIGTERM stop the main thread as Ctrl-C does (a KeyboardInterrupt), so a long command prints the
    same summary of what it did and how to go on. A no-op off the main thread."""
    _on_sigterm(lambda _signum: KeyboardInterrupt())


def _on_sigterm(error: Callable[[int], BaseException]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, _frame: object) -> None:
        raise error(signum)
    signal.signal(signal.SIGTERM, stop)


class WorkerProcess:
    """A real `m3q worker` process in its own session, its output in a log file."""

    def __init__(self, s: Settings, log_path: Path | None = None, device: str | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.settings = s.replace(device=device or s.device)
        if log_path is None:
            with tempfile.NamedTemporaryFile(prefix="m3q-worker-", suffix=".log", delete=False) as f:
                log_path = Path(f.name)
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "producer.cli", "worker", "--device", self.settings.device, *(extra_args or [])]
        self.proc = subprocess.Popen(cmd, env=settings_env(self.settings, env), stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """The worker's log so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300) -> "WorkerProcess":
        """Until the worker logs that it consumes; InfraError with the log's end if it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        while READY_MARK not in self.output():
            if self.proc.poll() is not None:
                raise InfraError(f"the worker exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise InfraError(f"the worker was not ready after {timeout_s:.0f} s:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        return self

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (Celery's warm shutdown: the jobs in hand finish), then SIGKILL after ``timeout_s``."""
        stop_process(self.proc, timeout_s)
        self.log.close()

    def remove_log(self) -> None:
        self.log.close()
        self.log_path.unlink(missing_ok=True)


class RedisServer:
    """A private redis-server on loopback, with its own port and data folder; stop() and start() keep both."""

    def __init__(self, folder: Path, args: tuple[str, ...] = (), tls: tuple[Path, Path, Path] | None = None,
                 port: int | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.args, self.tls = args, tls
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def url(self, password: str | None = None, db: int = 0) -> str:
        auth = f":{password}@" if password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, timeout_s: float = 20) -> "RedisServer":
        """Start it and wait until it accepts connections (its log says so)."""
        ports = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        self.starts += 1
        log_path = self.folder / f"redis{self.starts}.log"
        self.proc = subprocess.Popen(["redis-server", *ports, "--bind", "127.0.0.1", "--dir", str(self.folder),
                                      "--save", "", "--logfile", str(log_path), *self.args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: "Ready to accept connections" in log_path.read_text(errors="replace"), timeout_s,
                   f"redis-server on port {self.port} (log {log_path})", self.proc)
        return self

    def stop(self) -> None:
        """SIGTERM: Redis' own clean shutdown (an append-only file is flushed first)."""
        if self.proc is not None:
            stop_process(self.proc, 20)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SentinelStack:
    """Redis without a single point of failure, on loopback: a primary, a replica and three Sentinels that
    fail over to the replica when the primary is down for ``down_after_ms``. For the tests, the benchmarks and
    trying a failover by hand; docs/redis-ha.md starts the same with redis-server alone."""

    def __init__(self, folder: Path, master: str = "m3q", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000, password: str = "", sentinel_password: str = "",
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """``password``: the primary's and the replica's (``requirepass``); ``sentinel_password``: the
        Sentinels' own (``M3Q_SENTINEL_PASSWORD``); ``tls``: (certificate, key, CA) to serve every port with
        TLS only (``M3Q_SENTINEL_TLS``)."""
        self.folder, self.master = folder, master
        self.password, self.sentinel_password, self.tls = password, sentinel_password, tls
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[subprocess.Popen] = []
        self.sentinel_ports: list[int] = []

    def url(self, db: int = 0) -> str:
        """The sentinel:// URL of the stack (``M3Q_BROKER_URL``); ``master`` is its ``M3Q_SENTINEL_MASTER``."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth if n == 0 else ''}127.0.0.1:{port}"
                        for n, port in enumerate(self.sentinel_ports)) + f"/{db}"

    def start(self, timeout_s: float = 30) -> "SentinelStack":
        """Start the primary, its replica and the Sentinels; return once every Sentinel knows the replica and
        the two other Sentinels (a failover needs both)."""
        sync_now: tuple[str, ...] = ("--repl-diskless-sync-delay", "0")  # Redis' default waits 5 s for more
        if self.password:
            sync_now += ("--requirepass", self.password, "--masterauth", self.password)
        if self.tls:
            sync_now += ("--tls-replication", "yes")
        primary = RedisServer(self.folder / "primary", sync_now, self.tls).start(timeout_s)
        replica = RedisServer(self.folder / "replica", (*sync_now, "--replicaof", "127.0.0.1", str(primary.port)),
                              self.tls)
        self.servers = [primary, replica.start(timeout_s)]
        for n in range(3):
            self._start_sentinel(n, primary.port)
        wait_until(self._settled, timeout_s, "the Sentinels know the replica and each other")
        return self

    def _start_sentinel(self, n: int, primary_port: int) -> None:
        port = free_port()
        conf = self.folder / f"sentinel{n}.conf"
        conf.write_text(self._ports(port) + f"bind 127.0.0.1\ndir {self.folder}\n"
                        f"sentinel monitor {self.master} 127.0.0.1 {primary_port} 2\n"
                        f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}\n"
                        + (f"sentinel auth-pass {self.master} {self.password}\n" if self.password else "")
                        + (f"requirepass {self.sentinel_password}\nsentinel sentinel-pass {self.sentinel_password}\n"
                           if self.sentinel_password else ""))
        log_path = self.folder / f"sentinel{n}.log"
        self.sentinels.append(subprocess.Popen(["redis-server", str(conf), "--sentinel", "--logfile", str(log_path)],
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.STDOUT))
        self.sentinel_ports.append(port)

    def _ports(self, port: int) -> str:
        if not self.tls:
            return f"port {port}\n"
        cert, key, ca = self.tls
        return (f"port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n"
                f"tls-auth-clients no\ntls-replication yes\n")

    def _sentinel(self, port: int, password: str | None = None):
        """A client of the Sentinel (or, with ``password``, the Redis server) on ``port``."""
        import redis

        tls = {"ssl": True, "ssl_ca_certs": str(self.tls[2])} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1,
                           password=(self.sentinel_password if password is None else password) or None, **tls)

    def _settled(self) -> bool:
        with self._sentinel(self.servers[1].port, self.password) as r:
            if r.role()[3] not in (b"connected", "connected"):
                return False  # the replica has not synchronized yet
        for port in self.sentinel_ports:
            with self._sentinel(port) as r:
                state = r.sentinel_master(self.master)
                if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                    return False
        return True

    def primary(self) -> RedisServer:
        """The server the Sentinels name as the primary now."""
        with self._sentinel(self.sentinel_ports[0]) as r:
            _host, port = r.sentinel_get_master_addr_by_name(self.master)
        return next(server for server in self.servers if server.port == int(port))

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary (a crash: what it acknowledged but had not sent to the replica is lost)."""
        primary = self.primary()
        primary.kill()
        return primary

    def wait_failover(self, old: RedisServer, timeout_s: float = 30) -> RedisServer:
        """Until the Sentinels name another primary and it answers as one; that server."""
        def promoted() -> RedisServer | None:
            new = self.primary()
            if new is old:
                return None
            with self._sentinel(new.port, self.password) as r:
                return new if r.role()[0] in (b"master", "master") else None
        return wait_until(promoted, timeout_s, f"a failover of {self.master}")

    def stop(self) -> None:
        for proc in self.sentinels:
            stop_process(proc, 10)
        for server in self.servers:
            server.stop()
