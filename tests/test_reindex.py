"""Background re-indexing end to end: real Redis, a real worker, real Milvus Lite, the tiny checkpoint.

The worker exposes its Prometheus metrics, so "no batch is encoded twice" is counted, not assumed.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest

from producer import reindex
from producer.cli import main as cli_main
from producer.client import Client
from producer.contract import milvus
from producer.reindex import batches as reindex_batches
from producer.reindex import checkpoint, versions
from producer.reindex import lock as driver_lock
from producer.status import collect, render
from tests.conftest import ROOT, WorkerProcess, free_port, make_settings, settings_env, wait_for
from worker import sink

N_SWITCH = 5000
"""Documents re-indexed under a search loop (the issue's 5,000: about 10 s with the tiny model)."""
N_RESUME = 1000
RESUME_BATCH = 50


@pytest.fixture(scope="module")
def worker(tmp_path_factory, redis_client, milvus_server):
    """One worker on the tiny model writing to the session's Milvus Lite, with its metrics endpoint on."""
    s = make_settings(milvus_uri=milvus_server, metrics_port=free_port())
    w = WorkerProcess(s, tmp_path_factory.mktemp("reindex") / "worker.log").wait_ready()
    yield w
    w.stop()


@pytest.fixture
def mc(worker):
    client = milvus.connect(worker.settings)
    yield client
    client.close()


def metric(s, name: str, **labels: str) -> float:
    """One sample of the worker's Prometheus endpoint (0 when not yet exported)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and _labels(line) == want:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _labels(line: str) -> str:
    inner = line[line.index("{") + 1:line.index("}")]
    return ",".join(sorted(p for p in inner.split(",") if p))


def encoded(s) -> tuple[float, float]:
    """(documents encoded, index jobs that succeeded) so far on the worker."""
    return (metric(s, "m3q_texts_total", kind="documents"),
            metric(s, "m3q_jobs_total", outcome="ok", task="m3q.index_documents"))


def unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def write_jsonl(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def lock_key(s, job_id: str) -> str:
    """The job's driver lock (see producer/reindex/lock.py)."""
    return reindex.job_key(s, job_id) + ":driver"


def job_keys(r, s, job_id: str) -> list[bytes]:
    """Every Redis key of a job that exists now: its hash, the sets and lists beside it, its target's reservation."""
    target = reindex.get_job(s, job_id)["target"]
    return r.keys(reindex.job_key(s, job_id) + "*") + r.keys(checkpoint.target_key(s, target))


def failed_job(s, tmp_path, monkeypatch) -> str:
    """A job of 12 rows whose target is made for the wrong dense size, so the worker refuses batch 0: it
    is marked failed. Dropping its target is the fix, after which a resume finishes it."""
    source = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"id": f"f{i}", "text": f"text {i}"}) for i in range(12)])
    real = versions.reserve_target

    def reserve_and_break(cp, client, *args):
        name = real(cp, client, *args)
        sink.ensure_collection(client, name, 33, "another-model")
        return name
    monkeypatch.setattr(versions, "reserve_target", reserve_and_break)
    with pytest.raises(reindex.ReindexFailed, match="batch 0 .*rows 1..4.*resume") as failed:
        reindex.start_reindex(s, str(source), "fail_" + uuid.uuid4().hex[:8], job_id=f"j{uuid.uuid4().hex[:8]}",
                              progress=False)
    monkeypatch.undo()
    return str(failed.value).split(":")[0].split()[-1]


