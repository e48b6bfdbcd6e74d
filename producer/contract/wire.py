"""The wire contract shared by producers and workers: task and queue names, payloads, the result codec.

Imports neither torch nor transformers, so a web app can depend on it. Payloads are msgpack (JSON is
accepted too); pickle is refused on both sides. Vectors travel as raw little-endian bytes, not lists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypedDict

import numpy as np
from celery import Celery

from producer.contract.errors import PayloadError  # noqa: F401 - callers import it from here
from producer.contract.redis_conn import celery_redis_config
from producer.contract.settings import Settings

# Task names: sent by name, so the producer never imports the worker.
TASK_ENCODE_QUERIES = "m3q.encode_queries"
TASK_ENCODE_DOCUMENTS = "m3q.encode_documents"
TASK_INDEX_DOCUMENTS = "m3q.index_documents"
TASK_INFO = "m3q.info"
TASK_TOKENIZE = "m3q.tokenize"
TASK_DECODE = "m3q.decode"
TASK_SCORE = "m3q.score"
"""BGE-M3's three-signal rerank (``Client.compute_score``): on the query stream only."""
QUERY_TASKS = (TASK_ENCODE_QUERIES, TASK_INFO, TASK_TOKENIZE, TASK_DECODE, TASK_SCORE)
"""Tasks that go on the query queue: short, and never behind a document step."""

KINDS = ("queries", "documents")
TRUNCATION_SIDES = ("right", "left")
"""Which end of an over-long text is cut: "right" keeps its first tokens (the default), "left" its last."""
ENCODE_OPTIONS = frozenset({"texts", "ids", "dense", "sparse", "colbert", "max_length", "truncation_side", "normalize"})
"""An encode job's payload: its texts (and ids), the outputs wanted, the token limit, which end of an over-long
text is cut (``truncation_side``: "right", the default, keeps its first tokens; "left" its last), and
``normalize`` (default true; false: dense vectors are the raw CLS states, as TEI's ``"normalize": false``)."""
INDEX_OPTIONS = frozenset({"texts", "ids", "metadata", "collection", "batch", "allow_empty_sparse"})
TOKENIZE_OPTIONS = frozenset({"texts", "add_special_tokens"})
"""``m3q.tokenize``: texts split by the checkpoint's own tokenizer, with cls and eos or without."""
DECODE_OPTIONS = frozenset({"sequences", "skip_special_tokens"})
"""``m3q.decode``: lists of token ids turned back into text, special tokens dropped or kept."""
SCORE_OPTIONS = frozenset({"queries", "texts", "pairs", "weights", "max_query_length", "max_passage_length",
                           "truncation_side", "batch_size"})
"""``m3q.score``: ``queries`` and ``texts`` (passages), each encoded once, and ``pairs`` of [query index, text
index]; ``weights`` [dense, sparse, colbert] (default [1, 1, 1], FlagEmbedding's); the token limits of each
side and which end is cut (``truncation_side``); FlagEmbedding's ``batch_size`` (:data:`SCORE_BATCH_PAIRS`).
The answer is :class:`ScoreAnswer`: scores only, never vectors."""
SCORE_LISTS = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
"""The five lists of ``BGEM3FlagModel.compute_score``, in its order."""
SCORE_BATCH_PAIRS = 256
"""FlagEmbedding's ``compute_score`` batch (its default ``batch_size``): a passage shorter than the longest of
its batch is padded with zero ColBERT vectors, so each query token scores at least 0 on it. A worker
reproduces that per run of ``batch_size`` pairs, and a producer splits calls into jobs at multiples of it."""
ACCEPT = ["msgpack", "json"]


def query_queue(s: Settings) -> str:
    """Queue of query jobs: short, latency-bound, served before document steps."""
    return f"{s.queue_prefix}.queries"


def document_queue(s: Settings) -> str:
    """Queue of document and index jobs: bulk, throughput-bound."""
    return f"{s.queue_prefix}.documents"


def device_queue(s: Settings, device: str) -> str:
    """Queue that only the worker(s) on ``device`` consume, to route a job to one device."""
    return f"{s.queue_prefix}.device.{device}"


def kombu_queue(name: str):
    """A queue bound to its own direct exchange under its own name, the same on both sides."""
    from kombu import Exchange, Queue

    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def task_queue(s: Settings, task: str) -> str:
    """The default queue of a task."""
    return query_queue(s) if task in QUERY_TASKS else document_queue(s)


