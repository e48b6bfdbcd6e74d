"""The Milvus sink and search: collection schema, upsert by id, count, dense/sparse/hybrid search.
Light: pymilvus and numpy only (no torch). The embedded Milvus Lite server is in :mod:`producer.milvus_lite`.

Errors are split on purpose: :class:`MilvusError` is retryable (Milvus unreachable or transient),
:class:`SchemaMismatch` and :class:`MilvusRejected` are fatal (retrying cannot help).

Collection layout (DESIGN.md, "Milvus"): ``id`` VARCHAR primary key (the caller's id, so re-indexing is
an idempotent upsert), ``text`` VARCHAR, ``dense`` FLOAT_VECTOR(dim), ``sparse`` SPARSE_FLOAT_VECTOR,
``metadata`` JSON; both vector indexes use the IP metric. The model name and dense dimension are recorded
in the collection's properties (and its description), so a worker running another model cannot mix
vectors of two models in one collection.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import (
    CollectionNotExistException, ConnectionConfigException, DataNotMatchException,
    DataTypeNotMatchException, FieldsTypeException, FieldTypeException, MilvusException, ParamError,
    PrimaryKeyException,
)

from producer import checks
from producer.checks import ID_MAX_BYTES, METADATA_MAX_BYTES, TEXT_MAX_BYTES  # noqa: F401 - the schema's limits
from producer.settings import Settings
from producer.errors import ConfigError, MilvusError, MilvusRejected, SchemaMismatch  # noqa: F401 - re-exported

SPARSE_INDEX_LIMIT = 2**32 - 1
"""Sparse token ids must lie in [0, 2**32 - 1) (Milvus stores them as uint32, the last one reserved)."""
EMPTY_SPARSE_TOKEN = 2**32 - 2
"""Token id stored for a text whose sparse vector is empty: outside every vocabulary, so no query has it."""
EMPTY_SPARSE_WEIGHT = 1e-6
"""Weight of :data:`EMPTY_SPARSE_TOKEN`: nonzero (Milvus requires it) and too small to matter anyway."""
UPSERT_CHUNK_BYTES = 16 * 1024 * 1024
"""Rows are sent in chunks of about this size, well under Milvus' gRPC message limit."""
CONNECT_TIMEOUT_S = 10.0
"""How long a connection attempt may take before it is a MilvusError."""
CREATE_RACE_WAIT_S = 5.0
"""After losing a create race, how long to wait for the winner's collection to appear."""
CREATE_RACE_SETTLE_S = 0.2
"""...and how long to leave the winner to finish opening it (Milvus Lite) before using it."""
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 330_000}
"""pymilvus pings every 10 s even on an idle channel, which a gRPC server with the default policy (one
ping per 5 min without data, as Milvus Lite's) answers with GOAWAY ``too_many_pings`` and a dropped
channel; pinging just above those 5 min keeps the channel and the logs quiet."""
LITE_HOST = "127.0.0.1"
"""The embedded server binds to loopback only: Milvus Lite has no authentication."""
PROP_MODEL = "m3q.model"
PROP_DIM = "m3q.dense_dim"
FIELDS = ("id", "text", "dense", "sparse", "metadata")
MODES = ("hybrid", "dense", "sparse")
RRF_K = 60
"""RRF's smoothing constant (the usual value, and pymilvus' default)."""


@dataclass
class Hit:
    """One search result."""

    id: str
    score: float
    text: str
    metadata: dict = field(default_factory=dict)


# ---- errors -------------------------------------------------------------------------------------------

# Client-side validation errors and "illegal argument"/"no such collection" codes of Milvus and Milvus
# Lite: the same request fails again. Everything else (unavailable, timeouts, rate limits) is retryable.
_FATAL_TYPES = (ParamError, DataTypeNotMatchException, DataNotMatchException, PrimaryKeyException,
                FieldTypeException, FieldsTypeException, ConnectionConfigException,
                CollectionNotExistException)
_FATAL_CODES = frozenset({4, 5, 6, 100, 1100})