@pytest.mark.slow
def test_alias_switches_in_one_step_under_searches(worker, mc):
    """The first collection holds random vectors, so its top hits differ from the re-encoded collection's:
    every search through the alias must return exactly the old or exactly the new top hits."""
    s, alias = worker.settings, "live_" + uuid.uuid4().hex[:8]
    dim = Client(s).dims()["dense"]
    rng = np.random.default_rng(0)
    first = f"{alias}_v1"
    sink.ensure_collection(mc, first, dim, "random-vectors")
    sink.upsert(mc, first, [{"id": f"doc-{i:05d}", "text": f"document {i} on topic {i % 37}",
                               "dense": unit(rng, dim), "sparse": {7: 0.1}, "metadata": {"i": i}}
                              for i in range(N_SWITCH)])
    mc.create_alias(first, alias)
    query = unit(rng, dim)
    top = lambda name: tuple(h.id for h in milvus.search(mc, name, query, None, mode="dense", k=5))
    old_top = top(first)

    seen, errors, stop = [], [], threading.Event()

    def search_loop():
        client = milvus.connect(s)
        while not stop.is_set():
            try:
                seen.append(tuple(h.id for h in milvus.search(client, alias, query, None, mode="dense", k=5)))
            except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(repr(e))
        client.close()

    searcher = threading.Thread(target=search_loop)
    searcher.start()
    try:
        report = reindex.start_reindex(s, f"milvus:{first}", alias, progress=False)
        after = len(seen)
        deadline = time.monotonic() + 10
        while len(seen) < after + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        searcher.join()

    new_top = top(report.target)
    assert report.target == f"{alias}_v2" and report.state == "switched" and report.switched
    assert report.count == report.stored == report.total == N_SWITCH and not report.rejected
    assert mc.describe_alias(alias)["collection_name"] == report.target
    assert errors == []
    assert old_top != new_top
    assert set(seen) <= {old_top, new_top}, "a search saw neither the old nor the new index"
    assert seen[0] == old_top and seen[-1] == new_top and len(seen) > 10
    (row,) = mc.query(report.target, filter='id == "doc-00042"', output_fields=["text", "metadata"])
    assert row["text"] == "document 42 on topic 5" and row["metadata"] == {"i": 42}
    assert mc.has_collection(first)  # kept without --drop-old

    code = cli_main(["reindex", "--drop-old", "--into", alias, "--broker-url", s.broker_url,
                     "--queue-prefix", s.queue_prefix, "--milvus-uri", s.milvus_uri])
    assert code == 0 and not mc.has_collection(first) and mc.has_collection(report.target)


def test_killed_driver_resumes_without_encoding_a_batch_twice(worker, mc, tmp_path, redis_client):
    """SIGKILL the CLI driver after some batches, resume: the count is exact and the worker's counters
    show each batch encoded once. The design's bound: a batch whose send the kill interrupted may be
    encoded twice (``unconfirmed_resends``, at most 1 per kill); any other batch exactly once.
    The dead driver's lock refuses a resume until it expires (shortened here from DRIVER_LOCK_TTL_S)."""
    s = worker.settings.replace(job_texts=RESUME_BATCH)
    batches = N_RESUME // RESUME_BATCH
    alias, job_id = "resume_" + uuid.uuid4().hex[:8], uuid.uuid4().hex[:12]
    source = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"id": f"r{i}", "text": f"row {i} of the corpus"})
                                                   for i in range(N_RESUME)])
    texts_before, jobs_before = encoded(s)
    cmd = [sys.executable, "-m", "producer.cli", "reindex", "--from", str(source), "--into", alias,
           "--job-id", job_id, "--rate-limit", "150", "--no-progress"]
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(cmd, env=settings_env(s), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _batches_done(s, job_id) >= 4, 60, driver)
    finally:
        driver.kill()
        driver.wait()
        log.close()
    killed = reindex.get_job(s, job_id)
    assert killed["state"] == "running" and 4 <= killed["batches_done"] < batches
    with pytest.raises(reindex.DriverBusy, match=f"re-index {job_id} .*:pid{driver.pid}:"):
        reindex.resume_reindex(s, job_id, rate_limit_docs_s=0, progress=False)
    redis_client.pexpire(lock_key(s, job_id), 1)  # as if its TTL had run out
    wait_for(lambda: not redis_client.exists(lock_key(s, job_id)), 5, "the dead driver's lock expires")

    report = reindex.resume_reindex(s, job_id, rate_limit_docs_s=0, progress=False)
    job = reindex.get_job(s, job_id)
    assert report.switched and report.count == report.stored == N_RESUME and job["done"] == N_RESUME
    assert job["batches_done"] == batches and job["unconfirmed_resends"] <= 1
    twice = job["unconfirmed_resends"]
    if twice:
        time.sleep(2)  # the cut send may still be running on the worker
    texts, jobs = (a - b for a, b in zip(encoded(s), (texts_before, jobs_before)))
    assert N_RESUME <= texts <= N_RESUME + twice * RESUME_BATCH
    assert batches <= jobs <= batches + twice


