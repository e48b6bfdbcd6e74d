"""The Milvus sink (worker/sink.py) and the producer's Milvus calls (producer/contract/milvus.py) against a real Milvus
Lite server (``milvus-lite server``), no mocks.

Vectors are random, L2-normalised float32 of dim 32: the schema, upsert and search logic do not need a model.
"""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from producer import milvus_lite
from producer.contract import milvus
from producer.contract.milvus import Hit, MilvusError, MilvusRejected, SchemaMismatch
from producer.contract.settings import Settings
from tests.conftest import free_port
from worker import sink

DIM = 32
MODEL = "test/model-a"


@pytest.fixture(scope="session")
def lite(tmp_path_factory):
    """One Milvus Lite server for the whole session, on a free port, stopped at the end."""
    server = milvus_lite.LiteServer(tmp_path_factory.mktemp("milvus"), free_port())
    with server:
        yield server


@pytest.fixture
def client(lite):
    c = milvus.connect(Settings(milvus_port=lite.port))
    yield c
    c.close()


@pytest.fixture
def collection(client):
    """A fresh collection name per test, created for MODEL and DIM."""
    name = "t_" + uuid.uuid4().hex[:12]
    sink.ensure_collection(client, name, DIM, MODEL)
    return name


def unit(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"doc-{i}", "text": f"text {i}", "dense": unit(rng),
             "sparse": {1000 + i: 0.5, 7: 0.1}, "metadata": {"i": i}} for i in range(n)]


def test_create_upsert_count(client, collection):
    assert sink.upsert(client, collection, make_rows(20)) == 20
    assert milvus.count(client, collection) == 20
    sink.ensure_collection(client, collection, DIM, MODEL)  # a second first-use is a no-op
    assert milvus.count(client, collection) == 20


def test_reupsert_is_idempotent_by_id(client, collection):
    rows = make_rows(10)
    sink.upsert(client, collection, rows)
    for row in rows:
        row["text"] = "new " + row["text"]
    assert sink.upsert(client, collection, rows + rows[:3]) == 10  # repeated ids in one call: last wins
    assert milvus.count(client, collection) == 10
    top = milvus.search(client, collection, rows[4]["dense"], None, mode="dense", k=1)
    assert top[0].id == "doc-4" and top[0].text == "new text 4" and top[0].metadata == {"i": 4}


def test_own_dense_vector_finds_document_first(client, collection):
    rows = make_rows(30, seed=1)
    sink.upsert(client, collection, rows)
    for row in rows[::5]:
        hits = milvus.search(client, collection, row["dense"], None, mode="dense", k=3)
        assert isinstance(hits[0], Hit)
        assert hits[0].id == row["id"]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)  # IP of a unit vector with itself


def test_hybrid_merges_dense_and_sparse(client, collection):
    rng = np.random.default_rng(2)
    query = unit(rng)
    rows = make_rows(30, seed=3)
    # dense-only winner: the query's own vector, no shared token; sparse-only winner: the query's token.
    rows.append({"id": "dense-win", "text": "d", "dense": query, "sparse": {5000: 1.0}, "metadata": {}})
    rows.append({"id": "sparse-win", "text": "s", "dense": -query, "sparse": {42: 3.0}, "metadata": {}})
    sink.upsert(client, collection, rows)
    sparse_query = {42: 1.0}
    dense_ids = [h.id for h in milvus.search(client, collection, query, sparse_query, mode="dense", k=3)]
    sparse_ids = [h.id for h in milvus.search(client, collection, query, sparse_query, mode="sparse", k=3)]
    assert dense_ids[0] == "dense-win" and "sparse-win" not in dense_ids
    assert sparse_ids == ["sparse-win"]
    for ranker in ("rrf", "weighted:0.5,0.5"):
        hybrid = milvus.search(client, collection, query, sparse_query, mode="hybrid", k=3, ranker=ranker)
        assert {"dense-win", "sparse-win"} <= {h.id for h in hybrid}, ranker