def celery_config(s: Settings) -> dict[str, Any]:
    """Celery settings for long batches delivered at least once, with pickle refused."""
    # A running worker sweeps for jobs of dead workers every unacked_restore_interval seconds (kombu's
    # default throttle would make that about 100 s).
    transport: dict[str, Any] = {"visibility_timeout": s.visibility_timeout_s, "unacked_restore_throttle": 1}
    config: dict[str, Any] = dict(
        broker_url=s.broker_url,
        result_backend=s.backend_url,
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=ACCEPT,
        result_accept_content=ACCEPT,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        result_expires=s.result_expires_s,
        # A result must outlive a Redis restart: by default storing it fails at once on a lost connection, and
        # the job only comes back after the visibility timeout. Bounded (about 10 minutes at Celery's longest
        # pause of 10 s); past that, the job is redelivered instead.
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        result_extended=False,
        task_default_queue=document_queue(s),
        task_track_started=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_routes={task: {"queue": query_queue(s)} for task in QUERY_TASKS},
    )
    config.update(celery_redis_config(s, transport))
    return config


def make_celery(s: Settings, name: str = "m3q") -> Celery:
    """A Celery app configured from settings (used by producers and workers alike)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(s))
    return app


def model_identity(model: str) -> str:
    """What a model is called in answers and on collections: a hub id (``BAAI/bge-m3``) as it is, a local
    checkpoint by its folder's name (``/models/bge-m3`` is ``bge-m3``), which workers on different machines
    and the gateway share although each keeps the checkpoint under its own path."""
    path = model.rstrip("/")
    local = model.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.isdir(os.path.expanduser(model))
    return os.path.basename(path) if local else model


# ---- Redis keys ----------------------------------------------------------------------------------------

def failures_key(s: Settings) -> str:
    """Redis list of failed jobs (newest first)."""
    return f"{s.queue_prefix}:failures"


def deliveries_key(s: Settings, job_id: str) -> str:
    """Redis counter of a job's deliveries (a job that keeps killing its worker stops: PoisonJob)."""
    return f"{s.queue_prefix}:deliveries:{job_id}"


# ---- typed records: what a worker writes and a producer reads ---------------------------------------------

class Stamp(TypedDict):
    """Which worker, device, model and dtype produced a result (every job's answer carries one)."""

    worker: str
    device: str
    model: str
    dtype: str


class EncodeAnswer(Stamp):
    """An encode job's answer: one :func:`encode_item` per text, in order; truncated texts; tokens encoded."""

    items: list[dict[str, Any]]
    truncated: int
    tokens: int


class IndexAnswer(Stamp):
    """An index job's answer: rows stored, their ids, truncated texts, ``[place, reason]`` per refused row."""

    stored: int
    ids: list[str]
    truncated: int
    errors: list[list[Any]]
    batch: Any


class ScoreAnswer(Stamp):
    """A score job's answer: ``scores`` holds one list per name of :data:`SCORE_LISTS`, one float per pair;
    texts truncated, and ``cut``: the pairs with a text cut at its token limit; tokens encoded."""

    scores: dict[str, list[float]]
    truncated: int
    cut: list[int]
    tokens: int


class Heartbeat(TypedDict, total=False):
    """A worker's status in Redis (:func:`heartbeat_key`, JSON), renewed every :func:`heartbeat_s`."""

    hostname: str
    pid: int
    model: str
    device: str
    dtype: str
    dims: dict[str, int]
    replica: bool
    jobs: int
    texts: int
    tokens: int
    errors: int
    texts_per_s: float
    tokens_per_s: float
    pending: int
    held: list[str]
    """kombu delivery tags this worker holds (not yet acknowledged): a dead worker's are put back."""
    held_jobs: list[str]
    unheld: dict[str, float]
    """Jobs this worker's last sweep found held by no live worker, too recent yet to put back: delivery tag ->
    when a worker took it (epoch s). A tag still unheld two heartbeats after it was taken is a dead worker's."""
    query_stream: dict[str, Any]
    """The query stream's figures (streams read, entries held, reads, replies per second)."""
    queues: list[str]
    """The queues Celery's consumer reads in it (not the query stream, which every worker reads)."""
    time: float


# ---- workers and the jobs they hold ---------------------------------------------------------------------

def heartbeat_key(s: Settings, hostname: str) -> str:
    """Redis key of one worker's heartbeat: its status as JSON, including the delivery tags it holds."""
    return f"{s.queue_prefix}:worker:{hostname}"


def heartbeat_s(s: Settings) -> float:
    """How often a worker writes its heartbeat (and sweeps for jobs of dead workers)."""
    return s.dead_worker_s / 6


def heartbeat_ttl_s(s: Settings) -> float:
    """A heartbeat not renewed within this expires: its worker is dead. Jobs delivered longer ago than this
    and held by no live worker are a dead worker's, so a dead worker's jobs are back after at most
    ``heartbeat_ttl_s + heartbeat_s`` (20 s of the default 30 s ``M3Q_DEAD_WORKER_S``)."""
    return s.dead_worker_s / 2