def _reason(e: BaseException) -> str:
    return str(getattr(e, "message", "") or e)


def _translate(e: BaseException, what: str) -> Exception:
    if isinstance(e, _FATAL_TYPES) or getattr(e, "code", None) in _FATAL_CODES:
        return MilvusRejected(f"{what}: {_reason(e)}")
    return MilvusError(f"{what}: {_reason(e)}")


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with pymilvus and gRPC errors turned into MilvusError / MilvusRejected."""
    try:
        return fn(*args, **kwargs)
    except (MilvusException, grpc.RpcError, ConnectionError) as e:
        raise _translate(e, what) from e


def redact(uri: str) -> str:
    """``uri`` without a password in its user part, fit for logs and error messages."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# ---- connection ---------------------------------------------------------------------------------------

def milvus_uri(settings: Settings) -> str:
    """The URI the settings point at: M3Q_MILVUS_URI, or the embedded server on M3Q_MILVUS_PORT."""
    uri = settings.milvus_uri or f"http://{LITE_HOST}:{settings.milvus_port}"
    if uri.endswith(".db") and "://" not in uri:
        uri = str(Path(uri).expanduser())
    return uri


def connect(settings: Settings, timeout_s: float = CONNECT_TIMEOUT_S, tries: int = 3) -> MilvusClient:
    """A client for the Milvus of ``settings`` (server URI, Milvus Lite ``.db`` path, or the embedded
    server when M3Q_MILVUS_URI is empty). Raises MilvusError, naming the URI, when it cannot connect.

    Tried ``tries`` times: pymilvus shares one gRPC channel per URI, and Milvus Lite closes an idle one
    ("too many pings"); the first call on it then fails once and the next one opens a fresh channel.
    """
    uri = milvus_uri(settings)
    for attempt in range(1, tries + 1):
        try:
            return _connect_once(uri, settings.milvus_token, timeout_s)
        except MilvusError:
            if attempt == tries:
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def check_reachable(settings: Settings) -> None:
    """Raise MilvusError (naming M3Q_MILVUS_URI and `m3q milvus`) unless the Milvus server of ``settings``
    answers; a Milvus Lite ``.db`` path is not opened here, since it serves one process (the worker's)."""
    if "://" in milvus_uri(settings):
        connect(settings).close()


def _connect_once(uri: str, token: str, timeout_s: float) -> MilvusClient:
    extra = {"token": token} if token else {}
    client = None
    try:
        client = MilvusClient(uri=uri, timeout=timeout_s, grpc_options=GRPC_OPTIONS, **extra)
        client.list_collections(timeout=timeout_s)  # some URIs connect lazily: prove it answers now
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot reach Milvus at uri"
        if client is not None:
            client.close()
        raise MilvusError(f"cannot connect to Milvus at {redact(uri)}: {_reason(e)}; {_way_out(uri)}") from e
    return client


def _way_out(uri: str) -> str:
    """What to do when Milvus at ``uri`` does not answer (the error names both the setting and the command)."""
    if uri.startswith(f"http://{LITE_HOST}:"):
        return "start the embedded server with `m3q milvus`, or set M3Q_MILVUS_URI to your Milvus"
    return "is Milvus running there? check M3Q_MILVUS_URI (`m3q milvus` runs an embedded one locally)"


# ---- collection ---------------------------------------------------------------------------------------

def ensure_collection(client: MilvusClient, name: str, dense_dim: int, model: str) -> None:
    """Create collection ``name`` on first use (schema and indexes above), check that an existing one was
    made for ``model`` and ``dense_dim`` (SchemaMismatch otherwise, before anything is written), and load
    it. Safe when several processes do it at once: a lost create race is tolerated and re-checked.

    ``model`` is compared as given, so pass a stable identity (a hub id), not a machine-specific path.
    """
    if not _call(f"has_collection {name!r}", client.has_collection, name):
        _create_or_join(client, name, dense_dim, model)
    check_collection(client, name, dense_dim, model)
    _ensure_indexes(client, name)
    _call(f"load collection {name!r}", client.load_collection, name)


