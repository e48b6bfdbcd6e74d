"""The HTTP gateway (`m3q serve`): real uvicorn servers on free ports, a real worker, real Redis, Milvus Lite.

One worker and a few gateway processes per module: the main one (API keys on, small limits), a peer on the
same queues (statelessness: it answers for the main one's jobs), one on queues no worker serves (503) and
one on queues nobody reads, with an in-flight bound of 1 and a 2 s job timeout (429, 504). Vectors are
compared with the Python client's, which asks the same worker: bit for bit, for the same inputs.
"""
from __future__ import annotations

import base64
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Client
from producer.contract.settings import Settings
from producer.contract.wire import Embedding
from tests.conftest import GatewayProcess, WorkerProcess, make_settings

KEYS = ("key-one-" + uuid.uuid4().hex, "key-two-" + uuid.uuid4().hex)
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
TEXTS = ["What is a vector database?", "hybrid search with dense and sparse vectors",
         "Die Hauptstadt von Japan ist Tokio.", "a queue of embedding jobs on Redis"]
DOCS = {"milvus-1": "Milvus is an open-source vector database built for similarity search.",
        "redis-1": "A Redis list can act as a simple queue: one side pushes, the other side pops.",
        "tokyo-1": "Tokyo is the capital of Japan and its largest city.",
        "cook-1": "A good tomato sauce needs ripe tomatoes, olive oil, garlic and a long, slow simmer."}
QUERY_MAX_LENGTH = 64
MAX_TEXT_CHARS = 5000
MAX_TEXTS = 100


# ---- fixtures: one worker, the gateways, clients -------------------------------------------------------------

@pytest.fixture(scope="module")
def settings(milvus_server) -> Settings:
    return make_settings(milvus_uri=milvus_server, api_keys=",".join(KEYS), query_max_length=QUERY_MAX_LENGTH,
                         max_text_chars=MAX_TEXT_CHARS, max_job_texts=MAX_TEXTS,
                         gateway_max_body_bytes=256 * 1024, job_texts=3)


@pytest.fixture(scope="module")
def processes(settings, tmp_path_factory, redis_client):
    """The worker and the four gateways, started together (their start-up overlaps)."""
    logs = tmp_path_factory.mktemp("gateway")
    idle = make_settings(api_keys="", no_worker_grace_s=0.5)
    stuck = make_settings(api_keys="", require_worker=False, job_timeout_s=2.0, gateway_max_in_flight=1)
    worker = WorkerProcess(settings, logs / "worker.log")
    gateways = {name: GatewayProcess(s, logs / f"{name}.log")
                for name, s in (("main", settings), ("peer", settings), ("idle", idle), ("stuck", stuck))}
    try:
        worker.wait_ready()
        yield {"worker": worker, **{name: g.wait_ready() for name, g in gateways.items()}}
    finally:
        for g in gateways.values():
            g.stop()
        worker.stop()
        for s in (idle, stuck):  # what these left in Redis (a stream nobody read)
            keys = list(redis_client.scan_iter(match=f"{s.queue_prefix}*"))
            if keys:
                redis_client.delete(*keys)


@pytest.fixture(scope="module")
def gateway(processes) -> GatewayProcess:
    return processes["main"]


@pytest.fixture(scope="module")
def client(settings, processes) -> Client:
    return Client(settings)


@pytest.fixture(scope="module")
def oai(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)


