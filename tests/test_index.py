"""Indexing into Milvus and searching it, through the queue: real Redis, a real worker process, a real
Milvus Lite server, the tiny checkpoint. No mocks.

The tiny checkpoint has random weights, so the tests rely only on what holds for any model: a text's own
vector is its nearest neighbour (same text, same vector, inner product 1), and search results follow the
vectors the workers computed, which the tests ask the same workers for.
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from producer.client import Client, JobFailed
from producer.contract import milvus
from producer.contract.wire import Embedding, PayloadError
from producer.search import Searcher
from tests.conftest import ROOT, TINY, GatewayProcess, WorkerProcess, make_settings, settings_env
from tests.test_milvus import make_collection_without_hashes
from worker import sink

DOCS = {
    "milvus-1": "Milvus is an open-source vector database built for similarity search.",
    "redis-1": "A Redis list can act as a simple queue: one side pushes, the other side pops.",
    "bge-1": "BGE-M3 gives dense, sparse and multi-vector embeddings from one forward pass.",
    "tokyo-1": "Tokyo is the capital of Japan and its largest city.",
    "cook-1": "A good tomato sauce needs ripe tomatoes, olive oil, garlic and a long, slow simmer.",
    "rrf-1": "Reciprocal rank fusion adds one over sixty plus the rank of each document in every list.",
    "ops-1": "Re-indexing writes a new collection in the background and switches an alias when done.",
    "de-1": "Die Vektordatenbank speichert Einbettungen und findet ähnliche Dokumente in Millisekunden.",
}
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def settings(milvus_server):
    return make_settings(milvus_uri=milvus_server)


@pytest.fixture(scope="module")
def worker(settings, tmp_path_factory, redis_client):
    """One worker on the tiny model that upserts into the session's Milvus Lite server."""
    w = WorkerProcess(settings, tmp_path_factory.mktemp("index-worker") / "worker.log").wait_ready()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def client(worker):
    return Client(worker.settings)


@pytest.fixture(scope="module")
def searcher(client):
    return Searcher(client=client)


@pytest.fixture(scope="module")
def mc(settings):
    c = milvus.connect(settings)
    yield c
    c.close()


@pytest.fixture
def collection() -> str:
    return "t_" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def indexed(client, mc):
    """A collection holding DOCS, shared by the read-only tests."""
    name = "t_docs_" + uuid.uuid4().hex[:8]
    report = client.index(name, list(DOCS.values()), list(DOCS), [{"n": i} for i in range(len(DOCS))])
    assert (report.stored, report.rejected) == (len(DOCS), [])
    return name


@pytest.fixture(scope="module")
def empty_sparse_texts(client) -> list[str]:
    """Short texts whose sparse vector is empty on the tiny checkpoint (every token's weight is <= 0), found
    by asking the worker. An all-<unk> text does not give one here: the tokenizer prepends "▁" to every text,
    and "▁" keeps a positive weight."""
    vocab = json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    pieces = [p for p in dict.fromkeys(piece.replace("▁", " ").strip() for piece, _ in vocab[5:800]) if p]
    items = client.encode_documents(pieces)
    found = [p for p, item in zip(pieces, items) if isinstance(item, Embedding) and item.sparse_dict() == {}]
    assert len(found) >= 20, f"only {len(found)} of {len(pieces)} vocabulary pieces have an empty sparse vector"
    return found


def _stored(mc, collection: str, ids: list[str]) -> dict[str, dict]:
    rows = mc.get(collection, ids=ids, output_fields=["text", "metadata"])
    return {r["id"]: r for r in rows}


# ---- index, count, search ----------------------------------------------------------------------------

def test_index_then_count(indexed, mc):
    assert milvus.count(mc, indexed) == len(DOCS)
    stored = _stored(mc, indexed, list(DOCS))
    assert {k: v["text"] for k, v in stored.items()} == DOCS
    assert [stored[k]["metadata"] for k in DOCS] == [{"n": i} for i in range(len(DOCS))]