@pytest.mark.parametrize("dim,model", [(DIM * 2, MODEL), (DIM, "test/model-b")])
def test_schema_mismatch_raises_and_writes_nothing(client, collection, dim, model):
    sink.upsert(client, collection, make_rows(5))
    with pytest.raises(SchemaMismatch) as err:
        sink.ensure_collection(client, collection, dim, model)
    message = str(err.value)
    assert collection in message and str(dim) in message and str(DIM) in message
    assert model in message and MODEL in message
    assert milvus.count(client, collection) == 5
    props = client.describe_collection(collection)["properties"]
    assert props[milvus.PROP_MODEL] == MODEL and props[milvus.PROP_DIM] == str(DIM)


def test_empty_sparse_row_is_stored_and_never_matches_sparse(client, collection):
    rng = np.random.default_rng(40)
    rows = make_rows(5, seed=4)
    empty = {"id": "no-sparse", "text": "!!!", "dense": unit(rng), "sparse": {}, "metadata": {}}
    zeros = {"id": "zero-sparse", "text": "...", "dense": unit(rng), "sparse": {9: 0.0}, "metadata": {}}
    assert sink.upsert(client, collection, rows + [empty, zeros]) == 7
    assert milvus.count(client, collection) == 7
    stored = client.get(collection, ids=["no-sparse"], output_fields=["sparse"])[0]["sparse"]
    assert set(stored) == {milvus.EMPTY_SPARSE_TOKEN}
    assert milvus.search(client, collection, empty["dense"], None, mode="dense", k=1)[0].id == "no-sparse"
    # Hybrid still finds it through its dense side: first when no document matches the sparse query.
    assert milvus.search(client, collection, empty["dense"], {123: 1.0}, mode="hybrid", k=1)[0].id == "no-sparse"
    hybrid = milvus.search(client, collection, empty["dense"], {7: 1.0, 9: 1.0}, mode="hybrid", k=7)
    assert "no-sparse" in {h.id for h in hybrid}
    sparse_ids = {h.id for h in milvus.search(client, collection, None, {7: 1.0, 9: 1.0}, mode="sparse", k=10)}
    assert sparse_ids == {r["id"] for r in rows}


def test_empty_sparse_query(client, collection):
    rows = make_rows(5, seed=5)
    sink.upsert(client, collection, rows)
    assert milvus.search(client, collection, rows[2]["dense"], {}, mode="sparse") == []
    hybrid = milvus.search(client, collection, rows[2]["dense"], {}, mode="hybrid", k=2)
    assert hybrid[0].id == "doc-2"  # fell back to dense


def test_invalid_row_is_rejected_before_any_write(client, collection):
    rows = make_rows(4)
    rows[2]["dense"] = np.full(DIM, np.nan, dtype=np.float32)
    with pytest.raises(MilvusRejected, match="doc-2"):
        sink.upsert(client, collection, rows)
    assert milvus.count(client, collection) == 0
    assert sink.row_problem(make_rows(1)[0] | {"dense": np.ones(DIM + 1)}, DIM)
    assert sink.row_problem(make_rows(1)[0] | {"sparse": {3: -1.0}}, DIM)
    assert sink.row_problem(make_rows(1)[0] | {"dense": "not a vector"}, DIM)
    assert sink.row_problem(make_rows(1)[0] | {"text": "bad \ud800 surrogate"}, DIM)
    assert sink.row_problem(make_rows(1)[0] | {"id": "x" * (sink.ID_MAX_BYTES + 1)}, DIM)
    assert sink.row_problem(make_rows(1)[0] | {"metadata": {"blob": "x" * 70_000}}, DIM)
    assert sink.row_problem(make_rows(1)[0], DIM) is None


def test_long_text_is_stored_truncated_on_a_character_boundary(client, collection):
    row = make_rows(1)[0] | {"text": "é" * 40_000}  # 80,000 UTF-8 bytes
    sink.upsert(client, collection, [row])
    stored = milvus.search(client, collection, row["dense"], None, mode="dense", k=1)[0].text
    assert len(stored.encode("utf-8")) <= sink.TEXT_MAX_BYTES
    assert stored == "é" * (sink.TEXT_MAX_BYTES // 2)


def test_concurrent_first_use_is_safe(lite):
    name = "race_" + uuid.uuid4().hex[:12]

    def first_use(_: int) -> None:
        own = milvus.connect(Settings(milvus_port=lite.port))
        try:
            sink.ensure_collection(own, name, DIM, MODEL)
        finally:
            own.close()

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(first_use, range(6)))
    client = milvus.connect(Settings(milvus_port=lite.port))
    assert client.list_collections().count(name) == 1
    assert sorted(client.list_indexes(name)) == ["dense", "sparse"]
    client.close()


