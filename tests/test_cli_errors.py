"""A newcomer's mistakes, through the real `m3q` CLI (issue 14, part B): each one answered in one line with
the way out, no traceback, nothing lost. Real Redis, a real worker, real Milvus Lite, the tiny checkpoint."""
from __future__ import annotations

import csv
import gzip
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from producer import reindex
from producer.cli import build_parser
from producer.contract import milvus
from producer.milvus_lite import port_open
from producer.status import collect, render
from tests.conftest import ROOT, TINY, WorkerProcess, free_port, make_settings, settings_env, wait_for
from worker import sink

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def worker(tmp_path_factory, redis_client, milvus_server):
    s = make_settings(milvus_uri=milvus_server)
    w = WorkerProcess(s, tmp_path_factory.mktemp("cli-errors") / "worker.log").wait_ready()
    yield w
    w.stop()


@pytest.fixture
def mc(worker):
    client = milvus.connect(worker.settings)
    yield client
    client.close()


def name() -> str:
    return "c" + uuid.uuid4().hex[:10]


def m3q(s, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=settings_env(s), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S, input=stdin)


# A suite run as a background job (`cmd &` without job control) inherits an ignored SIGINT, and a Python that
# starts with SIGINT ignored never turns it into KeyboardInterrupt: the command gets a terminal's first. Done
# in the command's own interpreter, not with preexec_fn: Python code between fork and exec in this process,
# which holds gRPC threads (the Milvus client), once left `m3q index` stuck at its start.
AS_FROM_A_TERMINAL = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "runpy.run_module('producer.cli', run_name='__main__', alter_sys=True)")


def spawn(s, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL, *args], env=settings_env(s), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit 2 and exactly one stderr line (no traceback) holding every needle."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def docs_file(path: Path, n: int, prefix: str = "d") -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": f"document {i} about topic {i % 7}"}) + "\n"
                            for i in range(n)))
    return path


# ---- item 4: reindex into a collection ------------------------------------------------------------------

def test_reindex_into_a_collection_is_refused_before_encoding_and_adopt_turns_it_into_a_version(worker, mc, tmp_path):
    docs = name()
    source = docs_file(tmp_path / "corpus.jsonl", 30)
    assert m3q(worker.settings, "index", str(source), "--collection", docs).returncode == 0
    jobs_before = {j["id"] for j in reindex.list_jobs(worker.settings)}

    started = time.monotonic()
    refused = m3q(worker.settings, "reindex", "--from", str(source), "--into", docs, "--no-progress")
    one_line_error(refused, f"'{docs}' is a collection, not an alias", "--adopt", "nothing was encoded")
    assert time.monotonic() - started < 30
    assert not [c for c in mc.list_collections() if c.startswith(docs + "_v")]  # no orphan docs_v1
    assert {j["id"] for j in reindex.list_jobs(worker.settings)} == jobs_before  # no job shown "done"

    adopted = m3q(worker.settings, "reindex", "--from", str(source), "--into", docs, "--adopt", "--no-progress")
    assert adopted.returncode == 0, adopted.stdout + adopted.stderr
    assert f"alias now points to {docs}_v2 (was {docs}_v1)" in adopted.stdout
    assert milvus.count(mc, f"{docs}_v1") == 30 and milvus.count(mc, f"{docs}_v2") == 30
    assert mc.describe_alias(docs)["collection_name"] == f"{docs}_v2"


def test_adopt_alone_puts_an_alias_in_front_of_a_collection_and_searches_go_on(worker, mc, tmp_path):
    docs = name()
    assert m3q(worker.settings, "index", str(docs_file(tmp_path / "c.jsonl", 5)), "--collection", docs).returncode == 0
    done = m3q(worker.settings, "reindex", "--into", docs, "--adopt")
    assert done.returncode == 0 and f"{docs} is now an alias of {docs}_v1" in done.stdout, done.stdout + done.stderr
    assert mc.describe_alias(docs)["collection_name"] == f"{docs}_v1"
    found = m3q(worker.settings, "search", "document 3", "--collection", docs, "--mode", "dense", "--k", "5")
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 5, found.stdout + found.stderr


# ---- item 6: no traceback from search, index of a directory ---------------------------------------------