@pytest.mark.parametrize("doc_id", list(DOCS))
def test_own_text_is_found_first_in_dense_and_top3_in_hybrid(indexed, searcher, doc_id):
    dense = searcher.search(DOCS[doc_id], indexed, "dense", k=3)
    assert dense[0].id == doc_id
    assert dense[0].score == pytest.approx(1.0, abs=1e-4)  # the same text gives the same unit vector
    assert dense[0].text == DOCS[doc_id]
    assert [h.score for h in dense] == sorted((h.score for h in dense), reverse=True)
    hybrid = searcher.search(DOCS[doc_id], indexed, "hybrid", k=3)
    assert doc_id in [h.id for h in hybrid]


def test_bad_searches_are_refused_clearly(indexed, searcher):
    with pytest.raises(ValueError, match="k must be"):
        searcher.search("anything", indexed, "dense", k=0)
    with pytest.raises(ValueError, match="mode must be"):
        searcher.search("anything", indexed, "lexical")
    with pytest.raises(ValueError, match="query rejected: text is empty"):
        searcher.search("   ", indexed, "hybrid")
    with pytest.raises(milvus.MilvusRejected, match="'t_missing_collection' does not exist"):
        searcher.search("anything", "t_missing_collection", "dense")


def test_reindexing_the_same_ids_keeps_the_count(client, mc, collection):
    ids, texts = list(DOCS), list(DOCS.values())
    assert client.index(collection, texts, ids).stored == len(DOCS)
    changed = texts[:2] + [t.upper() for t in texts[2:]]
    report = client.index(collection, changed, ids, job_texts=3)  # several jobs, several upserts
    # The first two are stored unchanged: skipped, never sent.
    assert (report.stored, report.skipped, report.rejected, report.jobs) == (len(DOCS) - 2, 2, [], 2)
    assert milvus.count(mc, collection) == len(DOCS)
    assert _stored(mc, collection, [ids[5]])[ids[5]]["text"] == texts[5].upper()  # the upsert replaced it
    forced = client.index(collection, changed, ids, job_texts=3, force=True)
    assert (forced.stored, forced.skipped, forced.jobs) == (len(DOCS), 0, 3)


# ---- collections made for something else -------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded_model(mc, indexed) -> str:
    """The model name the worker records on the collections it creates."""
    name = milvus._recorded_model(mc.describe_collection(indexed))
    assert name and "tiny-bge-m3" in name
    return name


def _refused(client, mc, collection):
    with pytest.raises((JobFailed, PayloadError)) as e:
        client.index(collection, list(DOCS.values()), list(DOCS))
    assert milvus.count(mc, collection) == 0  # nothing was written
    return str(e.value)


def test_collection_of_another_dimension_is_refused(client, mc, collection, recorded_model):
    dim = client.dims()["dense"]
    sink.ensure_collection(mc, collection, dim + 16, recorded_model)
    message = _refused(client, mc, collection)
    assert repr(collection) in message and f"dim {dim + 16}" in message and f"dim {dim}" in message
    assert message.count(recorded_model) == 2  # the same model on both sides: the dimension is the reason


def test_collection_of_another_model_is_refused(client, mc, collection):
    sink.ensure_collection(mc, collection, client.dims()["dense"], "someone/else-model")
    message = _refused(client, mc, collection)
    assert repr(collection) in message and "someone/else-model" in message


# ---- empty sparse vectors and hybrid fusion ------------------------------------------------------------