def _create_or_join(client: MilvusClient, name: str, dense_dim: int, model: str) -> None:
    try:
        _call(f"create collection {name!r}", client.create_collection, name,
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
        if _call(f"has_collection {name!r}", client.has_collection, name):
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
    return schema


def check_collection(client: MilvusClient, name: str, dense_dim: int, model: str) -> None:
    """Raise SchemaMismatch unless collection ``name`` has m3-queue's fields, ``dense_dim`` and ``model``."""
    info = _call(f"describe collection {name!r}", client.describe_collection, name)
    fields_found = {f["name"]: f for f in info.get("fields", [])}
    missing = [f for f in FIELDS if f not in fields_found]
    if missing:
        raise SchemaMismatch(f"collection {name!r} was not made by m3-queue: it lacks field(s) "
                             f"{', '.join(missing)}; use another collection name")
    found_dim = int(fields_found["dense"].get("params", {}).get("dim", -1))
    found_model = _recorded_model(info)
    if found_dim != dense_dim or found_model != model:
        raise SchemaMismatch(
            f"collection {name!r} holds {found_model or 'an unrecorded model'} vectors of dim {found_dim}; "
            f"expected {model} vectors of dim {dense_dim}. Use another collection name or the model it "
            f"was made with (nothing was written)")


def _recorded_model(info: dict) -> str | None:
    # Properties are the record; the description is a fallback for servers that drop custom properties.
    props = info.get("properties") or {}
    if props.get(PROP_MODEL):
        return str(props[PROP_MODEL])
    desc = str(info.get("description") or "")
    if desc.startswith("m3-queue: model=") and "; dense_dim=" in desc:
        return desc[len("m3-queue: model="):desc.rindex("; dense_dim=")]
    return None


def _ensure_indexes(client: MilvusClient, name: str) -> None:
    wanted = {"dense": ("AUTOINDEX", {}), "sparse": ("SPARSE_INVERTED_INDEX", {})}
    for field_name, (index_type, params) in wanted.items():
        if _call("list indexes", client.list_indexes, name, field_name=field_name):
            continue
        index = client.prepare_index_params()
        index.add_index(field_name, index_type=index_type, metric_type="IP", index_name=field_name,
                        params=params)
        try:
            # sync=False: pymilvus would poll the build every 0.5 s; load_collection waits for it anyway.
            _call(f"create index on {name!r}.{field_name}", client.create_index, name, index, sync=False)
        except (MilvusError, MilvusRejected):
            # A concurrent first use may have built it meanwhile ("already exists"); re-check.
            if not _call("list indexes", client.list_indexes, name, field_name=field_name):
                raise


def _dense_dim(client: MilvusClient, name: str) -> int:
    info = _call(f"describe collection {name!r}", client.describe_collection, name)
    dense = [f for f in info.get("fields", []) if f["name"] == "dense"]
    if not dense:
        raise SchemaMismatch(f"collection {name!r} has no 'dense' field: it was not made by m3-queue")
    return int(dense[0]["params"]["dim"])


# ---- rows ---------------------------------------------------------------------------------------------

def row_problem(row: dict, dense_dim: int | None = None) -> str | None:
    """Why ``row`` cannot be stored, or None when it can (so a caller can reject one row, not a batch)."""
    rid, text = row.get("id"), row.get("text")
    if not isinstance(rid, str) or not rid or not isinstance(text, str):
        return "id must be a non-empty string and text a string"
    if not _is_utf8(rid) or not _is_utf8(text):
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


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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


def _to_milvus(row: dict) -> dict:
    return {"id": row["id"], "text": fit_text(row["text"]),
            "dense": np.asarray(row["dense"], dtype=np.float32).tolist(),
            "sparse": stored_sparse(row["sparse"]), "metadata": row.get("metadata") or {}}


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
    dense and hybrid search find it as usual. Transient failures raise MilvusError.
    """
    dim = _dense_dim(client, name)
    for i, row in enumerate(rows):
        problem = row_problem(row, dim)
        if problem:
            raise MilvusRejected(f"row {i} (id {row.get('id')!r}) cannot go into {name!r}: {problem}")
    unique = list({row["id"]: row for row in rows}.values())
    written = 0
    for chunk in _chunks([_to_milvus(r) for r in unique]):
        result = _call(f"upsert into {name!r}", client.upsert, name, chunk)
        written += int(result.get("upsert_count", len(chunk)))
    return written


def count(client: MilvusClient, name: str) -> int:
    """The exact number of rows in ``name`` (a strongly consistent count(*))."""
    result = _call(f"count rows of {name!r}", client.query, name, filter="",
                   output_fields=["count(*)"], consistency_level="Strong")
    return int(result[0]["count(*)"])


# ---- search -------------------------------------------------------------------------------------------

def _ranker(ranker: str) -> Any:
    """'rrf', 'rrf:K', 'weighted' (0.5/0.5) or 'weighted:DENSE,SPARSE'."""
    kind, _, args = ranker.partition(":")
    if kind == "rrf":
        return RRFRanker(int(args) if args else RRF_K)
    if kind == "weighted":
        weights = [float(w) for w in args.split(",")] if args else [0.5, 0.5]
        if len(weights) != 2:
            raise ConfigError(f"ranker {ranker!r}: weighted needs two weights, dense and sparse")
        return WeightedRanker(*weights)
    raise ConfigError(f"unknown ranker {ranker!r}; use rrf, rrf:K, weighted or weighted:DENSE,SPARSE")


def _query_sparse(sparse: dict | None) -> dict[int, float]:
    # The placeholder of empty rows is dropped too, so it can never make those rows match.
    return {int(t): float(w) for t, w in (sparse or {}).items() if w > 0 and int(t) != EMPTY_SPARSE_TOKEN}


def _hits(result: Any) -> list[Hit]:
    rows = result[0] if result else []
    return [Hit(id=str(r["id"]), score=float(r["distance"]), text=r["entity"].get("text", ""),
                metadata=r["entity"].get("metadata") or {}) for r in rows]


def search(client: MilvusClient, name: str, dense: np.ndarray | None, sparse: dict[int, float] | None,
           mode: str = "hybrid", k: int = 10, ranker: str = "rrf",
           consistency_level: str = "Strong") -> list[Hit]:
    """The ``k`` best documents of ``name`` for one query, best first.

    ``mode``: dense (IP on ``dense``), sparse (IP on ``sparse``) or hybrid (one AnnSearchRequest per
    field, merged by ``ranker``: rrf by default, or weighted). An empty sparse query gives [] in sparse
    mode and falls back to dense in hybrid mode. ``consistency_level`` Strong sees every finished upsert;
    Bounded answers faster but may miss the last seconds of writes.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown search mode {mode!r}; use {', '.join(MODES)}")
    query_sparse = _query_sparse(sparse)
    if mode == "sparse" and not query_sparse:
        return []
    if mode != "sparse" and dense is None:
        raise ConfigError(f"{mode} search needs a dense query vector")
    common = dict(limit=k, output_fields=["text", "metadata"], consistency_level=consistency_level)
    what = f"{mode} search in {name!r}"
    if mode == "hybrid" and query_sparse:
        # Each side brings more candidates than k so the fusion can promote a document found by both.
        per_field = min(2 * k, 16384)  # Milvus' limit on one request's hits
        reqs = [AnnSearchRequest([_dense_list(dense)], "dense", {"metric_type": "IP"}, per_field),
                AnnSearchRequest([query_sparse], "sparse", {"metric_type": "IP"}, per_field)]
        return _hits(_call(what, client.hybrid_search, name, reqs, _ranker(ranker), **common))
    field_name, data = ("sparse", query_sparse) if mode == "sparse" else ("dense", _dense_list(dense))
    return _hits(_call(what, client.search, name, data=[data], anns_field=field_name,
                       search_params={"metric_type": "IP"}, **common))


def _dense_list(dense: np.ndarray) -> list[float]:
    return np.asarray(dense, dtype=np.float32).reshape(-1).tolist()
