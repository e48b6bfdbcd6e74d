"""The Milvus sink that index jobs write to: the collection's schema and indexes, row checks, upsert by id.

Only a worker writes rows; connecting, checking, counting and searching are the contract's
(:mod:`producer.contract.milvus`, which also describes the collection's layout), and this module builds on it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, Sequence

import numpy as np
from pymilvus import DataType, MilvusClient

from producer.contract import checks
from producer.contract.checks import ID_MAX_BYTES, TEXT_MAX_BYTES
from producer.contract.errors import MilvusError, MilvusRejected
from producer.contract.milvus import (
    EMPTY_SPARSE_TOKEN,
    HASH_CHARS,
    HASH_FIELD,
    PROP_DIM,
    PROP_MODEL,
    call_milvus,
    check_collection,
    collection_dim,
    collection_fields,
    content_hash,
)

SPARSE_INDEX_LIMIT = 2**32 - 1
"""Sparse token ids must lie in [0, 2**32 - 1) (Milvus stores them as uint32, the last one reserved)."""
EMPTY_SPARSE_WEIGHT = 1e-6
"""Weight of :data:`producer.contract.milvus.EMPTY_SPARSE_TOKEN`: nonzero (Milvus requires it), too small to matter."""
UPSERT_CHUNK_BYTES = 16 * 1024 * 1024
"""Rows are sent in chunks of about this size, well under Milvus' gRPC message limit."""
CREATE_RACE_WAIT_S = 5.0
"""After losing a create race, how long to wait for the winner's collection to appear."""
CREATE_RACE_SETTLE_S = 0.2
"""...and how long to leave the winner to finish opening it (Milvus Lite) before using it."""


# ---- collection ---------------------------------------------------------------------------------------

def ensure_collection(client: MilvusClient, name: str, dense_dim: int, model: str) -> None:
    """Create collection ``name`` on first use (schema and indexes above), check that an existing one was
    made for ``model`` and ``dense_dim`` (SchemaMismatch otherwise, before anything is written), and load
    it. Safe when several processes do it at once: a lost create race is tolerated and re-checked.

    ``model`` is compared as given, so pass a stable identity (a hub id), not a machine-specific path.
    """
    deadline = time.monotonic() + CREATE_RACE_WAIT_S
    while True:
        try:
            if not call_milvus(f"has_collection {name!r}", client.has_collection, name):
                _create_or_join(client, name, dense_dim, model)
            check_collection(client, name, dense_dim, model)
            _ensure_indexes(client, name)
            call_milvus(f"load collection {name!r}", client.load_collection, name)
            return
        except MilvusRejected:
            # Milvus Lite makes a collection in steps: another process's new one can be listed and not yet
            # described ("does not exist", seen with three jobs of a re-index at once under load). Look again.
            if time.monotonic() >= deadline:
                raise
            time.sleep(CREATE_RACE_SETTLE_S)


def _create_or_join(client: MilvusClient, name: str, dense_dim: int, model: str) -> None:
    try:
        call_milvus(f"create collection {name!r}", client.create_collection, name,
                    schema=_schema(dense_dim, model), properties={PROP_MODEL: model, PROP_DIM: str(dense_dim)},
                    consistency_level="Bounded")
    except (MilvusError, MilvusRejected):
        # Another process may have won the race; only a collection that does not appear is an error.
        if not _await_collection(client, name):
            raise


def _await_collection(client: MilvusClient, name: str) -> bool:
    # Milvus Lite's create is not atomic: a loser can fail ("File exists") while the winner is still
    # writing the collection, so wait for it to appear, then let the winner finish opening it.
    deadline = time.monotonic() + CREATE_RACE_WAIT_S
    while time.monotonic() < deadline:
        if call_milvus(f"has_collection {name!r}", client.has_collection, name):
            time.sleep(CREATE_RACE_SETTLE_S)
            return True
        time.sleep(0.05)
    return False


def _schema(dense_dim: int, model: str) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description=f"m3-queue: model={model}; dense_dim={dense_dim}")
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dense_dim)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("metadata", DataType.JSON)
    # Nullable: a worker that predates the field can still write to a collection that has it.
    schema.add_field(HASH_FIELD, DataType.VARCHAR, max_length=HASH_CHARS, nullable=True)
    return schema


def _ensure_indexes(client: MilvusClient, name: str) -> None:
    wanted = {"dense": ("AUTOINDEX", {}), "sparse": ("SPARSE_INVERTED_INDEX", {})}
    for field_name, (index_type, params) in wanted.items():
        if call_milvus("list indexes", client.list_indexes, name, field_name=field_name):
            continue
        index = client.prepare_index_params()
        index.add_index(field_name, index_type=index_type, metric_type="IP", index_name=field_name,
                        params=params)
        try:
            # sync=False: pymilvus would poll the build every 0.5 s; load_collection waits for it anyway.
            call_milvus(f"create index on {name!r}.{field_name}", client.create_index, name, index, sync=False)
        except (MilvusError, MilvusRejected):
            # A concurrent first use may have built it meanwhile ("already exists"); re-check.
            if not call_milvus("list indexes", client.list_indexes, name, field_name=field_name):
                raise


# ---- rows ---------------------------------------------------------------------------------------------