def test_document_with_an_empty_sparse_vector_is_stored_with_its_batch(client, searcher, mc, collection,
                                                                      empty_sparse_texts):
    empty = empty_sparse_texts[0]
    texts = list(DOCS.values()) + [empty]
    ids = list(DOCS) + ["empty-sparse"]
    report = client.index(collection, texts, ids)
    assert (report.stored, report.rejected) == (len(texts), [])
    assert milvus.count(mc, collection) == len(texts)
    assert searcher.search(empty, collection, "dense", k=1)[0].id == "empty-sparse"
    assert searcher.search(empty, collection, "hybrid", k=1)[0].id == "empty-sparse"  # empty query: dense only
    assert searcher.search(empty, collection, "sparse", k=3) == []
    # Its placeholder never matches a sparse query, while every other document can.
    sparse_ids = {h.id for h in searcher.search(DOCS["bge-1"], collection, "sparse", k=len(texts))}
    assert "empty-sparse" not in sparse_ids and "bge-1" in sparse_ids


def test_hybrid_merges_dense_and_sparse(client, searcher, collection, empty_sparse_texts):
    """A document that only dense search finds and one that only sparse search finds both lead hybrid."""
    query = "reciprocal rank fusion merges dense and sparse results"
    (q,) = client.encode_queries([query])
    # The lexical document shares words with the query; of those candidates, the one farthest from it in dense.
    candidates = ["merges results", "dense and sparse", "rank fusion", "sparse results", "reciprocal rank",
                  "fusion merges dense", "results of rank fusion", "merges sparse"]
    scored = [(float(q.dense @ item.dense), text) for text, item in zip(candidates, client.encode_documents(candidates))
              if _sparse_ip(q, item) > 0]
    lexical_dense, lexical = min(scored)
    # The others have empty sparse vectors (only dense search can find them) and beat it in dense.
    fillers = [(float(q.dense @ item.dense), text)
               for text, item in zip(empty_sparse_texts, client.encode_documents(empty_sparse_texts))]
    fillers = sorted(f for f in fillers if f[0] > lexical_dense)[-10:]
    assert len(fillers) >= 4, "precondition: the lexical document must be out of dense's top 4 candidates"
    semantic = fillers[-1][1]
    texts = [text for _, text in fillers] + [lexical]
    ids = [f"filler-{i}" for i in range(len(fillers) - 1)] + ["semantic", "lexical"]
    assert texts[-2] == semantic

    client.index(collection, texts, ids)
    dense_hits = [h.id for h in searcher.search(query, collection, "dense", k=2)]
    sparse_hits = [h.id for h in searcher.search(query, collection, "sparse", k=2)]
    hybrid = searcher.search(query, collection, "hybrid", k=2)
    assert dense_hits[0] == "semantic" and "lexical" not in dense_hits
    assert sparse_hits == ["lexical"]
    assert {h.id for h in hybrid} == {"semantic", "lexical"}
    # RRF: each is first in one list and absent from the other (each side brings 2k = 4 candidates).
    assert [h.score for h in hybrid] == pytest.approx([1 / 61, 1 / 61], rel=1e-4)


def _sparse_ip(a: Embedding, b: Embedding) -> float:
    other = b.sparse_dict()
    return sum(w * other.get(t, 0.0) for t, w in a.sparse_dict().items())


# ---- bad rows --------------------------------------------------------------------------------------------

def test_bad_rows_are_rejected_by_name_and_the_rest_is_stored(client, mc, collection):
    rows = [  # (id, text, metadata, expected reason or None)
        ("good-0", "a first good document", {"k": 1}, None),
        ("empty", "", None, "empty"),
        ("none", None, None, "text must be a string"),
        ("good-1", "a second good document", None, None),
        ("good-1", "the same id again", None, "duplicate id 'good-1'"),
        ("x" * 600, "an id of 600 characters", None, "over the limit of 512"),
        ("meta-list", "metadata that is a list", [1, 2], "metadata must be a JSON object"),
        ("meta-nan", "metadata with NaN", {"v": float("nan")}, "metadata is not JSON"),
        ("meta-set", "metadata msgpack cannot carry", {"s": {1, 2}}, "metadata is not JSON"),
        ("meta-big", "metadata Milvus would refuse", {"blob": "x" * 70_000}, "over 65536"),
        ("good-2", "a third good document", None, None),
        ("good-3", "a fourth good document", {"lang": "en"}, None),
    ]
    ids, texts, metadata, expected = (list(c) for c in zip(*rows))
    # Jobs of 5: [0..4] and [5, 6, 7, 9, 10], [11] (row 8 cannot travel and is answered by the producer).
    report = client.index(collection, texts, ids, metadata, job_texts=5)
    rejected = dict(report.rejected)
    assert sorted(rejected) == [i for i, why in enumerate(expected) if why]
    for i, reason in rejected.items():
        assert expected[i] in reason, reason
        assert repr(ids[i])[:40] in reason, reason  # the item is named by its id
    assert report.stored == 4
    assert milvus.count(mc, collection) == 4
    stored = _stored(mc, collection, ["good-0", "good-1", "good-2", "good-3"])
    assert stored["good-1"]["text"] == "a second good document"  # the duplicate did not overwrite it
    assert stored["good-3"]["metadata"] == {"lang": "en"}


