"""A newcomer's first mistakes (issue 14), each answered by the real `m3q` CLI within seconds, in one line,
naming the setting or the command that fixes it: no worker alive, a device nobody serves, a Redis that cannot
be reached, a Milvus that is not running, old failures in `m3q status`."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_py

from producer.client import Client, JobFailed, JobTimeout, NoWorker
from producer.contract import milvus, redis_conn, wire
from producer.contract.wire import Embedding
from tests.conftest import ROOT, free_port, make_settings, settings_env
from worker import sink
from worker.records import record_failure

LINE = '{"id": 1, "text": "hello"}\n'


def m3q(s, *args: str, stdin: str = "", env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run the real CLI; returns the process and the seconds it took."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "producer.cli", *args], env={**settings_env(s), **(env or {})},
                         cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=180)
    return out, time.monotonic() - started


def one_line(out: subprocess.CompletedProcess, waited: bool = False) -> str:
    """The single line on stderr (no traceback, no retry warnings); with ``waited``, after the lines that showed
    the wait for a worker (one each few seconds, stderr not being a terminal)."""
    lines = out.stderr.strip().splitlines()
    if waited:
        waits = [line for line in lines if ": waiting for a worker on queue " in line]
        assert waits and lines[:len(waits)] == waits, out.stderr
        lines = lines[len(waits):]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cpu_worker(tmp_path_factory, redis_client):
    """One real worker on the tiny model, on cpu."""
    from tests.conftest import WorkerProcess

    w = WorkerProcess(make_settings(), tmp_path_factory.mktemp("first-hour") / "worker.log").wait_ready()
    yield w
    w.stop()


# ---- 1. no worker alive -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("command", [["encode"], ["search", "what is a queue?", "--collection", "first_hour"]])
def test_no_worker_is_one_line_in_seconds_naming_m3q_worker(redis_client, milvus_server, command):
    s = make_settings(milvus_uri=milvus_server)  # the default grace, M3Q_NO_WORKER_GRACE_S=10
    if command[0] == "search":  # search checks its collection first: make one
        client = milvus.connect(s)
        sink.ensure_collection(client, "first_hour", 8, "any-model")
        client.close()
    out, took = m3q(s, *command, stdin=LINE)
    line = one_line(out, waited=True)
    print(f"\n$ m3q {command[0]}  ({took:.1f}s)\n{out.stderr}")
    assert out.returncode == 2 and took < s.no_worker_grace_s + 10, (took, line)
    queue = wire.query_queue(s) if command[0] == "search" else wire.document_queue(s)
    assert f"no worker is consuming {queue}" in line
    assert "`m3q worker`" in line and "`m3q status`" in line and "M3Q_NO_WORKER_GRACE_S" in line
    assert redis_client.llen(queue) == 0, "nothing is sent when no worker is alive"


def test_a_device_nobody_serves_is_named_with_the_devices_that_are(cpu_worker):
    s = cpu_worker.settings.replace(no_worker_grace_s=1.0)
    out, took = m3q(s, "encode", "--route-device", "cuda:7", stdin=LINE)
    line = one_line(out, waited=True)
    print(f"\n$ m3q encode --route-device cuda:7  ({took:.1f}s)\n{line}")
    assert out.returncode == 2 and took < 15
    assert "device cuda:7" in line and "`m3q worker --device cuda:7`" in line and "serve cpu only" in line
    assert "`m3q status`" in line

    client = Client(s)
    assert [w["device"] for w in client.workers()] == ["cpu"]
    # Judged by the queues the worker's heartbeat says it reads, not by its device's name.
    assert set(client.workers()[0]["queues"]) == {wire.query_queue(s), wire.document_queue(s),
                                                  wire.device_queue(s, "cpu")}
    assert client.workers("cpu") and client.workers("cuda:7") == []
    with pytest.raises(NoWorker, match="cuda:7") as raised:
        client.encode(["x"], device="cuda:7")
    assert isinstance(raised.value, JobFailed)  # library callers catching JobFailed get it too
    assert isinstance(client.encode(["x"], device="cpu")[0], Embedding)


@pytest.mark.slow
def test_library_gets_no_worker_early_and_a_worker_that_is_starting_gets_the_grace(redis_client, spawn_worker):
    s = make_settings(no_worker_grace_s=1.0)
    started = time.monotonic()
    with pytest.raises(NoWorker):
        Client(s).encode_queries(["anyone there?"])
    assert time.monotonic() - started < 5
    with pytest.raises(NoWorker):
        Client(s).require_worker()

    waiting = s.replace(no_worker_grace_s=120.0)
    result: dict = {}
    call = threading.Thread(target=lambda: result.update(items=Client(waiting).encode_queries(["wait for me"])))
    call.start()
    time.sleep(1.0)
    assert call.is_alive(), "the call waits for a worker within the grace"
    spawn_worker(waiting)  # loads the model, then heartbeats: the waiting call goes on
    call.join(60)
    assert isinstance(result["items"][0], Embedding)


@pytest.mark.slow
def test_without_require_worker_the_job_waits_and_a_notice_names_the_queue(redis_client, caplog):
    s = make_settings(require_worker=False, job_timeout_s=7.0)
    client = Client(s)
    assert client.workers() == []
    handle = client.submit_encode(["queued for later"], "queries")  # submit never checks: a queue is a queue
    with caplog.at_level(logging.WARNING, logger="producer.client"), pytest.raises(JobTimeout):
        handle.raw()
    notices = [r.getMessage() for r in caplog.records if "waiting for a worker" in r.getMessage()]
    assert notices and wire.query_queue(s) in notices[0] and "`m3q worker`" in notices[0], caplog.text

    out, took = m3q(s, "encode", stdin=LINE)
    print(f"\n$ m3q encode --require-worker false ({took:.1f}s)\n{out.stderr}")
    assert f"waiting for a worker on {wire.document_queue(s)}" in out.stderr
    assert out.returncode == 2 and "had no result after 7s" in out.stderr.splitlines()[-1]


# ---- 2. Redis cannot be reached -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["status"], ["encode"], ["worker"], ["index", "corpus.jsonl", "--collection", "c"],
                                     ["search", "x", "--collection", "c"],
                                     ["reindex", "--from", "f.jsonl", "--into", "a"]])
def test_unreachable_redis_is_one_line_naming_the_setting_without_the_password(command):
    s = make_settings(broker_url="redis://:s3cret-pw@127.0.0.1:1/0")
    out, took = m3q(s, *command, stdin=LINE)
    line = one_line(out)
    print(f"\n$ m3q {command[0]}  ({took:.1f}s)\n{line}")
    assert out.returncode == 2 and took < 10, (took, line)
    assert "cannot reach Redis at redis://:**@127.0.0.1:1/0 (M3Q_BROKER_URL)" in line
    assert "s3cret-pw" not in out.stderr + out.stdout


def test_unreachable_result_backend_names_its_own_setting(redis_client):
    s = make_settings(result_backend="redis://127.0.0.1:1/1")
    out, _ = m3q(s, "status")
    assert out.returncode == 2 and "(M3Q_RESULT_BACKEND)" in one_line(out)


# ---- 3. Milvus is not running; old failures ----------------------------------------------------------------

@pytest.mark.parametrize("uri", ["", "http://127.0.0.1:{port}"])
def test_index_without_milvus_fails_before_encoding_naming_both_ways_out(redis_client, tmp_path, uri):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(LINE * 3)
    port = free_port()
    s = make_settings(milvus_uri=uri.format(port=port), milvus_port=port)
    out, took = m3q(s, "index", str(corpus), "--collection", "docs")
    line = one_line(out)
    print(f"\n$ m3q index  ({took:.1f}s)\n{line}")
    assert out.returncode == 2 and took < 10, (took, line)
    assert f"cannot connect to Milvus at http://127.0.0.1:{port}" in line
    assert "`m3q milvus`" in line and "M3Q_MILVUS_URI" in line
    assert redis_client.llen(wire.document_queue(s)) == 0, "nothing was sent to encode"


def test_status_clear_failures_forgets_them(redis_client):
    s = make_settings()
    for n in range(2):
        record_failure(s, redis_conn.redis_client(s), wire.TASK_INDEX_DOCUMENTS, f"job-{n}",
                       "MilvusError: cannot connect to Milvus")
    out, _ = m3q(s, "status")
    assert "FAILED JOBS" in out.stdout and "--clear-failures" in out.stdout and "job-1" in out.stdout
    out, _ = m3q(s, "status", "--clear-failures")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("cleared 2 failed job(s)") and "FAILED JOBS" not in out.stdout, out.stdout
    assert redis_py.Redis.from_url(s.broker_url).llen(f"{s.queue_prefix}:failures") == 0