def live_workers(s: Settings, r) -> list[Heartbeat]:
    """The heartbeats of the workers alive now (``r``: a redis client on the broker)."""
    import json

    keys = list(r.scan_iter(match=heartbeat_key(s, "*"), count=5000))  # SCAN: never blocks a big Redis
    return [json.loads(v) for v in (r.mget(keys) if keys else []) if v]


def serves(worker: dict[str, Any], s: Settings, queue: str) -> bool:
    """Whether ``worker`` consumes ``queue`` (the query or document queue, or a device's own), judged by its
    heartbeat."""
    if worker.get("queues"):
        return queue in worker["queues"]
    device_prefix = device_queue(s, "")
    if not queue.startswith(device_prefix):
        return True  # every m3q worker serves the query and document queues (and the query stream)
    # Heartbeats without queues name the resolved device ("cuda:0" for a worker started on "cuda").
    device, served = queue[len(device_prefix):], str(worker.get("device", ""))
    return served == device or served.split(":")[0] == device


# ---- results -----------------------------------------------------------------------------------------

@dataclass
class Embedding:
    """One text's BGE-M3 output, float32 throughout."""

    dense: np.ndarray | None
    sparse_ids: np.ndarray | None
    sparse_weights: np.ndarray | None
    colbert: np.ndarray | None = None
    n_tokens: int = 0
    truncated: bool = False

    def sparse_dict(self) -> dict[int, float]:
        """Sparse weights as {token id: weight}."""
        if self.sparse_ids is None:
            return {}
        return dict(zip(self.sparse_ids.tolist(), self.sparse_weights.tolist()))


@dataclass
class ItemError:
    """Why one text was rejected; the rest of its job is unaffected."""

    reason: str


Item = Embedding | ItemError


def encode_item(item: Item) -> dict[str, Any]:
    """An item as a compact msgpack-friendly dict (vectors as bytes)."""
    if isinstance(item, ItemError):
        return {"error": item.reason}
    out: dict[str, Any] = {"tokens": item.n_tokens, "truncated": item.truncated}
    if item.dense is not None:
        out["dense"] = np.ascontiguousarray(item.dense, dtype="<f4").tobytes()
    if item.sparse_ids is not None:
        out["sparse_ids"] = np.ascontiguousarray(item.sparse_ids, dtype="<i4").tobytes()
        out["sparse_weights"] = np.ascontiguousarray(item.sparse_weights, dtype="<f4").tobytes()
    if item.colbert is not None:
        out["colbert"] = np.ascontiguousarray(item.colbert, dtype="<f4").tobytes()
        out["colbert_rows"] = int(item.colbert.shape[0])
    return out


def decode_item(data: dict[str, Any]) -> Item:
    """The inverse of :func:`encode_item`."""
    if "error" in data:
        return ItemError(str(data["error"]))
    dense = _array(data.get("dense"), "<f4")
    ids = _array(data.get("sparse_ids"), "<i4")
    weights = _array(data.get("sparse_weights"), "<f4")
    colbert = _array(data.get("colbert"), "<f4")
    if colbert is not None:
        rows = int(data["colbert_rows"])
        colbert = colbert.reshape(rows, -1 if rows else 0)
    return Embedding(dense, None if ids is None else ids.astype(np.int64), weights, colbert,
                     int(data.get("tokens", 0)), bool(data.get("truncated", False)))


def _array(raw: bytes | None, dtype: str) -> np.ndarray | None:
    if raw is None:
        return None
    return np.frombuffer(raw, dtype=dtype).astype(dtype[1:], copy=True)


def encode_payload(texts: Sequence[object], ids: Sequence[object] | None = None, **options: Any) -> dict[str, Any]:
    """An encode job's payload."""
    payload: dict[str, Any] = {"texts": list(texts), **{k: v for k, v in options.items() if v is not None}}
    if ids is not None:
        payload["ids"] = list(ids)
    return payload


def check_options(payload: object, allowed: frozenset[str], items: str = "texts") -> dict[str, Any]:
    """The payload as a dict with a list under ``items``, or a PayloadError naming what is wrong with it."""
    if not isinstance(payload, dict):
        raise PayloadError(f"payload must be a map, got {type(payload).__name__}")
    unknown = sorted(set(map(str, payload)) - allowed)
    if unknown:
        raise PayloadError(f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    texts = payload.get(items)
    if not isinstance(texts, list):
        raise PayloadError(f"payload needs {items!r}, a list")
    ids = payload.get("ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(texts)):
        raise PayloadError("'ids' must be a list as long as 'texts'")
    return payload