def test_search_of_a_missing_collection_is_one_line_naming_m3q_index(worker):
    done = m3q(worker.settings, "search", "x", "--collection", "nosuch")
    one_line_error(done, "collection 'nosuch' does not exist", "m3q index")
    assert "_log_rpc_error" not in done.stderr


@pytest.mark.parametrize("dim, model", [(33, "tiny-bge-m3"), (None, "someone/else-model")])
def test_search_of_a_collection_of_another_dimension_or_model_is_refused_like_index(worker, mc, dim, model):
    collection = name()
    from producer.client import Client

    sink.ensure_collection(mc, collection, dim or Client(worker.settings).dims()["dense"], model)
    done = m3q(worker.settings, "search", "x", "--collection", collection)
    line = one_line_error(done, collection, model, "expected tiny-bge-m3")
    assert "matmul" not in done.stderr and (dim is None or "dim 33" in line)


def test_index_of_a_directory_is_one_line(worker, tmp_path):
    one_line_error(m3q(worker.settings, "index", str(tmp_path), "--collection", name()), "is a directory")


# ---- item 7: bad bytes ----------------------------------------------------------------------------------

def test_an_invalid_utf8_line_in_jsonl_is_one_reject_naming_file_and_line(worker, mc, tmp_path):
    collection = name()
    lines = [json.dumps({"id": f"u{i}", "text": f"text {i}"}).encode() for i in range(300)]
    lines[199] = b'{"id": "u199", "text": "bad \xff byte"}'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    done = m3q(worker.settings, "index", str(path), "--collection", collection)
    assert done.returncode == 0, done.stderr
    assert "stored 299 of 300 documents; rejected 1" in done.stdout
    assert "row 200: bad.jsonl:200: line 200 is not valid UTF-8" in done.stdout
    assert "300/300" in done.stderr  # the bar counts the rows
    assert milvus.count(mc, collection) == 299


def test_an_invalid_utf8_line_in_text_and_csv_is_one_reject(worker, mc, tmp_path):
    text = tmp_path / "bad.txt"
    text.write_bytes(b"first line\nbad \xc3\x28 line\nthird \r line\n\nfourth\n")
    done = m3q(worker.settings, "index", str(text), "--collection", name())
    assert "stored 3 of 4 documents; rejected 1" in done.stdout, done.stdout + done.stderr
    assert "row 2: bad.txt:2: line 2 is not valid UTF-8" in done.stdout and "4/4" in done.stderr
    table = tmp_path / "bad.csv"
    table.write_bytes(b'id,text\na,"one"\nb,"two \xff"\nc,"three\nlines"\n')
    done = m3q(worker.settings, "index", str(table), "--collection", name())
    assert "stored 2 of 3 documents; rejected 1" in done.stdout, done.stdout + done.stderr
    assert "bad.csv:3: line 3 is not valid UTF-8" in done.stdout and "3/3" in done.stderr


@pytest.mark.parametrize("kind, content, needle", [
    ("random.bin", os.urandom(20_000), "is binary"),
    ("corpus.jsonl.gz", gzip.compress(b'{"text": "x"}\n'), "gzip-compressed: decompress it first (gunzip)"),
    ("corpus.jsonl", gzip.compress(b'{"text": "x"}\n'), "gzip-compressed"),
    ("corpus.parquet", b"not parquet\n", "is not a Parquet file"),
])
def test_a_file_that_is_not_text_is_refused_up_front_naming_the_format(worker, mc, tmp_path, kind, content, needle):
    collection = name()
    path = tmp_path / kind
    path.write_bytes(content)
    one_line_error(m3q(worker.settings, "index", str(path), "--collection", collection), str(path), needle)
    assert not mc.has_collection(collection)


def test_a_missing_text_column_is_one_error_listing_the_columns(worker, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["id", "body"], ["a", "x"], ["b", "y"]])
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "t.parquet")
    for path in (table, tmp_path / "t.parquet"):
        done = m3q(worker.settings, "index", str(path), "--collection", name())
        one_line_error(done, "no 'text' column", "'id', 'body'", "--text-field")
    done = m3q(worker.settings, "index", str(table), "--collection", name(), "--text-field", "body")
    assert done.returncode == 0 and "stored 2 of 2" in done.stdout, done.stdout + done.stderr