def test_worker_rejects_bad_ids_of_a_raw_job_by_id(client, mc, collection):
    """A job sent as is (no producer-side checks): the worker itself names each bad item by its id."""
    raw = client.submit_index(collection, ["one", "two", "three", "four"], ["a", "a", None, 7]).raw()
    assert raw["stored"] == 2 and sorted(raw["ids"]) == ["7", "a"]
    assert raw["errors"] == [[1, "id 'a': duplicate id 'a': an earlier document of the same job has it"],
                             [2, "id None: id must be a non-empty string or integer, got NoneType"]]
    assert milvus.count(mc, collection) == 2


def test_duplicate_ids_in_different_jobs_of_one_call_are_rejected(client, mc, collection):
    texts = ["first text of dup", "other", "second text of dup"]
    report = client.index(collection, texts, ["dup", "other", "dup"], job_texts=2)
    assert [i for i, _ in report.rejected] == [2]
    assert _stored(mc, collection, ["dup"])["dup"]["text"] == texts[0]


# ---- the command line ------------------------------------------------------------------------------------

FILE_DOCS = [("f-1", "Milvus stores dense and sparse vectors."), ("f-2", "Redis carries the jobs."),
             ("f-3", "Workers run BGE-M3 on one device each."), ("f-4", "Tokyo is the capital of Japan.")]


def _write(path, kind: str) -> int:
    """FILE_DOCS (plus, in JSONL, one broken line) as ``kind``; returns how many rows the file has."""
    if kind == "jsonl":
        lines = [json.dumps({"id": i, "text": t, "source": "test"}) for i, t in FILE_DOCS] + ["{not json"]
        path.write_text("\n".join(lines) + "\n")
        return len(lines)
    if kind == "csv":
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text", "source"])
            w.writerows([(i, t, "test") for i, t in FILE_DOCS])
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": [i for i, _ in FILE_DOCS], "text": [t for _, t in FILE_DOCS]}), path)
    else:
        path.write_text("\n\n".join(t for _, t in FILE_DOCS) + "\n")  # blank lines are skipped
    return len(FILE_DOCS)


def _m3q(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=settings_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "txt"])
def test_m3q_index_a_file(worker, mc, tmp_path, collection, kind):
    path = tmp_path / f"docs.{kind}"
    rows = _write(path, kind)
    done = _m3q(worker.settings, "index", str(path), "--collection", collection)
    assert done.returncode == 0, done.stderr
    assert f"stored {len(FILE_DOCS)} of {rows} documents; rejected {rows - len(FILE_DOCS)}" in done.stdout
    assert milvus.count(mc, collection) == len(FILE_DOCS)
    if kind == "jsonl":
        assert "row 5:" in done.stdout and "not JSON" in done.stdout
    if kind == "txt":
        assert {r["id"] for r in mc.query(collection, filter="", limit=10)} == {f"docs.txt:{n}" for n in (1, 3, 5, 7)}
    else:
        stored = _stored(mc, collection, ["f-1"])["f-1"]
        assert stored["text"] == FILE_DOCS[0][1]
        assert stored["metadata"] == ({} if kind == "parquet" else {"source": "test"})