# ---- content hashes ----------------------------------------------------------------------------------------

def make_collection_without_hashes(client: MilvusClient, name: str, dim: int, model: str) -> None:
    """A collection in the layout m3-queue made before content hashes (no ``content_hash`` field), loaded."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=sink.ID_MAX_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=sink.TEXT_MAX_BYTES)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("metadata", DataType.JSON)
    client.create_collection(name, schema=schema, properties={milvus.PROP_MODEL: model, milvus.PROP_DIM: str(dim)})
    sink.ensure_collection(client, name, dim, model)  # its indexes, and loaded
    assert milvus.HASH_FIELD not in milvus.collection_fields(client, name)


def test_content_hash_covers_text_and_metadata_and_nothing_else():
    base = milvus.content_hash("a text", {"lang": "en", "n": 1})
    assert len(base) == milvus.HASH_CHARS and int(base, 16) >= 0
    assert milvus.content_hash("a text", {"n": 1, "lang": "en"}) == base  # key order is not content
    assert milvus.content_hash("a text", {"lang": "en", "n": 2}) != base
    assert milvus.content_hash("a text.", {"lang": "en", "n": 1}) != base
    assert milvus.content_hash("a text", None) == milvus.content_hash("a text", {})  # stored alike
    assert milvus.content_hash("x", {1: "a"}) == milvus.content_hash("x", {"1": "a"})  # JSON's keys are strings
    assert milvus.content_hash(7, None) is None  # never stored, so never skipped


def test_upsert_stores_each_rows_content_hash(client, collection):
    rows = make_rows(5)
    rows[0]["metadata"] = None
    sink.upsert(client, collection, rows)
    stored = milvus.stored_hashes(client, collection, [r["id"] for r in rows] + ["not-stored"])
    assert stored == {r["id"]: milvus.content_hash(r["text"], r["metadata"]) for r in rows}


def test_stored_hashes_reads_ids_with_quotes_and_backslashes(client, collection):
    ids = ["it's", 'say "hi"', "back\\slash", "tab\tand\nnewline", "日本語", "' or id != '"]
    rows = make_rows(len(ids) - 1)
    for row, rid in zip(rows, ids):
        row["id"] = rid
    sink.upsert(client, collection, rows)
    stored = milvus.stored_hashes(client, collection, ids + ['" or id != "', "ctl\x01"])
    assert sorted(stored) == sorted(ids[:-1])  # the would-be injection matches nothing; a control char is not asked


def test_a_collection_without_the_hash_field_still_takes_rows(client):
    name = "t_" + uuid.uuid4().hex[:12]
    make_collection_without_hashes(client, name, DIM, MODEL)
    assert sink.upsert(client, name, make_rows(4)) == 4
    assert milvus.count(client, name) == 4


def test_unreachable_uri_raises_milvus_error_quickly():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(MilvusError) as err:
        milvus.connect(Settings(milvus_uri=uri, milvus_token="root:s3cret-token"))
    assert time.monotonic() - started < 5
    assert uri in str(err.value) and "s3cret" not in str(err.value)


def test_lite_db_path(tmp_path):
    client = milvus.connect(Settings(milvus_uri=str(tmp_path / "one.db")))
    sink.ensure_collection(client, "docs", DIM, MODEL)
    assert sink.upsert(client, "docs", make_rows(3)) == 3
    assert milvus.count(client, "docs") == 3


def test_ensure_lite_server_reuses_a_running_one(lite):
    assert milvus_lite.ensure_lite_server(Settings(milvus_port=lite.port)) is None


def test_lite_server_failure_reports_the_log(lite):
    # A second server on the same data directory cannot take its lock and exits.
    with pytest.raises(MilvusError, match="exited") as err:
        milvus_lite.start_lite_server(lite.data_dir, free_port(), timeout_s=30)
    assert "lock" in str(err.value).lower()


def test_redact_hides_password():
    assert milvus.redact("https://user:pw@host:19530") == "https://user:***@host:19530"
    assert milvus.redact("http://host:19530") == "http://host:19530"