def test_json_errors_are_whole_sentences(worker, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "unterminated\n')
    done = m3q(worker.settings, "index", str(path), "--collection", name())
    assert "row 2: broken.jsonl:2: line 2 is not JSON: Unterminated string starting at column 21" in done.stdout
    out = m3q(worker.settings, "encode", "--local", stdin='{"text": "open')  # the last line, without its newline
    assert json.loads(out.stdout)["error"] == "line 1 is not JSON: Unterminated string starting at column 10"


# ---- item 8: interruptions -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_index_prints_what_was_stored_and_nothing_is_lost(worker, mc, tmp_path, sig):
    collection, n = name(), 4000
    source = docs_file(tmp_path / "big.jsonl", n)
    slow = worker.settings.replace(job_texts=8, max_in_flight=1)
    proc = spawn(slow, "index", str(source), "--collection", collection)
    # Over one job stored: with one job in flight the second is sent only once the first one's result is
    # back, so the summary's count (results received, not rows in Milvus) is above zero.
    try:
        wait_for(lambda: mc.has_collection(collection) and milvus.count(mc, collection) > slow.job_texts, 120,
                   "two batches stored")
    except AssertionError as e:
        proc.kill()
        raise AssertionError(f"{e}; m3q index said: {proc.communicate()[1][-3000:]}") from None
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("m3q index: interrupted: stored ")]
    assert len(line) == 1 and f" of {n} documents so far" in line[0] and "same command again" in line[0], err
    stored = int(line[0].split("stored ")[1].split()[0])
    assert 0 < stored < n
    again = m3q(worker.settings, "index", str(source), "--collection", collection)
    assert again.returncode == 0 and milvus.count(mc, collection) == n
    assert "skipped (unchanged)" in again.stdout, again.stdout  # what the first run stored is not encoded again


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_reindex_prints_the_resume_line_and_status_says_interrupted(worker, mc, tmp_path, sig):
    alias, job_id, n = name(), "j" + uuid.uuid4().hex[:8], 600
    source = docs_file(tmp_path / "re.jsonl", n)
    slow = worker.settings.replace(job_texts=10)
    proc = spawn(slow, "reindex", "--from", str(source), "--into", alias, "--job-id", job_id, "--rate-limit", "100",
                 "--no-progress")
    wait_for(lambda: _job(slow, job_id).get("done", 0) > 0, 60, "the first batch is recorded")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, out + err
    assert f"re-index {job_id} interrupted" in err and f"`m3q reindex --resume {job_id}`" in err
    shown = render(collect(slow))
    assert f"{job_id}  interrupted" in shown and "eta=" not in shown and f"--resume {job_id}" in shown
    resumed = m3q(slow, "reindex", "--resume", job_id, "--rate-limit", "0", "--no-progress")
    assert resumed.returncode == 0 and "switched" in resumed.stdout, resumed.stdout + resumed.stderr
    assert milvus.count(mc, alias) == n


def test_a_killed_reindex_driver_shows_interrupted_once_its_lock_expires(worker, tmp_path, redis_client):
    alias, job_id = name(), "j" + uuid.uuid4().hex[:8]
    source = docs_file(tmp_path / "re.jsonl", 400)
    slow = worker.settings.replace(job_texts=10)
    proc = spawn(slow, "reindex", "--from", str(source), "--into", alias, "--job-id", job_id, "--rate-limit", "50",
                 "--no-progress")
    wait_for(lambda: _job(slow, job_id).get("done", 0) > 0, 60, "the first batch is recorded")
    proc.kill()
    proc.wait()
    assert f"{job_id}  running" in render(collect(slow))  # its lock lives on for up to DRIVER_LOCK_TTL_S
    redis_client.pexpire(reindex.job_key(slow, job_id) + ":driver", 1)  # ...and then lapses
    time.sleep(0.05)
    shown = render(collect(slow))
    assert f"{job_id}  interrupted" in shown and "eta=" not in shown and f"--resume {job_id}" in shown


def _job(s, job_id: str) -> dict:
    try:
        return reindex.get_job(s, job_id, rejects=0)
    except ValueError:
        return {}