def test_m3q_index_rejects_a_repeated_id_even_in_another_job(worker, mc, tmp_path, collection):
    path = tmp_path / "dups.jsonl"
    rows = [{"id": "dup", "text": "first"}, {"id": "b", "text": "b"}, {"id": "c", "text": "c"},
            {"id": "dup", "text": "second"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _m3q(worker.settings.replace(job_texts=2), "index", str(path), "--collection", collection)
    assert done.returncode == 0, done.stderr
    assert "stored 3 of 4 documents; rejected 1" in done.stdout
    assert "row 4: id 'dup': duplicate id, first at row 1" in done.stdout
    assert _stored(mc, collection, ["dup"])["dup"]["text"] == "first"


def test_m3q_index_exits_nonzero_when_nothing_is_stored(worker, tmp_path, collection):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "text": ""}) + "\n" + json.dumps({"id": "b", "text": "   "}) + "\n")
    done = _m3q(worker.settings, "index", str(path), "--collection", collection)
    assert done.returncode == 1
    assert "stored 0 of 2 documents; rejected 2" in done.stdout


def test_m3q_index_into_a_mismatched_collection_fails_clearly(worker, client, mc, tmp_path, collection):
    sink.ensure_collection(mc, collection, client.dims()["dense"], "someone/else-model")
    path = tmp_path / "docs.txt"
    _write(path, "txt")
    done = _m3q(worker.settings, "index", str(path), "--collection", collection)
    assert done.returncode == 2
    assert collection in done.stderr and "someone/else-model" in done.stderr
    assert "Traceback" not in done.stderr
    assert milvus.count(mc, collection) == 0


def test_m3q_search_prints_ranked_hits(worker, indexed):
    done = _m3q(worker.settings, "search", DOCS["tokyo-1"], "--collection", indexed, "--mode", "dense", "--k", "3")
    assert done.returncode == 0, done.stderr
    hits = [re.match(r"^\s*(\d+)\.\s+(-?\d+\.\d+)\s+(\S+)\s+(.*)$", line) for line in done.stdout.splitlines()]
    assert len(hits) == 3 and all(hits), done.stdout
    assert [int(h[1]) for h in hits] == [1, 2, 3]
    scores = [float(h[2]) for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0, abs=1e-3)
    assert hits[0][3] == "tokyo-1" and hits[0][4] == DOCS["tokyo-1"]
    assert all(h[3] in DOCS and DOCS[h[3]].startswith(h[4]) for h in hits)


# ---- re-runs: what is stored unchanged is skipped ------------------------------------------------------------

def _write_jsonl(path, docs: dict[str, tuple[str, dict]]) -> None:
    path.write_text("".join(json.dumps({"id": i, "text": text, **meta}) + "\n" for i, (text, meta) in docs.items()))


def _vectors(mc, collection: str, ids) -> dict[str, list[float]]:
    return {r["id"]: r["dense"] for r in mc.get(collection, ids=list(ids), output_fields=["dense"])}


