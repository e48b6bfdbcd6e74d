"""A new user's first day on a fresh clone (issue 24), through the real `m3q` CLI, real Redis and real workers:
a wait for a worker that shows itself, a malformed broker URL in one line, a worker that stops before its model
when it cannot use Redis, help that lists what each command reads, typos named with the closest flag or
command, `m3q status` counting only the jobs really held, and one short log line per job."""
from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from dataclasses import fields

import pytest

from producer.client import Client, NoWorker
from producer.contract import wire
from producer.contract.settings import COMMAND_SETTINGS, Settings, command_settings
from tests.conftest import ROOT, WorkerProcess, make_settings, settings_env

LINE = '{"id": 1, "text": "hello"}\n'
TIMEOUT_S = 180


def m3q(s: Settings | None, *args: str, stdin: str = "", env: dict[str, str] | None = None,
        stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    base = settings_env(s) if s is not None else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env={**base, **(env or {})}, cwd=ROOT,
                          input=stdin, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=TIMEOUT_S)


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- item 2: the wait for a worker shows itself on the CLI only ----------------------------------------------

def test_the_wait_for_a_worker_shows_progress_on_stderr_and_ends_with_the_same_message(redis_client):
    s = make_settings(no_worker_grace_s=4.0)
    out = m3q(s, "encode", stdin=LINE)
    lines = lines_of(out.stderr)
    print("\n$ m3q encode  (no worker, not a terminal)\n" + out.stderr)
    queue = wire.document_queue(s)
    waits = [line for line in lines if line.startswith(f"m3q encode: waiting for a worker on queue {queue} ")]
    assert out.returncode == 2 and len(waits) == 2 and len(lines) == 3, out.stderr  # at 0 s and 3 s, then why
    assert "(Redis at redis://127.0.0.1:" in waits[0] and "0 s of 4 s (M3Q_NO_WORKER_GRACE_S)" in waits[0]
    assert "3 s of 4 s" in waits[1]
    assert lines[-1].startswith(f"m3q encode: no worker is consuming {queue}: no heartbeat within 4s")


def test_on_a_terminal_the_wait_is_one_line_rewritten_each_second_and_cleared(redis_client):
    s = make_settings(no_worker_grace_s=3.0)
    leader, follower = pty.openpty()
    try:
        out = m3q(s, "encode", stdin=LINE, stderr=follower)
        os.close(follower)
        follower = -1
        shown = b""
        while chunk := _read(leader):
            shown += chunk
    finally:
        for fd in (leader, follower):
            if fd >= 0:
                os.close(fd)
    text = shown.decode()
    assert out.returncode == 2
    assert [int(n) for n in re.findall(r"\r(?:\x1b\[K)?m3q encode: waiting for a worker .*? (\d) s of 3 s", text)] \
        == [0, 1, 2], repr(text)
    assert "\r\x1b[Km3q encode: no worker is consuming" in text, repr(text)  # the wait's line is cleared first


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other end is closed: all was read
        return b""


def test_a_library_caller_gets_no_print_while_waiting(redis_client, capfd):
    s = make_settings(no_worker_grace_s=2.0)
    with pytest.raises(NoWorker):
        Client(s).encode_documents(["from a web app"])
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured


# ---- item 3: a malformed broker URL; a worker that cannot use Redis stops before its model ------------------

@pytest.mark.parametrize("command", [["status"], ["encode"], ["worker"], ["index", "f.jsonl", "--collection", "c"],
                                     ["search", "x", "--collection", "c"], ["reindex", "--from", "f", "--into", "a"],
                                     ["serve"], ["demo"], ["milvus"]])
def test_a_malformed_broker_url_is_one_line_naming_the_variable_and_the_form(command):
    out = m3q(None, *command, env={"M3Q_BROKER_URL": "redis:/host"}, stdin=LINE)
    print(f"\n$ M3Q_BROKER_URL=redis:/host m3q {command[0]}\n{out.stderr}")
    (line,) = lines_of(out.stderr)
    assert out.returncode == 2 and line.startswith(f"m3q {command[0]}: M3Q_BROKER_URL (--broker-url) is 'redis:/host'")
    assert "expected redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... for TLS, or sentinel://" in line


@pytest.mark.parametrize("variable, value, needle", [
    ("M3Q_BROKER_URL", "amqp://guest:guest@localhost:5672//", "not a Redis URL"),
    ("M3Q_RESULT_BACKEND", "rpc://", "not a Redis URL"),
    ("M3Q_BROKER_URL", "redis://127.0.0.1:notaport/0", "its port is not a number"),
])
def test_a_worker_with_a_broker_it_cannot_use_exits_non_zero_in_one_line(variable, value, needle):
    out = m3q(make_settings(model="/no/such/model"), "worker", env={variable: value})
    print(f"\n$ {variable}={value} m3q worker\n{out.stderr}")
    (line,) = lines_of(out.stderr)
    assert out.returncode == 2 and variable in line and needle in line, line
    assert "guest:guest" not in line  # the password is masked


def test_a_worker_refused_by_redis_stops_before_loading_its_model(private_redis):
    server = private_redis("--requirepass", "s3cret-pw")
    s = make_settings(broker_url=server.url("not-the-password"), model="/no/such/model")
    started = time.monotonic()
    out = m3q(s, "worker")
    (line,) = lines_of(out.stderr)
    print(f"\n$ m3q worker  (wrong password)\n{line}")
    assert out.returncode == 2 and time.monotonic() - started < 30
    assert "M3Q_BROKER_URL" in line and "password" in line and "not-the-password" not in line
    assert "/no/such/model" not in line  # the broker is judged before the model


