"""Milvus for both sides: connect, check a collection, count, dense/sparse/hybrid search, the collection's layout.
Light: pymilvus and numpy only (no torch), imported by whoever uses it, never by ``import producer``. The
embedded Milvus Lite server is in :mod:`producer.milvus_lite`; the sink that creates collections and writes
rows is the worker's (:mod:`worker.sink`).

Errors are split on purpose: :class:`MilvusError` is retryable (Milvus unreachable or transient),
:class:`SchemaMismatch` and :class:`MilvusRejected` are fatal (retrying cannot help).

Collection layout: ``id`` VARCHAR primary key (the caller's id, so re-indexing is
an idempotent upsert), ``text`` VARCHAR, ``dense`` FLOAT_VECTOR(dim), ``sparse`` SPARSE_FLOAT_VECTOR,
``metadata`` JSON, ``content_hash`` VARCHAR (:func:`content_hash` of the text and metadata, so a re-run skips
documents stored unchanged; collections made before it existed lack it and are indexed whole); both
vector indexes use the IP metric. The model name and dense dimension are recorded
in the collection's properties (and its description), so a worker running another model cannot mix
vectors of two models in one collection.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker, WeightedRanker
from pymilvus.exceptions import (
    CollectionNotExistException,
    ConnectionConfigException,
    DataNotMatchException,
    DataTypeNotMatchException,
    FieldsTypeException,
    FieldTypeException,
    MilvusException,
    ParamError,
    PrimaryKeyException,
)

from producer.contract.errors import ConfigError, MilvusError, MilvusRejected, SchemaMismatch  # noqa: F401 - re-exported
from producer.contract.settings import Settings

EMPTY_SPARSE_TOKEN = 2**32 - 2
"""Token id stored for a text whose sparse vector is empty: outside every vocabulary, so no query has it
(the sink, :mod:`worker.sink`, stores it; search drops it from queries)."""
CONNECT_TIMEOUT_S = 10.0
"""How long a connection attempt may take before it is a MilvusError."""
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 330_000}
"""pymilvus pings every 10 s even on an idle channel, which a gRPC server with the default policy (one
ping per 5 min without data, as Milvus Lite's) answers with GOAWAY ``too_many_pings`` and a dropped
channel; pinging just above those 5 min keeps the channel and the logs quiet."""
LITE_HOST = "127.0.0.1"
"""The embedded server binds to loopback only: Milvus Lite has no authentication."""
PROP_MODEL = "m3q.model"
PROP_DIM = "m3q.dense_dim"
FIELDS = ("id", "text", "dense", "sparse", "metadata")
"""The fields every m3-queue collection has."""
HASH_FIELD = "content_hash"
"""The field of :func:`content_hash`, absent from collections made before it existed."""
HASH_CHARS = 32
"""Hex digits kept of the sha256 (128 bits: no two documents of a collection share one by chance)."""
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


def call_milvus(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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

def check_collection(client: MilvusClient, name: str, dense_dim: int, model: str) -> None:
    """Raise SchemaMismatch unless collection ``name`` has m3-queue's fields, ``dense_dim`` and ``model``."""
    info = call_milvus(f"describe collection {name!r}", client.describe_collection, name)
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


def collection_fields(client: MilvusClient, name: str) -> dict[str, dict]:
    """The fields of collection ``name`` by name, as Milvus describes them."""
    info = call_milvus(f"describe collection {name!r}", client.describe_collection, name)
    return {f["name"]: f for f in info.get("fields", [])}


def collection_dim(client: MilvusClient, name: str, fields: dict[str, dict] | None = None) -> int:
    """The dense vector size of collection ``name`` (or of its ``fields``, when described already);
    SchemaMismatch if it has no m3-queue dense field."""
    dense = (fields if fields is not None else collection_fields(client, name)).get("dense")
    if not dense:
        raise SchemaMismatch(f"collection {name!r} has no 'dense' field: it was not made by m3-queue")
    return int(dense["params"]["dim"])


# ---- content hashes: what lets a re-run skip documents stored unchanged --------------------------------

def content_hash(text: object, metadata: object) -> str | None:
    """A document's fingerprint: sha256 of the canonical JSON of its text and metadata (keys sorted, as Milvus
    stores them: absent metadata is ``{}``), the first HASH_CHARS hex digits; None for a text that is never
    stored. The producer and the worker's sink both compute it, so the stored one always describes the stored
    row. The model is not in it: a collection holds one model's vectors (:func:`check_collection`)."""
    if not isinstance(text, str):
        return None
    try:
        # Round-tripped first, so keys of any type compare as the strings JSON (and Milvus) make of them.
        canonical = json.dumps([text, json.loads(json.dumps(metadata or {}))], sort_keys=True,
                               separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None  # metadata with no JSON form: refused before it is stored
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:HASH_CHARS]


def stored_hashes(client: MilvusClient, name: str, ids: list[str]) -> dict[str, str | None]:
    """The content hash stored with each of ``ids`` that ``name`` holds (None for a row without one), read
    with Strong consistency so that what a run just stored counts. An id with a control character other than
    tab or newline is not looked up (Milvus' expressions cannot spell it): it counts as not stored."""
    quoted = [literal for literal in map(_quoted, ids) if literal is not None]
    if not quoted:
        return {}
    rows = call_milvus(f"look up stored documents in {name!r}", client.query, name,
                       filter=f"id in [{','.join(quoted)}]", output_fields=[HASH_FIELD], consistency_level="Strong")
    return {str(r["id"]): r.get(HASH_FIELD) for r in rows}


def _quoted(value: str) -> str | None:
    """``value`` as a string literal of a Milvus expression, or None if it has no such form. An id may hold
    quotes and backslashes: pymilvus' own ``get`` does not escape them, and Milvus Lite takes no templates."""
    escaped = value.translate(_ESCAPES)
    return None if any(c < " " for c in escaped) else f'"{escaped}"'


_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def count(client: MilvusClient, name: str) -> int:
    """The exact number of rows in ``name`` (a strongly consistent count(*))."""
    result = call_milvus(f"count rows of {name!r}", client.query, name, filter="",
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
        return _hits(call_milvus(what, client.hybrid_search, name, reqs, _ranker(ranker), **common))
    field_name, data = ("sparse", query_sparse) if mode == "sparse" else ("dense", _dense_list(dense))
    return _hits(call_milvus(what, client.search, name, data=[data], anns_field=field_name,
                             search_params={"metric_type": "IP"}, **common))


def _dense_list(dense: np.ndarray) -> list[float]:
    return np.asarray(dense, dtype=np.float32).reshape(-1).tolist()


# ---- collections, aliases and versions ----------------------------------------------------------------
# Thin wrappers over MilvusClient with the same error translation as the rest of this module: what
# re-indexing (and a search's existence check) needs, so no caller reaches for ``call_milvus`` itself.

def has_collection(client: MilvusClient, name: str) -> bool:
    """Whether a collection ``name`` exists."""
    return bool(call_milvus(f"has_collection {name!r}", client.has_collection, name))


def list_collections(client: MilvusClient) -> list[str]:
    """The names of every collection."""
    return list(call_milvus("list collections", client.list_collections))


def versions(client: MilvusClient, alias: str) -> list[str]:
    """The versioned collections ``{alias}_v{N}`` that exist, by increasing N."""
    pattern = re.compile(re.escape(alias) + r"_v(\d+)$")
    numbered = [(int(m.group(1)), name) for name in list_collections(client) if (m := pattern.match(name))]
    return [name for _, name in sorted(numbered)]


def alias_target(client: MilvusClient, alias: str) -> str | None:
    """The collection behind ``alias``, or None when there is no such alias."""
    if alias not in call_milvus("list aliases", client.list_aliases).get("aliases", []):
        return None  # asked first: describe_alias logs an error for an unknown alias
    return call_milvus(f"describe alias {alias!r}", client.describe_alias, alias)["collection_name"]


def aliases_of(client: MilvusClient, collection: str) -> list[str]:
    """The aliases that point to ``collection``."""
    return list(call_milvus(f"list aliases of {collection!r}", client.list_aliases, collection_name=collection)
                .get("aliases", []))


def point_alias(client: MilvusClient, alias: str, collection: str) -> str | None:
    """Point ``alias`` at ``collection`` in one step: create the alias, or alter it; returns the collection it
    pointed to before (None when it is new). Searches through the alias see one collection or the other."""
    previous = alias_target(client, alias)
    if previous is None:
        call_milvus(f"create alias {alias!r}", client.create_alias, collection, alias)
    elif previous != collection:
        call_milvus(f"alter alias {alias!r}", client.alter_alias, collection, alias)
    return previous


def drop_collection(client: MilvusClient, name: str) -> None:
    """Drop collection ``name`` and its rows."""
    call_milvus(f"drop collection {name!r}", client.drop_collection, name)


def rename_collection(client: MilvusClient, old: str, new: str) -> None:
    """Rename collection ``old`` to ``new``; Milvus Lite releases it, so :func:`load_collection` it again."""
    call_milvus(f"rename collection {old!r} to {new!r}", client.rename_collection, old, new)


def load_collection(client: MilvusClient, name: str) -> None:
    """Load collection ``name`` into memory, so it can be searched."""
    call_milvus(f"load collection {name!r}", client.load_collection, name)


def iter_rows(client: MilvusClient, name: str, fields: tuple[str, ...] = ("id", "text", "metadata"),
              page_rows: int = 1000) -> Iterator[dict]:
    """Every row of ``name`` (its ``fields``), fetched ``page_rows`` at a time in primary-key order: the
    same order on every read of an unchanged collection."""
    pages = call_milvus(f"read {name!r}", client.query_iterator, name, batch_size=page_rows, filter="",
                        output_fields=list(fields))
    try:
        while page := call_milvus(f"read {name!r}", pages.next):
            yield from page
    finally:
        pages.close()