def test_encode_answers_each_line_as_it_is_typed(worker):
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "encode", "--local"], cwd=ROOT, text=True,
                            env=settings_env(worker.settings), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for i in range(2):
            proc.stdin.write(json.dumps({"id": f"q{i}", "text": f"line {i}"}) + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "no answer while stdin is still open"
            assert json.loads(proc.stdout.readline())["id"] == f"q{i}"
    finally:
        proc.stdin.close()
        proc.wait(30)
    assert proc.returncode == 0


# ---- item 9: SIGTERM stops what a command started --------------------------------------------------------

def _pids_with(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_sigterm_on_m3q_milvus_stops_the_server(tmp_path):
    port, data = free_port(), tmp_path / "milvus-data"
    s = make_settings(milvus_port=port, milvus_data_dir=str(data))
    proc = spawn(s, "milvus")
    wait_for(lambda: port_open("127.0.0.1", port), 60, "the server answers")
    assert _pids_with(str(data))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    wait_for(lambda: not _pids_with(str(data)), 15, "milvus-lite server is gone")
    assert not port_open("127.0.0.1", port)


@pytest.mark.slow
def test_sigterm_on_m3q_demo_stops_the_worker_and_milvus(tmp_path, redis_client):
    port, data = free_port(), tmp_path / "demo-milvus"
    s = make_settings(milvus_port=port, milvus_data_dir=str(data), model=str(TINY))
    proc = spawn(s, "demo")
    wait_for(lambda: redis_client.keys(f"{s.queue_prefix}:worker:*"), 120, "the demo's worker is up")
    (worker_pid,) = [json.loads(redis_client.get(k))["pid"] for k in redis_client.keys(f"{s.queue_prefix}:worker:*")]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    log = out.split("(log: ", 1)[1].split(",", 1)[0]
    assert not Path(log).exists()  # the worker's log went with it
    wait_for(lambda: not Path(f"/proc/{worker_pid}").exists(), 15, "the worker is gone")
    wait_for(lambda: not _pids_with(str(data)), 15, "milvus-lite server is gone")


# ---- items 10 and 13: noise, help, version ---------------------------------------------------------------

def test_a_worker_start_prints_no_duplicate_task_warnings(worker):
    assert " ready." in worker.output() and "DuplicateTaskNameWarning" not in worker.output()


@pytest.mark.parametrize("variable, value, needle", [
    ("M3Q_DEAD_WORKER_S", "0", "it must be above 0"),  # a heartbeat every 0 s would spin
    ("M3Q_JOB_TEXTS", "-3", "it must be at least 1"),
    ("M3Q_METRICS_PORT", "70000", "it must be at most 65535"),
])
def test_a_setting_out_of_range_is_one_line_naming_it(variable, value, needle):
    for command in (["status"], ["worker", "--device", "cpu"]):  # the worker, before it loads the model
        done = subprocess.run([sys.executable, "-m", "producer.cli", *command], env={**os.environ, variable: value},
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
        one_line_error(done, variable, needle)


def test_each_commands_own_options_come_first_with_help_and_settings_are_grouped():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public walk
    for command, sub in commands.items():
        own = [a for g in sub._action_groups if not g.title.startswith("settings") for a in g._group_actions]
        assert all(a.help for a in own), (command, [a.dest for a in own if not a.help])
        text = sub.format_help()
        setting = "--milvus-uri" if command == "milvus" else "--broker-url"  # a setting the command reads
        if command == "replica":  # reads no setting: no settings group
            assert "settings (" not in text
            continue
        assert "settings (also M3Q_* variables):" in text and setting in text.split("settings (")[1]
        assert setting not in text.split("settings (")[0] and setting not in sub.format_usage()
    assert "Exit status: 0 when at least one document was stored" in " ".join(commands["index"].format_help().split())
    done = subprocess.run([sys.executable, "-m", "producer.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("m3q 0.")


IDLE_S = 150
"""Idle time after which Milvus Lite answered pymilvus' default 10 s keepalive with GOAWAY (about 2 min)."""


@pytest.mark.skipif(not os.environ.get("M3Q_SLOW_TESTS"), reason=f"idles {IDLE_S} s; set M3Q_SLOW_TESTS=1")
def test_an_idle_milvus_client_gets_no_goaway_too_many_pings(milvus_server):
    script = ("import sys, time\nfrom producer import milvus\nfrom producer.contract.settings import Settings\n"
              f"c = milvus.connect(Settings(milvus_uri={milvus_server!r}))\ntime.sleep({IDLE_S})\n"
              "print(c.list_collections() is not None)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=IDLE_S + 60, env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    assert "too_many_pings" not in done.stderr and "GOAWAY" not in done.stderr