def test_celery_started_worker_with_an_unreachable_result_backend_exits_before_its_model(tmp_path):
    # `celery -A worker.celery_app worker` skips the CLI's check: the worker's start-up hook makes it.
    s = make_settings(result_backend="redis://127.0.0.1:1/1", model="/no/such/model")
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=threads",
                           "--without-gossip", "--without-mingle"], env=settings_env(s), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    print(f"\n$ celery -A worker.celery_app worker  (unreachable result backend)\n{done.stderr[-600:]}")
    cannot = [line for line in done.stderr.splitlines() if "m3q worker cannot start" in line]
    assert done.returncode != 0 and len(cannot) == 1, done.stderr[-3000:]
    assert "M3Q_RESULT_BACKEND" in cannot[0] and "/no/such/model" not in done.stderr


# ---- item 4: per-command help; typos named with the closest flag or command ---------------------------------

def test_each_commands_help_lists_only_the_settings_it_reads():
    index_help = m3q(None, "index", "--help").stdout
    serve_help = m3q(None, "serve", "--help").stdout
    print(f"\nm3q index --help: {len(index_help.splitlines())} lines; m3q serve --help: "
          f"{len(serve_help.splitlines())} lines")
    assert "--api-keys" not in index_help and "API_KEYS" not in index_help
    assert "--api-keys" in serve_help and "--milvus-uri" in index_help and "--broker-url" in index_help
    assert "--preempt-ms" not in index_help and "--milvus-uri" not in m3q(None, "status", "--help").stdout
    read = {name for command in COMMAND_SETTINGS for name in command_settings(command)}
    assert read == {f.name for f in fields(Settings)}, "every setting is read by at least one command"
    replica = m3q(None, "replica", "--help").stdout
    assert "settings (" not in replica and "[settings]" not in replica


@pytest.mark.parametrize("args, expected", [
    (["index", "corpus.jsonl", "--colection", "docs"],
     "m3q index: error: unrecognized argument --colection: did you mean --collection?"),
    (["search", "q", "--collection", "c", "--mdoe", "dense"], "m3q search: error: unrecognized argument --mdoe: "
                                                               "did you mean --mode?"),
    (["status", "--brokr-url", "redis://x"], "m3q status: error: unrecognized argument --brokr-url: "
                                             "did you mean --broker-url?"),
    (["indx", "corpus.jsonl"], "m3q: error: unknown command 'indx': did you mean index? (the commands: worker,"),
])
def test_a_typo_is_reported_by_its_command_with_the_closest_name(args, expected):
    out = m3q(None, *args)
    print(f"\n$ m3q {' '.join(args)}\n{out.stderr}")
    assert out.returncode == 2 and lines_of(out.stderr)[-1].startswith(expected), out.stderr
    usage = "usage: m3q" if args[0] == "indx" else f"usage: m3q {args[0]} "
    assert out.stderr.startswith(usage) and "required" not in out.stderr, out.stderr


# ---- items 5 and 6: an idle worker holds nothing; one short line per job ------------------------------------

@pytest.fixture(scope="module")
def indexed_worker(tmp_path_factory, redis_client, milvus_server):
    """A real worker (one heartbeat a second) that has indexed 70 documents through `m3q index`, now idle."""
    s = make_settings(milvus_uri=milvus_server, dead_worker_s=6.0)
    w = WorkerProcess(s, tmp_path_factory.mktemp("first-day") / "worker.log").wait_ready()
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc-{i:03d}", "text": f"document {i} of the first day"}) + "\n"
                              for i in range(70)))
    done = m3q(s, "index", str(corpus), "--collection", "first_day")
    assert done.returncode == 0, done.stderr
    yield w
    w.stop()


def test_status_of_an_idle_worker_that_finished_jobs_shows_nothing_held(indexed_worker, redis_client):
    s = indexed_worker.settings
    Client(s).encode_documents([f"text {i}" for i in range(5)])  # more jobs, by the Celery queue
    # Wait two heartbeats after the last job, then read what the worker says it holds.
    time.sleep(3 * wire.heartbeat_s(s))
    (beat,) = wire.live_workers(s, redis_client)
    assert beat["held"] == [] and beat["held_jobs"] == [], beat
    out = m3q(s, "status")
    print(f"\n$ m3q status  (idle worker after {beat['jobs']} jobs)\n{out.stdout}")
    assert out.returncode == 0 and re.search(r"jobs=\d+ .* held=0$", out.stdout, re.M), out.stdout
    assert beat["jobs"] >= 3


def test_the_worker_logs_one_short_line_per_job_and_not_its_result(indexed_worker):
    log = indexed_worker.output()
    lines = re.findall(rf"Task {re.escape(wire.TASK_INDEX_DOCUMENTS)}\[[0-9a-f-]+\] succeeded in [0-9.]+s: .*", log)
    print("\n" + "\n".join(lines))
    assert sorted(line.split(": ", 1)[1] for line in lines) == \
        ["6 ids, 6 stored, 0 rejected, 0 truncated", "64 ids, 64 stored, 0 rejected, 0 truncated"], lines
    assert "doc-0" not in log, "no document id in the worker's INFO log"