def test_m3q_index_again_encodes_only_new_and_changed_documents(worker, mc, tmp_path, collection):
    docs = {i: (text, {"source": "test"}) for i, text in FILE_DOCS}
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, docs)
    assert _m3q(worker.settings, "index", str(path), "--collection", collection).returncode == 0
    before, jobs = _vectors(mc, collection, docs), len(worker.task_ids("received"))

    again = _m3q(worker.settings, "index", str(path), "--collection", collection)
    assert again.returncode == 0, again.stderr
    assert "stored 0 of 4 documents; rejected 0; 4 skipped (unchanged)" in again.stdout
    assert "0 stored, 4 skipped (unchanged), 0 rejected" in again.stderr  # the progress bar's last state
    assert len(worker.task_ids("received")) == jobs  # the worker got no job: nothing was encoded
    assert _vectors(mc, collection, docs) == before

    docs["f-1"] = ("Milvus stores dense and sparse vectors, and more.", {"source": "test"})  # a new text
    docs["f-2"] = (docs["f-2"][0], {"source": "edited"})  # new metadata only
    docs["f-5"] = ("A fifth document.", {"source": "test"})
    _write_jsonl(path, docs)
    changed = _m3q(worker.settings, "index", str(path), "--collection", collection)
    assert changed.returncode == 0, changed.stderr
    assert "stored 3 of 5 documents; rejected 0; 2 skipped (unchanged)" in changed.stdout
    assert len(worker.task_ids("received")) == jobs + 1  # one job: the three documents
    stored = _stored(mc, collection, list(docs))
    assert {i: (r["text"], r["metadata"]) for i, r in stored.items()} == docs
    after = _vectors(mc, collection, docs)
    assert after["f-3"] == before["f-3"] and after["f-4"] == before["f-4"]
    assert after["f-1"] != before["f-1"]
    assert milvus.count(mc, collection) == 5

    forced = _m3q(worker.settings, "index", str(path), "--collection", collection, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "stored 5 of 5 documents; rejected 0" in forced.stdout and "skipped" not in forced.stdout
    assert len(worker.task_ids("received")) == jobs + 2


def test_m3q_index_into_a_collection_without_hashes_encodes_all_and_says_so(worker, client, mc, tmp_path, collection,
                                                                         recorded_model):
    make_collection_without_hashes(mc, collection, client.dims()["dense"], recorded_model)
    path = tmp_path / "docs.txt"
    _write(path, "txt")
    for _ in range(2):  # the note comes again on every run, once
        done = _m3q(worker.settings, "index", str(path), "--collection", collection)
        assert done.returncode == 0, done.stderr
        assert "stored 4 of 4 documents; rejected 0" in done.stdout and "skipped (unchanged)" not in done.stdout
        notes = [line for line in done.stdout.splitlines() if milvus.HASH_FIELD in line]
        assert len(notes) == 1 and "m3q reindex" in notes[0] and "--force" in notes[0], done.stdout
    forced = _m3q(worker.settings, "index", str(path), "--collection", collection, "--force")
    assert "stored 4 of 4 documents" in forced.stdout and milvus.HASH_FIELD not in forced.stdout
    assert milvus.count(mc, collection) == 4


def test_v1_index_skips_what_is_stored_unchanged(worker, mc, tmp_path, collection):
    gateway = GatewayProcess(worker.settings, tmp_path / "gateway.log").wait_ready()
    try:
        documents = [{"id": k, "text": v, "metadata": {"n": i}} for i, (k, v) in enumerate(DOCS.items())]

        def post(**extra) -> dict:
            answer = httpx.post(gateway.url + "/v1/index", json={"collection": collection, "documents": documents,
                                                                 **extra}, timeout=60)
            assert answer.status_code == 202, answer.text
            return answer.json()

        def finished(job_id: str) -> dict:
            job = {"state": "pending"}
            for _ in range(600):
                job = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", timeout=30).json()
                if job["state"] != "pending":
                    break
                time.sleep(0.1)
            return job

        first = finished(post()["id"])
        assert (first["state"], first["stored"], first["skipped"]) == ("done", len(DOCS), 0)
        documents[0]["metadata"] = {"n": "edited"}
        again = post()
        assert (again["accepted"], again["skipped"], again["jobs"]) == (1, len(DOCS) - 1, 1)
        assert (finished(again["id"])["stored"], finished(again["id"])["skipped"]) == (1, len(DOCS) - 1)
        assert _stored(mc, collection, ["milvus-1"])["milvus-1"]["metadata"] == {"n": "edited"}
        forced = post(force=True)
        assert (forced["accepted"], forced["skipped"]) == (len(DOCS), 0)
        assert finished(forced["id"])["stored"] == len(DOCS)
    finally:
        gateway.stop()
