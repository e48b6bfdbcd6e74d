"""Redis Sentinel: the URL forms, then failovers of a real stack (a primary, a replica, three Sentinels; see
producer.devstack.SentinelStack) under real workers, producers, the gateway and Milvus Lite. Each failover is
a SIGKILL of the primary: the Sentinels promote the replica about 2 s later (down-after 1 s, then the vote)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis as redis_py

from producer import reindex
from producer.client import Client
from producer.contract import milvus, redis_conn, stream, wire
from producer.contract.errors import ConfigError, InfraError
from producer.contract.settings import Settings
from producer.devstack import RedisServer, SentinelStack
from tests.conftest import ROOT, GatewayProcess, make_settings, settings_env, wait_for
from tests.test_faults import make_certificates

MASTER = "m3qtest"
QUERY_S = 30.0
"""How long the query load runs; the primary is killed a third of the way in."""


# ---- the URL forms ------------------------------------------------------------------------------------------

def test_a_sentinel_url_is_read_as_kombu_and_celery_read_it():
    where = redis_conn.parse_sentinel("sentinel://:s3cret@h1:26380;sentinel://h2;sentinel://h3:26381/0")
    assert where.nodes == (("h1", 26380), ("h2", 26379), ("h3", 26381))
    assert (where.db, where.password, where.username) == (0, "s3cret", None)
    assert redis_conn.parse_sentinel("sentinel://u:p%40ss@h1:1/4;sentinel://h2:2/4").db == 4


@pytest.mark.parametrize("url, problem", [
    ("sentinel://h1:26379;sentinel://h2:26379/3", "database is read from the first address"),
    ("sentinel://:pw@h1:26379;redis://h2:6379", "address 2 is not sentinel://"),
    ("sentinel://:pw@h1:port", "port is not a number"),
    ("sentinel://h1:26379/zero", "database 'zero' is not a number"),
])
def test_a_bad_sentinel_url_is_one_line_naming_the_variable_without_its_password(url, problem):
    with pytest.raises(ConfigError, match="M3Q_BROKER_URL") as error:
        Settings(broker_url=url)
    assert problem in str(error.value) and "pw" not in str(error.value)


def test_celery_gets_the_master_name_and_the_sentinels_password_for_broker_and_backend():
    s = Settings(broker_url="sentinel://h1:26379;sentinel://h2:26379/0", sentinel_master="cache",
                 sentinel_password="pw", result_backend="redis://other:6379/1")
    config = wire.celery_config(s)
    broker, backend = config["broker_transport_options"], config["result_backend_transport_options"]
    assert broker["master_name"] == "cache" and broker["sentinel_kwargs"]["password"] == "pw"
    assert "master_name" not in backend, "a redis:// result backend is one Redis, not Sentinel's"
    assert broker["visibility_timeout"] == backend["visibility_timeout"] == s.visibility_timeout_s
    assert "pw" not in repr(s)
    plain = wire.celery_config(Settings())
    assert "master_name" not in plain["broker_transport_options"] and "broker_use_ssl" not in plain


def test_sentinel_tls_reaches_the_sentinels_and_the_primary_with_certificate_checks():
    s = Settings(broker_url="sentinel://h1:26379/0", sentinel_tls=True, redis_tls_ca_file="/ca.pem")
    assert redis_conn.redis_options(s)["ssl"] is True and redis_conn.sentinel_options(s)["ssl"] is True
    assert redis_conn.sentinel_options(s)["ssl_ca_certs"] == "/ca.pem"
    assert wire.celery_config(s)["broker_use_ssl"]["ssl_ca_certs"] == "/ca.pem"


# ---- a real stack -------------------------------------------------------------------------------------------

@pytest.fixture
def stack(tmp_path):
    ha = SentinelStack(tmp_path / "ha", master=MASTER).start()
    yield ha
    ha.stop()


def ha_settings(ha: SentinelStack, **overrides) -> Settings:
    return make_settings(**{"broker_url": ha.url(), "sentinel_master": MASTER, "job_timeout_s": 120, **overrides})


def test_an_unknown_master_name_is_reported_naming_both_settings(stack):
    s = ha_settings(stack).replace(sentinel_master="nosuch")
    run = subprocess.run([sys.executable, "-m", "producer.cli", "status"], env=settings_env(s), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "M3Q_SENTINEL_MASTER='nosuch'" in run.stderr and "M3Q_BROKER_URL" in run.stderr, run.stderr
    assert "no Sentinel names a primary" in run.stderr and len(run.stderr) < 700, run.stderr


def test_a_command_whose_connection_the_failover_broke_is_tried_again_on_the_new_primary(stack):
    s = ha_settings(stack)
    held = redis_conn.redis_client(s, retry_s=30).client()  # one connection each, held across the failover
    held_async = redis_conn.async_redis(s).client()

    async def across_a_failover() -> int:
        held.set("k", "before")
        await held_async.set("a", "before")
        new = await asyncio.to_thread(stack.wait_failover, stack.kill_primary())
        assert held.set("k", "after")  # tried again within the call (retry_s)
        with contextlib.suppress(redis_py.ConnectionError):  # no retries: the command the failover broke fails
            await held_async.ping()
        assert await held_async.set("a", "after")  # and the next one finds the new primary
        assert (held.get("k"), await held_async.get("a")) == (b"after", b"after")
        assert held.connection.port == held_async.connection.port == new.port
        await held_async.aclose()
        return new.port

    asyncio.run(across_a_failover())


def test_passwords_of_the_primary_and_of_the_sentinels(tmp_path, workers):
    """The primary's password in the URL, the Sentinels' own in M3Q_SENTINEL_PASSWORD; a wrong one of the
    Sentinels is reported at once, naming the settings to check."""
    ha = SentinelStack(tmp_path / "auth", master=MASTER, password="pri-pw", sentinel_password="sen-pw").start()
    try:
        s = ha_settings(ha, sentinel_password="sen-pw")
        assert "pri-pw" in s.broker_url
        workers(s)
        (item,) = Client(s).encode_queries(["behind two passwords"])
        assert item.dense is not None
        run = subprocess.run([sys.executable, "-m", "producer.cli", "status"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env=settings_env(s.replace(sentinel_password="wrong")))
        assert run.returncode != 0 and "AuthenticationError: a wrong M3Q_SENTINEL_PASSWORD?" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and len(run.stderr) < 700, run.stderr
        assert "pri-pw" not in run.stderr and "sen-pw" not in run.stderr
    finally:
        ha.stop()


def test_sentinels_and_primary_over_tls_with_certificate_checks(tmp_path, workers):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed: cannot make a test certificate")
    certificates = make_certificates(tmp_path / "tls")
    try:
        ha = SentinelStack(tmp_path / "tls-ha", master=MASTER, tls=certificates).start()
    except InfraError as e:
        pytest.skip(f"this redis-server cannot serve TLS: {e}")
    try:
        s = ha_settings(ha, sentinel_tls=True, redis_tls_ca_file=str(certificates[2]))
        workers(s)
        (item,) = Client(s).encode_queries(["Sentinel over TLS"])
        assert item.dense is not None
        run = subprocess.run([sys.executable, "-m", "producer.cli", "status"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env=settings_env(s.replace(redis_tls_ca_file="")))
        assert run.returncode != 0, "the system's CAs do not know the test CA: the certificate is checked"
    finally:
        ha.stop()


def query_load(s: Settings, seconds: float, threads: int = 32, tasks: int = 256) -> dict:
    """Single queries from ``threads`` blocking threads and ``tasks`` asyncio tasks at once, for ``seconds``:
    the monotonic time each one was answered, and every error."""
    answered, errors, stop_at = [], [], time.monotonic() + seconds
    client = Client(s)

    def blocking(n: int) -> None:
        while time.monotonic() < stop_at:
            try:
                client.encode_queries([f"thread {n} at {time.monotonic()}"])
                answered.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - every error is what the test looks for
                errors.append(repr(e))

    async def one_task(n: int) -> None:
        while time.monotonic() < stop_at:
            try:
                await client.aencode_queries([f"task {n} at {time.monotonic()}"])
                answered.append(time.monotonic())
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    async def all_tasks() -> None:
        await asyncio.gather(*(one_task(n) for n in range(tasks)))
        await client.aclose()

    loop_thread = threading.Thread(target=asyncio.run, args=(all_tasks(),))
    loop_thread.start()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(blocking, range(threads)))
    loop_thread.join()
    client.close()
    return {"answered": sorted(answered), "errors": errors}


@pytest.mark.slow
def test_every_query_is_answered_through_a_failover(stack, workers):
    s = ha_settings(stack)
    started_workers = [workers(s) for _ in range(2)]
    killer = threading.Timer(QUERY_S / 3, stack.kill_primary)
    started = time.monotonic()
    killer.start()
    load = query_load(s, QUERY_S)
    killed_at = started + QUERY_S / 3
    assert load["errors"] == []
    after = [t for t in load["answered"] if t > killed_at]
    assert len(load["answered"]) > 1000 and len(after) > 100, "queries were answered before and after the kill"
    gap = max(b - a for a, b in zip(load["answered"], load["answered"][1:]))
    assert gap < 2 + 5, f"no query was answered for {gap:.1f} s (the failover takes about 2 s)"
    for w in started_workers:
        assert w.proc.poll() is None, w.output()[-3000:]


@pytest.mark.slow
def test_an_index_run_through_a_failover_stores_every_document_once_and_exits_0(stack, workers, milvus_server,
                                                                               tmp_path):
    s = ha_settings(stack, milvus_uri=milvus_server, job_texts=50, max_in_flight=4, visibility_timeout_s=30)
    for _ in range(2):
        workers(s)
    n, collection = 5000, "ha_" + uuid.uuid4().hex[:10]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"doc-{i}", "text": f"document {i} on failover"}) + "\n"
                              for i in range(n)))
    run = subprocess.Popen([sys.executable, "-m", "producer.cli", "index", str(source), "--collection", collection],
                           env=settings_env(s), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kill_when_stored(stack, s, collection, n // 5)
        output, _ = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode == 0, output[-3000:]
    mc = milvus.connect(s)
    try:
        ids = [row["id"] for row in mc.query(collection, filter='id != ""', output_fields=["id"], limit=16384)]
    finally:
        mc.close()
    assert len(ids) == n and set(ids) == {f"doc-{i}" for i in range(n)}


def kill_when_stored(ha: SentinelStack, s: Settings, prefix: str, rows: int) -> None:
    """SIGKILL the primary once a collection named ``prefix``... holds ``rows`` rows."""
    mc = milvus.connect(s)

    def stored() -> bool:
        return any(milvus.count(mc, name) >= rows for name in mc.list_collections() if name.startswith(prefix))
    try:
        wait_for(stored, 120, f"{rows} rows stored")
    finally:
        mc.close()
    ha.kill_primary()


@pytest.mark.slow
def test_a_reindex_through_a_failover_finishes_and_switches_its_alias_whole(stack, workers, milvus_server, tmp_path):
    s = ha_settings(stack, milvus_uri=milvus_server, job_texts=50, visibility_timeout_s=30)
    workers(s)
    n, alias = 3000, "hare_" + uuid.uuid4().hex[:8]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "text": f"re-indexed {i}"}) + "\n" for i in range(n)))
    killer = threading.Thread(target=kill_when_stored, args=(stack, s, alias + "_v", n // 5))
    killer.start()
    report = reindex.start_reindex(s, str(source), alias, progress=False)
    killer.join()
    assert report.switched and report.count == report.stored == n and not report.rejected
    mc = milvus.connect(s)
    try:
        assert mc.describe_alias(alias)["collection_name"] == report.target
        assert milvus.count(mc, alias) == n
    finally:
        mc.close()


@pytest.mark.slow
def test_the_gateway_answers_503_during_the_gap_and_200_after_and_no_request_hangs(stack, workers, tmp_path):
    s = ha_settings(stack)
    workers(s)
    gateway = GatewayProcess(s, tmp_path / "gateway.log").wait_ready()
    codes, slowest = [], 0.0
    try:
        with httpx.Client(base_url=gateway.url, timeout=15) as http:
            assert http.get("/health").status_code == 200
            stack.kill_primary()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (503 not in codes or codes[-1] != 200):
                started = time.monotonic()
                codes.append(http.get("/health").status_code)
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.1)
            embed = http.post("/embed", json={"inputs": "after the failover"})
    finally:
        gateway.stop()
    assert 503 in codes and codes[-1] == 200, codes
    assert set(codes) <= {200, 503}, codes
    assert slowest < 10, f"a /health request took {slowest:.1f} s"
    assert embed.status_code == 200 and len(embed.json()[0]) == Client(s).dims()["dense"]


def test_a_plain_redis_url_builds_a_plain_client():
    client = redis_conn.redis_client(make_settings())
    assert type(client.connection_pool) is redis_py.ConnectionPool
    client.close()


def test_a_write_refused_by_a_demoted_primary_reconnects_and_lands_once_the_address_is_a_primary(tmp_path):
    """A managed Redis that failed over can leave a connection on the demoted primary, which answers every
    write with READONLY. Here one server is demoted and, 1.5 s later, promoted again: a managed endpoint's
    name reaching a primary once more."""
    a = RedisServer(tmp_path / "a", ("--repl-diskless-sync-delay", "0")).start()
    b = RedisServer(tmp_path / "b").start()
    try:
        s = make_settings(broker_url=a.url())
        retrying, plain = redis_conn.redis_client(s, retry_s=30), redis_conn.async_redis(s)
        retrying.set("k", "before")
        asyncio.run(plain.set("k", "before"))
        admin = redis_py.Redis(port=a.port)
        admin.replicaof("127.0.0.1", b.port)
        with pytest.raises(redis_py.ConnectionError, match="demoted by a failover"):  # an outage, not a refusal
            asyncio.run(redis_conn.async_redis(s).set("k", "refused"))
        threading.Timer(1.5, lambda: admin.replicaof("NO", "ONE")).start()
        started = time.monotonic()
        assert retrying.set("k", "after")  # tried again within the call (retry_s), on a new connection
        assert time.monotonic() - started >= 1.0, "the write landed before the server was a primary again"
        assert admin.get("k") == b"after"
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_a_worker_whose_primary_is_demoted_keeps_serving_and_answers_the_job_in_flight_and_the_one_sent_meanwhile(
        tmp_path, workers):
    """A managed Redis that fails over can leave every connection on the demoted primary: its blocked reads
    get UNBLOCKED, its writes READONLY. Celery's broker and result backend connections, like m3-queue's own,
    take that for a lost connection. Here the worker's server is demoted for 4 s, then promoted again (the
    endpoint's name reaching a primary), while one document job runs and another is sent."""
    a = RedisServer(tmp_path / "a", ("--repl-diskless-sync-delay", "0")).start()
    b = RedisServer(tmp_path / "b", ("--repl-diskless-sync-delay", "0")).start()
    try:
        s = make_settings(broker_url=a.url(), model="test-stand-in:sleep-us-per-token=20000", job_timeout_s=60)
        worker = workers(s, env={"M3Q_TESTING": "1"})
        client = Client(s)
        assert len(client.encode_documents(["before"])) == 1
        demoted, promoted = redis_py.Redis(port=a.port), redis_py.Redis(port=b.port)
        promoted.replicaof("127.0.0.1", a.port)  # b takes a's data, then a becomes its replica
        wait_for(lambda: promoted.info("replication")["master_link_status"] == "up", 20, "b replicating a")
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(client.encode_documents, [" ".join(["word"] * 100)])  # about 2 s
            time.sleep(0.5)
            promoted.replicaof("NO", "ONE")
            demoted.replicaof("127.0.0.1", b.port)
            time.sleep(0.5)
            sent = pool.submit(client.encode_documents, ["sent while demoted"])
            time.sleep(3.5)
            demoted.replicaof("NO", "ONE")
            assert [len(in_flight.result(60)), len(sent.result(60))] == [1, 1]
        (query,) = client.encode_queries(["after"])
        assert query.dense is not None
        assert worker.proc.poll() is None, worker.output()[-3000:]
        assert "Unrecoverable error" not in worker.output()
        assert "ReadOnlyError" not in worker.output()  # the result of the job in flight was stored once a primary
        assert "demoted by a failover" in worker.output()
    finally:
        a.stop()
        b.stop()