def row_problem(row: dict, dense_dim: int | None = None) -> str | None:
    """Why ``row`` cannot be stored, or None when it can (so a caller can reject one row, not a batch)."""
    rid, text = row.get("id"), row.get("text")
    if not isinstance(rid, str) or not rid or not isinstance(text, str):
        return "id must be a non-empty string and text a string"
    if checks.surrogate(rid) or checks.surrogate(text):
        return "id or text has a lone surrogate (not valid UTF-8)"
    if len(rid.encode("utf-8")) > ID_MAX_BYTES:
        return f"id is over {ID_MAX_BYTES} UTF-8 bytes"
    try:
        dense = np.asarray(row.get("dense"), dtype=np.float32)
    except (TypeError, ValueError):
        return "dense must be a vector of numbers"
    if dense.ndim != 1 or (dense_dim is not None and dense.shape[0] != dense_dim):
        return f"dense must be a vector of {dense_dim or 'the collection'}'s dim, got shape {dense.shape}"
    if not np.isfinite(dense).all():
        return "dense has a NaN or infinite value"
    return _sparse_problem(row.get("sparse")) or checks.metadata_problem(row.get("metadata"))


def _sparse_problem(sparse: object) -> str | None:
    if not isinstance(sparse, dict):
        return "sparse must be a dict {token id: weight}"
    for token, weight in sparse.items():
        try:
            token_ok = 0 <= int(token) < SPARSE_INDEX_LIMIT and int(token) != EMPTY_SPARSE_TOKEN
            weight_ok = math.isfinite(weight) and weight >= 0
        except (TypeError, ValueError):
            return f"sparse entry {token!r}: {weight!r} is not an int token id and a number"
        if not token_ok:
            return f"sparse token id {token} is out of range"
        if not weight_ok:
            return f"sparse weight of token {token} is {weight}, not a finite non-negative number"
    return None


def fit_text(text: str) -> str:
    """``text`` cut to at most TEXT_MAX_BYTES UTF-8 bytes, on a character boundary."""
    raw = text.encode("utf-8")
    if len(raw) <= TEXT_MAX_BYTES:
        return text
    return raw[:TEXT_MAX_BYTES].decode("utf-8", "ignore")


def stored_sparse(sparse: dict) -> dict[int, float]:
    """The sparse row Milvus stores: zero weights dropped, plain ints and floats, and for an empty vector
    the placeholder {EMPTY_SPARSE_TOKEN: EMPTY_SPARSE_WEIGHT} (Milvus rejects an empty row)."""
    kept = {int(t): float(w) for t, w in sparse.items() if w > 0}
    return kept or {EMPTY_SPARSE_TOKEN: EMPTY_SPARSE_WEIGHT}


def _to_milvus(row: dict, hashed: bool) -> dict:
    # The hash is of the full text: the one the vectors, and the producer's hash, come from.
    stored = {"id": row["id"], "text": fit_text(row["text"]),
              "dense": np.asarray(row["dense"], dtype=np.float32).tolist(),
              "sparse": stored_sparse(row["sparse"]), "metadata": row.get("metadata") or {}}
    if hashed:
        stored[HASH_FIELD] = content_hash(row["text"], row.get("metadata"))
    return stored


def _chunks(rows: list[dict]) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    size = 0
    for row in rows:
        row_bytes = len(row["text"]) * 4 + len(row["dense"]) * 4 + len(row["sparse"]) * 12 + 256
        if chunk and size + row_bytes > UPSERT_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += row_bytes
    if chunk:
        yield chunk


def upsert(client: MilvusClient, name: str, rows: Sequence[dict]) -> int:
    """Insert or replace ``rows`` by id (idempotent) and return how many distinct rows were written.

    Each row: ``id`` (str), ``text`` (str), ``dense`` (float32 array), ``sparse`` ({token id: weight}),
    ``metadata`` (dict, optional). Rows are checked first: an invalid one raises MilvusRejected naming it,
    before anything is written (use :func:`row_problem` to drop bad rows one by one). Within one call the
    last row of a repeated id wins.

    Texts over TEXT_MAX_BYTES UTF-8 bytes are stored truncated (the vectors come from the full text).
    A text whose sparse vector is empty (or all zeros) is stored with the placeholder
    ``{EMPTY_SPARSE_TOKEN: EMPTY_SPARSE_WEIGHT}``: Milvus (and Milvus Lite) reject an empty sparse row,
    and this token id lies outside every vocabulary, so the document never matches a sparse query while
    dense and hybrid search find it as usual. Each row is stored with its
    :func:`~producer.contract.milvus.content_hash` where the collection has that field. Transient failures
    raise MilvusError.
    """
    fields = collection_fields(client, name)
    dim = collection_dim(client, name, fields)
    for i, row in enumerate(rows):
        problem = row_problem(row, dim)
        if problem:
            raise MilvusRejected(f"row {i} (id {row.get('id')!r}) cannot go into {name!r}: {problem}")
    unique = list({row["id"]: row for row in rows}.values())
    written = 0
    for chunk in _chunks([_to_milvus(r, HASH_FIELD in fields) for r in unique]):
        result = call_milvus(f"upsert into {name!r}", client.upsert, name, chunk)
        written += int(result.get("upsert_count", len(chunk)))
    return written