def post(g: GatewayProcess, path: str, body=None, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(g.url + path, json=body, headers={**AUTH, **(headers or {})}, timeout=60, **kwargs)


def error_of(answer: httpx.Response) -> dict:
    """The error of an answer in either shape; never a traceback."""
    assert "Traceback" not in answer.text and 'File "' not in answer.text
    body = answer.json()
    return body["error"] if isinstance(body["error"], dict) else {"message": body["error"], **body}


def bits(vector) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


# ---- OpenAI ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS], ids=["one", "many"])
@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_openai_client_gets_the_vectors_of_client_encode_queries_bit_for_bit(oai, client, texts, encoding):
    # None: the client's default, which asks for base64 and decodes it; asked for explicitly, base64 is the
    # little-endian float32 bytes, as OpenAI sends them.
    options = {} if encoding is None else {"encoding_format": encoding}
    answer = oai.embeddings.create(model="bge-m3", input=texts, **options)
    expected = client.encode_queries(texts)
    assert [d.index for d in answer.data] == list(range(len(texts)))
    got = [base64.b64decode(d.embedding) if encoding == "base64" else bits(d.embedding) for d in answer.data]
    assert got == [e.dense.astype("<f4").tobytes() for e in expected]
    assert answer.usage.prompt_tokens == sum(e.n_tokens for e in expected) > 0
    assert answer.model == "tiny-bge-m3"  # the checkpoint's folder, not its path


def test_a_single_string_input_and_raw_base64_are_openais(gateway, client):
    answer = post(gateway, "/v1/embeddings", {"model": "m", "input": TEXTS[2], "encoding_format": "base64"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    raw = base64.b64decode(body["data"][0]["embedding"])
    (expected,) = client.encode_queries([TEXTS[2]])
    assert raw == expected.dense.astype("<f4").tobytes()  # little-endian float32, as OpenAI's
    assert body["usage"] == {"prompt_tokens": expected.n_tokens, "total_tokens": expected.n_tokens}


def test_openai_client_errors_are_openai_errors(oai, gateway):
    with pytest.raises(openai.UnprocessableEntityError, match="token arrays are not supported"):
        oai.embeddings.create(model="bge-m3", input=[[1, 2, 3]])
    with pytest.raises(openai.UnprocessableEntityError, match=r"input\[1\]: text is empty"):
        oai.embeddings.create(model="bge-m3", input=["fine", "  "])
    bad = openai.OpenAI(base_url=gateway.url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="M3Q_API_KEYS"):
        bad.embeddings.create(model="bge-m3", input="hello")


# ---- TEI, as Milvus' TEI text-embedding function calls it ------------------------------------------------------

def test_tei_embed_as_milvus_calls_it(gateway, client):
    # Milvus 2.6 posts {"inputs": [...], "truncate": true, "truncation_direction": "Right"} (the last two only
    # when set in the function's params) with a Bearer key, and expects one float32 vector per input.
    for extra in ({}, {"truncate": True}, {"truncate": True, "truncation_direction": "Right"}):
        answer = httpx.post(gateway.url + "/embed", json={"inputs": TEXTS, **extra}, timeout=60,
                            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"})
        assert answer.status_code == 200, answer.text
        vectors = answer.json()
        assert len(vectors) == len(TEXTS) and {len(v) for v in vectors} == {32}
    assert [bits(v) for v in vectors] == [bits(e.dense) for e in client.encode_queries(TEXTS)]
    single = post(gateway, "/embed", {"inputs": TEXTS[0]}).json()  # a string: still a list of vectors
    assert [bits(v) for v in single] == [bits(client.encode_queries(TEXTS[:1])[0].dense)]


def test_tei_embed_sparse_gives_index_value_pairs_by_token_id(gateway, client):
    answer = post(gateway, "/embed_sparse", {"inputs": TEXTS, "truncate": True})
    assert answer.status_code == 200, answer.text
    sparse = answer.json()
    assert len(sparse) == len(TEXTS)
    for pairs, expected in zip(sparse, client.encode_queries(TEXTS)):
        assert pairs and all(set(p) == {"index", "value"} for p in pairs)
        assert [p["index"] for p in pairs] == sorted(expected.sparse_dict())
        assert {p["index"]: np.float32(p["value"]) for p in pairs} == \
            {k: np.float32(v) for k, v in expected.sparse_dict().items()}


def test_tei_truncate_and_info(gateway, client):
    long_text = " ".join(["vector database queue"] * 60)  # far over QUERY_MAX_LENGTH tokens
    refused = post(gateway, "/embed", {"inputs": ["short", long_text]})  # truncate: false, TEI's default
    assert refused.status_code == 413
    error = error_of(refused)
    assert error["error_type"] == "Validation" and "inputs[1]" in error["message"]
    assert f"over the limit of {QUERY_MAX_LENGTH} tokens" in error["message"] and '"truncate": true' in error["message"]
    assert error["items"] == [{"index": 1, "reason": error["items"][0]["reason"]}]
    cut = post(gateway, "/embed", {"inputs": [long_text], "truncate": True})
    assert cut.status_code == 200 and bits(cut.json()[0]) == bits(client.encode_queries([long_text])[0].dense)
    info = httpx.get(gateway.url + "/info", headers=AUTH, timeout=30).json()
    assert info["model_id"] == "tiny-bge-m3" and info["max_input_length"] == QUERY_MAX_LENGTH
    assert info["model_type"] == {"embedding": {"pooling": "cls"}} and info["max_client_batch_size"] == MAX_TEXTS
    assert {"model_dtype", "max_batch_tokens", "auto_truncate", "version", "max_concurrent_requests"} <= set(info)
    for body, field in (({"inputs": "a", "normalize": "no"}, "normalize"),
                        ({"inputs": "a", "truncation_direction": "Up"}, "truncation_direction"),
                        ({"inputs": "a", "prompt_name": "query"}, "prompt_name"),
                        ({"inputs": "a", "dimensions": 16}, "dimensions")):
        answer = post(gateway, "/embed", body)
        assert answer.status_code == 422 and error_of(answer)["message"].startswith(f"{field}: ")


# ---- /v1/encode ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["queries", "documents"])
def test_encode_json_and_msgpack_give_every_output_and_keep_rejected_items_in_place(gateway, client, kind):
    texts = [TEXTS[0], "", TEXTS[1]]
    expected = client.encode(texts, kind, colbert=True)
    body = {"texts": texts, "kind": kind, "colbert": True}
    as_json = post(gateway, "/v1/encode", body).json()
    as_msgpack = msgpack.unpackb(post(gateway, "/v1/encode", body, {"Accept": "application/msgpack"}).content)
    assert as_json["kind"] == as_msgpack["kind"] == kind
    assert as_json["items"][1] == as_msgpack["items"][1] == {"index": 1, "error": expected[1].reason}
    for i in (0, 2):
        e: Embedding = expected[i]
        j, m = as_json["items"][i], as_msgpack["items"][i]
        assert j["index"] == m["index"] == i and j["tokens"] == m["tokens"] == e.n_tokens
        assert bits(j["dense"]) == m["dense"] == bits(e.dense)
        assert {int(k): np.float32(v) for k, v in j["sparse"].items()} == \
            {k: np.float32(v) for k, v in e.sparse_dict().items()}
        assert np.frombuffer(m["sparse_ids"], "<i4").tolist() == e.sparse_ids.tolist()
        assert m["sparse_weights"] == e.sparse_weights.astype("<f4").tobytes()
        assert bits(j["colbert"]) == m["colbert"] == bits(e.colbert) and m["colbert_rows"] == e.colbert.shape[0]


# ---- what a client gets wrong ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/embeddings", {"model": "m"}, 422, "input: is required"),
    ("/v1/embeddings", {"input": 3}, 422, "input: must be a string or a non-empty list of strings"),
    ("/v1/embeddings", {"input": ["a", 7]}, 422, "input[1]: must be a string, got a number"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422, "encoding_format: must be one of"),
    ("/v1/embeddings", {"input": "a", "dimensions": 8}, 422, "dimensions: this model gives 32-dimensional"),
    ("/v1/embeddings", {"input": ["ok", "", "ok", "\x00"]}, 422, "2 of 4 inputs were rejected: input[1]: text is"),
    ("/v1/embeddings", {"input": "x" * (MAX_TEXT_CHARS + 1)}, 413, "(M3Q_MAX_TEXT_CHARS)"),
    ("/v1/embeddings", {"input": ["x"] * (MAX_TEXTS + 1)}, 413, f"over the limit of {MAX_TEXTS} (M3Q_MAX_JOB_TEXTS)"),
    ("/v1/embeddings", {"input": ["x" * 4000] * 70}, 413, "(M3Q_GATEWAY_MAX_BODY_BYTES)"),
    ("/embed", {"input": "a"}, 422, "inputs: is required"),
    ("/v1/encode", {"texts": ["a"], "kind": "poems"}, 422, "kind: must be one of 'queries', 'documents'"),
    ("/v1/encode", {"texts": ["a"], "max_length": 1}, 422, "max_length: must be an integer of at least 2"),
    ("/v1/encode", {"texts": ["a"], "max_length": 9000}, 422,  # the workers' bound: the model's positions
     "option 'max_length' must be an integer from 2 to 8192, got 9000"),
    ("/v1/encode", {"texts": ["a"], "dense": False, "sparse": False}, 422, "dense: ask for at least one"),
    ("/v1/index", {"collection": "9 lives", "documents": [{"id": 1, "text": "a"}]}, 422, "collection: '9 lives' is"),
    ("/v1/index", {"collection": "c", "documents": [{"id": 1}, {"text": "a"}]}, 422,
     "2 of 2 documents were rejected: documents[0]: text must be a string"),
    ("/v1/search", {"collection": "c"}, 422, "query: is required"),
    ("/v1/search", {"query": "q", "collection": "c", "mode": "fuzzy"}, 422, "mode: must be one of"),
    ("/v1/search", {"query": "q", "collection": "c", "k": 0}, 422, "k: must be an integer from 1 to 16384"),
])
def test_a_malformed_request_is_answered_naming_the_field(gateway, path, body, status, message):
    answer = post(gateway, path, body)
    assert answer.status_code == status, answer.text
    assert message in error_of(answer)["message"]


def test_malformed_bodies_and_unknown_routes(gateway):
    for content, message in ((b"{not json", "body is not valid JSON"), (b"[1, 2]", "body must be a JSON object"),
                             (b"", "the request has no body")):
        answer = httpx.post(gateway.url + "/v1/embeddings", content=content, headers=AUTH)
        assert answer.status_code == 422 and message in error_of(answer)["message"]
    assert httpx.get(gateway.url + "/v2/nothing", headers=AUTH).status_code == 404
    assert httpx.get(gateway.url + "/v1/embeddings", headers=AUTH).status_code == 405
    missing = httpx.get(gateway.url + "/v1/jobs/" + "0" * 32, headers=AUTH)
    assert missing.status_code == 404 and "no index job" in error_of(missing)["message"]


def test_without_a_key_it_is_401_except_health_and_metrics(gateway):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"},
                    {"Authorization": f"Bearer {KEYS[0]}x"}):
        answer = httpx.post(gateway.url + "/v1/embeddings", json={"input": "a"}, headers=headers)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
        assert "M3Q_API_KEYS" in error_of(answer)["message"]
    for path in ("/embed", "/", "/tokenize"):  # POST / is TEI's /embed: it needs the key, GET / does not
        tei = httpx.post(gateway.url + path, json={"inputs": "a"})
        assert tei.status_code == 401 and error_of(tei)["error_type"] == "Unauthorized"
    assert httpx.get(gateway.url + "/v1/models").status_code == 401
    for path in ("/health", "/", "/ping", "/metrics"):
        assert httpx.get(gateway.url + path).status_code == 200, path


def test_no_worker_is_503_on_health_and_on_requests(processes):
    idle = processes["idle"]
    health = httpx.get(idle.url + "/health")
    assert health.status_code == 503 and "m3q worker" in health.json()["error"]
    answer = httpx.post(idle.url + "/v1/embeddings", json={"input": "a"}, timeout=30)
    assert answer.status_code == 503
    assert "no worker is consuming" in error_of(answer)["message"]
    for path in ("/embed", "/tokenize"):
        tei = httpx.post(idle.url + path, json={"inputs": "a"}, timeout=30)
        assert tei.status_code == 503 and error_of(tei)["error_type"] == "Unhealthy", path
    assert httpx.get(idle.url + "/").status_code == 503  # TEI's health route


def test_past_the_in_flight_bound_is_429_and_past_the_job_timeout_504(processes):
    stuck = processes["stuck"]  # nobody reads its queue; bound 1, job timeout 2 s
    first: dict = {}
    waiting = threading.Thread(target=lambda: first.update(answer=httpx.post(
        stuck.url + "/v1/embeddings", json={"input": "never answered"}, timeout=30)))
    waiting.start()
    deadline = time.monotonic() + 10
    while _metric(stuck, "m3q_gateway_in_flight") < 2:  # that request, and this /metrics one
        assert time.monotonic() < deadline
        time.sleep(0.02)
    refused = httpx.post(stuck.url + "/v1/embeddings", json={"input": "one too many"})
    waiting.join()
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "M3Q_GATEWAY_MAX_IN_FLIGHT=1" in error_of(refused)["message"]
    assert first["answer"].status_code == 504
    assert "had no result after 2s" in error_of(first["answer"])["message"]
    assert httpx.get(stuck.url + "/health").status_code == 503  # never refused for load, and no worker


# ---- metrics -----------------------------------------------------------------------------------------------

def _metric(g: GatewayProcess, name: str, **labels: str) -> float:
    text = httpx.get(g.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_requests_latency_and_errors_by_status(gateway):
    route = {"route": "/v1/embeddings"}
    before = {"ok": _metric(gateway, "m3q_gateway_requests_total", method="POST", status="200", **route),
              "bad": _metric(gateway, "m3q_gateway_errors_total", status="422", **route),
              "denied": _metric(gateway, "m3q_gateway_errors_total", status="401", **route),
              "timed": _metric(gateway, "m3q_gateway_request_seconds_count", **route)}
    for _ in range(3):
        assert post(gateway, "/v1/embeddings", {"input": "count me"}).status_code == 200
    assert post(gateway, "/v1/embeddings", {"input": []}).status_code == 422
    assert httpx.post(gateway.url + "/v1/embeddings", json={"input": "a"}).status_code == 401
    assert _metric(gateway, "m3q_gateway_requests_total", method="POST", status="200", **route) == before["ok"] + 3
    assert _metric(gateway, "m3q_gateway_errors_total", status="422", **route) == before["bad"] + 1
    assert _metric(gateway, "m3q_gateway_errors_total", status="401", **route) == before["denied"] + 1
    assert _metric(gateway, "m3q_gateway_request_seconds_count", **route) == before["timed"] + 5
    assert _metric(gateway, "m3q_gateway_in_flight") == 1  # the /metrics request itself
    httpx.get(gateway.url + "/v1/jobs/" + "1" * 32, headers=AUTH)
    assert _metric(gateway, "m3q_gateway_errors_total", route="/v1/jobs/{job_id}", status="404") >= 1


# ---- /v1/index: the rules of m3q index ---------------------------------------------------------------------------

@pytest.mark.parametrize("doc", [
    {"id": "a", "text": ""}, {"id": "a", "text": "   "}, {"id": "a", "text": "nul \x00 inside"},
    {"id": "a", "text": "x" * (MAX_TEXT_CHARS + 1)}, {"id": "a", "text": 7},
    {"id": "", "text": "t"}, {"id": True, "text": "t"}, {"id": 1.5, "text": "t"}, {"id": "i" * 513, "text": "t"},
    {"id": "a", "text": "t", "metadata": [1, 2]}, {"id": "a", "text": "t", "metadata": {"big": "m" * 70_000}},
], ids=["empty", "blank", "nul", "too-long", "not-text", "empty-id", "bool-id", "float-id", "long-id",
        "metadata-list", "metadata-big"])
def test_v1_index_refuses_what_m3q_index_refuses_with_the_same_reason(gateway, client, doc):
    # One rule each (producer.contract.checks): the gateway answers at once what a worker would reject for `m3q index`.
    # (A lone surrogate or a NaN cannot be sent as JSON at all: the body is refused as invalid.)
    answer = post(gateway, "/v1/index", {"collection": "t_rules", "documents": [doc]})
    assert answer.status_code == 422, answer.text
    (item,) = error_of(answer)["items"]
    report = client.index("t_rules", [doc["text"]], [doc["id"]], [doc.get("metadata")])
    (rejected,) = report.rejected
    assert item["reason"] and rejected[1].endswith(item["reason"]), (rejected, item)


# ---- index, jobs, search ----------------------------------------------------------------------------------------

def _finished(g: GatewayProcess, job_id: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{g.url}/v1/jobs/{job_id}", headers=AUTH, timeout=30).json()
        if job["state"] != "pending" or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def test_index_then_follow_the_job_on_another_gateway_then_search(processes, client):
    gateway, peer = processes["main"], processes["peer"]
    collection = "t_gw_" + uuid.uuid4().hex[:10]
    documents = [{"id": k, "text": v, "metadata": {"n": i}} for i, (k, v) in enumerate(DOCS.items())]
    documents[1:1] = [{"id": "no-text"}, {"id": "milvus-1", "text": "a repeated id"}]
    answer = post(gateway, "/v1/index", {"collection": collection, "documents": documents})
    assert answer.status_code == 202, answer.text
    queued = answer.json()
    assert queued["accepted"] == len(DOCS) and queued["jobs"] == 2  # job_texts=3
    assert [(r["index"], r["id"]) for r in queued["rejected"]] == [(1, "no-text"), (2, "milvus-1")]
    assert "duplicate id 'milvus-1', first at documents[0]" in queued["rejected"][1]["reason"]
    job = _finished(peer, queued["id"])  # any gateway answers for any job: the record is in Redis
    assert job["state"] == "done", job
    assert (job["stored"], job["accepted"], job["documents"]) == (len(DOCS), len(DOCS), len(documents))
    assert job["jobs"] == {"total": 2, "done": 2, "failed": 0, "pending": 0}
    assert [r["index"] for r in job["rejected"]] == [1, 2]
    for doc_id, text in DOCS.items():
        hits = post(peer, "/v1/search", {"query": text, "collection": collection, "mode": "dense", "k": 2}).json()
        assert hits["hits"][0]["id"] == doc_id and hits["hits"][0]["text"] == text
        assert hits["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    for mode in ("hybrid", "sparse"):
        hybrid = post(gateway, "/v1/search", {"query": DOCS["tokyo-1"], "collection": collection, "mode": mode})
        assert hybrid.status_code == 200 and "tokyo-1" in [h["id"] for h in hybrid.json()["hits"]]
    assert {h["id"]: h["metadata"] for h in hybrid.json()["hits"]}["tokyo-1"] == {"n": 2}
    missing = post(gateway, "/v1/search", {"query": "q", "collection": "t_no_such_" + uuid.uuid4().hex[:8]})
    assert missing.status_code == 404 and "does not exist" in error_of(missing)["message"]


@pytest.mark.slow
def test_after_redis_closed_the_idle_connections_the_next_request_is_answered_not_503(private_redis, tmp_path):
    """A Redis that closes idle clients (``timeout``, as managed services do): the gateway's first request
    after a pause gets a new connection, not "Connection closed by server" as a 503."""
    server = private_redis("--timeout", "1")
    g = GatewayProcess(make_settings(broker_url=server.url(), api_keys=""), tmp_path / "idle.log").wait_ready()
    try:
        for _ in range(2):  # the job store reads Redis: an unknown job is a 404, an unreachable Redis a 503
            missing = httpx.get(f"{g.url}/v1/jobs/{'0' * 32}", timeout=10)
            assert missing.status_code == 404, missing.text
            time.sleep(2.5)  # the server closes the gateway's idle connection
    finally:
        g.proc.terminate()
        g.proc.wait(30)


# ---- graceful shutdown --------------------------------------------------------------------------------------------

def test_sigterm_answers_each_of_50_requests_in_flight(settings, processes, tmp_path):
    worker = processes["worker"]
    g = GatewayProcess(settings, tmp_path / "draining.log").wait_ready()
    try:
        assert post(g, "/v1/embeddings", {"input": "warm up"}).status_code == 200
        os.kill(worker.proc.pid, signal.SIGSTOP)  # the worker holds the queries until SIGCONT
        pool = ThreadPoolExecutor(50)
        answers = [pool.submit(post, g, "/v1/embeddings", {"input": f"query {i}"}) for i in range(50)]
        deadline = time.monotonic() + 20
        while _metric(g, "m3q_gateway_in_flight") < 51:
            assert time.monotonic() < deadline, "the 50 requests never were in flight together"
            time.sleep(0.05)
        assert g.threads() < 20  # 50 requests in flight: no thread per request
        g.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert g.proc.poll() is None  # draining: it waits for the requests in flight
        with pytest.raises(httpx.TransportError):
            httpx.get(g.url + "/health", timeout=2)  # and takes no new ones
        os.kill(worker.proc.pid, signal.SIGCONT)
        results = [a.result(timeout=60) for a in answers]
        assert [r.status_code for r in results] == [200] * 50
        assert all(len(r.json()["data"]) == 1 for r in results)
        # uvicorn re-raises the SIGTERM once it has drained, so the exit status says what stopped it.
        assert g.proc.wait(30) == -signal.SIGTERM
        assert "Waiting for connections to close" in g.output() and "Finished server process" in g.output()
        assert "Traceback" not in g.output()
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
        g.stop()