def queued(r: redis_py.Redis, s: Settings, kind: str) -> bytes | None:
    """The query job on the stream (its entry's id: the worker deletes those it answered), or the Celery job
    in its queue."""
    if kind == "queries":
        entries = r.xrange(stream.stream_key(s))
        return entries[-1][0] if entries else None
    return r.lindex(wire.document_queue(s), 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["queries", "documents"])
def test_a_job_the_failover_lost_is_sent_again_and_answered(stack, workers, kind):
    """No worker runs and the replica is cut off (its link closed, its process stopped) while the job is sent,
    so the primary acknowledges a job that the replica never receives; then the primary dies and the replica
    is promoted without it, and a worker starts. The query stream's reader sends its jobs again once Redis
    answers; a Celery job is sent again once it has been in no queue and held by no live worker for
    M3Q_DEAD_WORKER_S (short here)."""
    s = ha_settings(stack, dead_worker_s=3.0, job_timeout_s=90, require_worker=False)
    client = Client(s)
    first = workers(s)
    client.encode_queries(["warm"]), client.encode_documents(["warm"])
    first.proc.kill()
    first.proc.wait()
    time.sleep(0.5)  # Redis notices the closed connection: no blocked read of the dead worker takes the job
    primary, replica = stack.primary(), next(server for server in stack.servers if server is not stack.primary())
    replica.proc.send_signal(signal.SIGSTOP)  # so it cannot connect again for what its link missed
    with redis_py.Redis(port=primary.port) as direct:
        direct.client_kill_filter(_type="replica")
        call = client.encode_queries if kind == "queries" else client.encode_documents
        answered: dict = {}
        caller = threading.Thread(target=lambda: answered.update(items=call([f"lost {kind}"])))
        caller.start()
        job = wait_for(lambda: queued(direct, s, kind), 30, "the job is on the primary")
    stack.kill_primary()
    replica.proc.send_signal(signal.SIGCONT)
    assert stack.wait_failover(primary) is replica
    with redis_py.Redis(port=replica.port) as r:
        # The client may have sent the job again by now: as another stream entry, or another message.
        assert queued(r, s, kind) != job, f"the promoted replica has the job ({job!r}): nothing was lost"
    workers(s)
    caller.join(60)
    assert not caller.is_alive(), "the lost job was not answered within 60 s of a worker's start"
    assert len(answered["items"]) == 1 and answered["items"][0].dense is not None
    client.close()