def _batches_done(s, job_id: str) -> int:
    try:
        return reindex.get_job(s, job_id)["batches_done"]
    except ValueError:
        return 0


def _wait_for(condition, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"driver exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_rejected_rows_are_listed_and_block_the_switch_until_allowed(worker, mc, tmp_path, redis_client):
    s = worker.settings
    alias = "rej_" + uuid.uuid4().hex[:8]
    good = [json.dumps({"id": f"g{i}", "text": f"good row {i}"}) for i in range(8)]
    source = write_jsonl(tmp_path / "bad.jsonl", good[:3] + [json.dumps({"id": "empty", "text": ""}), "{not json"]
                         + good[3:6] + [json.dumps({"id": "notext"})] + good[6:])
    report = reindex.start_reindex(s, str(source), alias, progress=False)
    assert report.state == "done" and not report.switched and report.count == report.stored == 8
    reasons = dict(report.rejected)
    assert sorted(reasons) == [4, 5, 9]
    assert "empty" in reasons[4] and "not JSON" in reasons[5] and "'text'" in reasons[9]
    assert milvus.alias_target(mc, alias) is None
    assert 0 < redis_client.ttl(reindex.job_key(s, report.job_id)) <= reindex.FINISHED_KEPT_S  # done is final
    assert "RE-INDEX JOBS" in render(collect(s)) and report.job_id in render(collect(s))

    before = encoded(s)
    again = reindex.resume_reindex(s, report.job_id, allow_rejects=True, progress=False)
    assert again.switched and again.target == report.target and again.count == 8
    assert mc.describe_alias(alias)["collection_name"] == report.target
    assert encoded(s) == before  # switching re-encodes nothing


def test_failed_batch_marks_the_job_failed_and_resume_finishes_it(worker, mc, tmp_path, monkeypatch):
    """The target is made for the wrong dense size, so the worker refuses every batch; once the
    collection is fixed, the resumed job stores everything."""
    s = worker.settings.replace(job_texts=4)
    job_id = failed_job(s, tmp_path, monkeypatch)
    job = reindex.get_job(s, job_id)
    assert job["state"] == "failed" and "batch 0" in job["error"] and "dim 33" in job["error"]
    assert milvus.alias_target(mc, job["alias"]) is None

    mc.drop_collection(job["target"])  # the fix: the worker recreates it with the model's size
    report = reindex.resume_reindex(s, job_id, progress=False)
    assert report.switched and report.count == 12 and reindex.get_job(s, job_id)["error"] == ""


def test_background_job_is_polled_from_another_thread(worker, tmp_path):
    """What a web app does: start in a thread, poll done/total, rate and ETA until the switch."""
    s = worker.settings.replace(job_texts=20)
    source = write_jsonl(tmp_path / "docs.jsonl",
                         [json.dumps({"id": f"b{i}", "text": f"text {i}"}) for i in range(200)])
    job_id = reindex.start_in_background(s, str(source), "bg_" + uuid.uuid4().hex[:8], rate_limit_docs_s=300)
    polls = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        polls.append(reindex.get_job(s, job_id))
        if polls[-1]["state"] in ("switched", "failed"):
            break
        time.sleep(0.05)
    assert polls[-1]["state"] == "switched", polls[-1].get("error")
    assert polls[-1]["done"] == polls[-1]["total"] == polls[-1]["stored"] == 200
    running = [p for p in polls if p["state"] == "running" and 0 < p["done"] < 200]
    assert running and all(p["rate"] > 0 and p["eta_s"] > 0 for p in running)
    assert job_id in [j["id"] for j in reindex.list_jobs(s)]


# ---- one driver per job; finished jobs expire ------------------------------------------------------------

def cli_settings(s) -> list[str]:
    return ["--broker-url", s.broker_url, "--queue-prefix", s.queue_prefix, "--milvus-uri", s.milvus_uri]


def test_a_second_driver_fails_at_once_naming_the_job_and_its_holder(worker, tmp_path, redis_client, capsys):
    """While a background thread drives a job, every other way to drive it (resume, start with its id,
    the CLI) is refused at once and changes nothing; the worker's counters show every batch sent once.
    Once the first driver is done, resume and get_job behave as before."""
    s, n = worker.settings.replace(job_texts=10), 300
    alias = "lock_" + uuid.uuid4().hex[:8]
    source = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"id": f"l{i}", "text": f"text {i}"}) for i in range(n)])
    before = encoded(s)
    job_id = reindex.start_in_background(s, str(source), alias, rate_limit_docs_s=100)  # about 3 s
    wait_for(lambda: reindex.get_job(s, job_id)["state"] == "running", 30, "the job runs")
    busy = f"re-index {job_id} is already being driven by {re.escape(socket.gethostname())}:pid{os.getpid()}:"

    with pytest.raises(reindex.DriverBusy, match=busy):
        reindex.resume_reindex(s, job_id, rate_limit_docs_s=0, progress=False)
    with pytest.raises(reindex.DriverBusy, match=busy):
        reindex.start_in_background(s, str(source), alias, job_id=job_id)
    with pytest.raises(reindex.DriverBusy, match=busy):
        reindex.start_reindex(s, str(source), alias, job_id=job_id, progress=False)
    assert cli_main(["reindex", "--resume", job_id, "--no-progress", *cli_settings(s)]) == 2
    assert re.search(f"^m3q reindex: {busy}", capsys.readouterr().err)
    job = reindex.get_job(s, job_id)
    assert job["state"] == "running" and job["rate_limit_docs_s"] == 100 and job["done"] < n

    wait_for(lambda: not redis_client.exists(lock_key(s, job_id)), 60, "the first driver finishes")
    job = reindex.get_job(s, job_id)
    assert job["state"] == "switched" and job["done"] == job["stored"] == n and job["error"] == ""
    assert tuple(a - b for a, b in zip(encoded(s), before)) == (n, n // 10)
    report = reindex.resume_reindex(s, job_id, progress=False)
    assert report.switched and report.count == n and encoded(s)[0] - before[0] == n


def test_a_dead_drivers_lock_blocks_until_it_expires_then_resume_works(worker, mc, tmp_path, monkeypatch,
                                                                       redis_client):
    s = worker.settings.replace(job_texts=4)
    job_id = failed_job(s, tmp_path, monkeypatch)
    mc.drop_collection(reindex.get_job(s, job_id)["target"])  # the fix
    redis_client.set(lock_key(s, job_id), "gone-host:pid4242:0123abcd", px=1500)  # a driver that died

    refused = f"re-index {job_id} .*gone-host:pid4242:.*expires in 1\\.[0-5] s"
    with pytest.raises(reindex.DriverBusy, match=refused):
        reindex.resume_reindex(s, job_id, progress=False)
    assert reindex.get_job(s, job_id)["state"] == "failed" and redis_client.pttl(lock_key(s, job_id)) > 0
    wait_for(lambda: not redis_client.exists(lock_key(s, job_id)), 5, "the dead driver's lock expires")
    report = reindex.resume_reindex(s, job_id, progress=False)
    assert report.switched and report.count == 12 and not redis_client.exists(lock_key(s, job_id))


def test_a_driver_that_loses_its_lock_stops_sending_and_fails_the_job(worker, tmp_path, monkeypatch, redis_client):
    """The lock's key vanishes under a running driver (as after a Redis flush or a missed renewal): its
    heartbeat finds out, the driver sends no further batch and marks the job failed. The resume awaits the
    batches that were in flight by their task ids, so the worker still encodes each batch once."""
    monkeypatch.setattr(driver_lock, "DRIVER_LOCK_TTL_S", 1.5)  # renewed every 0.5 s
    s, n = worker.settings.replace(job_texts=10), 300
    source = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"id": f"x{i}", "text": f"text {i}"}) for i in range(n)])
    before = encoded(s)
    job_id = reindex.start_in_background(s, str(source), "lost_" + uuid.uuid4().hex[:8], rate_limit_docs_s=100)
    wait_for(lambda: _batches_done(s, job_id) >= 3, 30, "three batches are done")
    redis_client.delete(lock_key(s, job_id))

    wait_for(lambda: reindex.get_job(s, job_id)["state"] == "failed", 5, "the driver gives the job up")
    error = reindex.get_job(s, job_id)["error"]
    assert "lost its lock (its key expired or was deleted) and stopped sending batches" in error
    tasks = reindex.job_key(s, job_id) + ":tasks"
    sent = redis_client.hlen(tasks)
    time.sleep(1.0)  # at 100 docs/s a driver still sending would send 10 batches in this time
    assert redis_client.hlen(tasks) == sent < n // 10

    report = reindex.resume_reindex(s, job_id, rate_limit_docs_s=0, progress=False)
    assert report.switched and report.count == report.stored == n
    assert tuple(a - b for a, b in zip(encoded(s), before)) == (n, n // 10)


def test_finished_jobs_keys_expire_and_failed_ones_are_kept(worker, mc, tmp_path, monkeypatch, redis_client):
    s = worker.settings.replace(job_texts=4)
    job_id = failed_job(s, tmp_path, monkeypatch)
    key, target = reindex.job_key(s, job_id), reindex.get_job(s, job_id)["target"]
    kept = job_keys(redis_client, s, job_id)
    assert {key, key + ":tasks", key + ":sent", checkpoint.target_key(s, target)} <= {k.decode() for k in kept}
    assert [redis_client.ttl(k) for k in kept] == [-1] * len(kept), "a failed job is kept: it can be resumed"

    mc.drop_collection(target)
    assert reindex.resume_reindex(s, job_id, progress=False).switched
    finished = job_keys(redis_client, s, job_id)
    assert {key, key + ":batches", key + ":tasks", checkpoint.target_key(s, target)} <= {k.decode() for k in finished}
    assert all(0 < redis_client.ttl(k) <= reindex.FINISHED_KEPT_S for k in finished)

    for k in finished:  # their expiry, brought forward: list_jobs forgets the job and drops it from its index
        redis_client.pexpire(k, 1)
    wait_for(lambda: not redis_client.exists(key), 5, "the keys expire")
    assert job_id not in [j["id"] for j in reindex.list_jobs(s)]
    assert not redis_client.sismember(f"{s.queue_prefix}:reindex-jobs", job_id)


def test_an_error_outside_a_batch_marks_the_job_failed_and_resume_finishes_it(worker, mc, tmp_path, monkeypatch):
    # Not a batch's failure: the source goes away part-way (injected). The checkpoint says failed, with why.
    s = worker.settings.replace(job_texts=20)
    source = write_jsonl(tmp_path / "docs.jsonl",
                         [json.dumps({"id": f"e{i}", "text": f"text {i}"}) for i in range(100)])
    real = reindex_batches.read_documents

    def source_lost_after_60(*args):
        for n, doc in enumerate(real(*args)):
            if n == 60:
                raise OSError("the source disk went away")
            yield doc
    monkeypatch.setattr(reindex_batches, "read_documents", source_lost_after_60)
    job_id = f"j{uuid.uuid4().hex[:8]}"
    with pytest.raises(OSError, match="disk went away"):
        reindex.start_reindex(s, str(source), "lost_" + uuid.uuid4().hex[:8], job_id=job_id, progress=False)
    job = reindex.get_job(s, job_id)
    assert job["state"] == "failed" and "OSError: the source disk went away" in job["error"]

    monkeypatch.undo()
    report = reindex.resume_reindex(s, job_id, progress=False)
    assert report.switched and report.count == 100


def test_a_job_that_never_started_is_refused_by_resume_with_the_way_out(worker, redis_client):
    # A background start whose process died before it created the job leaves it "starting" with no driver.
    s = worker.settings
    job_id = f"j{uuid.uuid4().hex[:8]}"
    redis_client.hset(reindex.job_key(s, job_id),
                      mapping={"state": "starting", "source": "docs.jsonl", "alias": "docs"})
    with pytest.raises(ValueError, match=f"{job_id} never started.*start it again with `m3q reindex docs.jsonl docs`"):
        reindex.resume_reindex(s, job_id, progress=False)
