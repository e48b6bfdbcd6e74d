"""The Celery tasks and the job bodies: check the payload, encode through the device loop, hand results back
or sink them (:mod:`worker.sink`).

A bad text is an item error in the result; a bad payload (unknown option, too big, too many texts) fails
the whole job with a :class:`~producer.contract.wire.PayloadError` before anything is encoded. The life cycle around
a job (deliveries, metrics, failure records) is :mod:`worker.jobs`; the query stream runs the same encode
body (:func:`encode_options`, then the device loop, then :func:`encode_result`).
"""
from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from producer.contract import checks, wire
from producer.contract.errors import MilvusError, MilvusRejected, SchemaMismatch
from producer.contract.wire import ItemError, PayloadError, check_options, encode_item
from worker import scoring
from worker.jobs import Job, check_size, info_answer, stamp
from worker.runtime import Runtime, current

log = logging.getLogger(__name__)


def register(app: Celery) -> None:
    """Register m3q's tasks on ``app`` under their wire names."""
    @app.task(name=wire.TASK_ENCODE_QUERIES, bind=True)
    def encode_queries(self: Task, payload: dict) -> dict:
        return _guarded(self, payload, lambda rt: encode_job(rt, payload, "queries"))

    @app.task(name=wire.TASK_ENCODE_DOCUMENTS, bind=True)
    def encode_documents(self: Task, payload: dict) -> dict:
        return _guarded(self, payload, lambda rt: encode_job(rt, payload, "documents"))

    @app.task(name=wire.TASK_INDEX_DOCUMENTS, bind=True)
    def index_documents(self: Task, payload: dict) -> dict:
        return _guarded(self, payload, lambda rt: index_job(self, rt, payload))

    @app.task(name=wire.TASK_INFO)
    def info(payload: dict | None = None) -> dict:
        return info_answer(current())

    @app.task(name=wire.TASK_TOKENIZE, bind=True)
    def tokenize(self: Task, payload: dict) -> dict:
        return _guarded(self, payload, lambda rt: tokenize_job(rt, payload))

    @app.task(name=wire.TASK_DECODE, bind=True)
    def decode(self: Task, payload: dict) -> dict:
        return _guarded(self, payload, lambda rt: decode_job(rt, payload))

    @app.task(name=wire.TASK_SCORE, bind=True)
    def score(self: Task, payload: dict) -> dict:
        return _guarded(self, payload, lambda rt: scoring.start(rt, payload).result())


def summary(result: Any) -> str:
    """A job's result in a few words, for the worker's INFO line (the whole result is logged at DEBUG)."""
    if not isinstance(result, dict):
        return type(result).__name__
    if "ids" in result:
        return (f"{len(result['ids'])} ids, {result.get('stored', 0)} stored, {len(result.get('errors') or ())} "
                f"rejected, {result.get('truncated', 0)} truncated")
    if "items" in result:
        return f"{len(result['items'])} items, {result.get('truncated', 0)} truncated"
    return f"{len(result)} fields"


def _guarded(task: Task, payload: Any, run) -> dict:
    """Run a Celery job through its life cycle (:mod:`worker.jobs`): deliveries counted, outcome recorded."""
    rt = current()
    job = Job.start(rt, task.name, task.request.id, (task.request.headers or {}).get("m3q_sent"))
    try:
        # Inside the try: a poison job is recorded like any failure.
        job.check_deliveries(rt.settings.task_max_retries + 1 + (task.request.retries or 0))
        job.run_test_hook(payload)
        result = run(rt)
    except Exception as e:
        if not _is_retry(e):
            job.failed(e)
        raise
    job.ok()
    return result


def _is_retry(e: Exception) -> bool:
    from celery.exceptions import Retry

    return isinstance(e, Retry)



def _flag(payload: dict, name: str, default: bool) -> bool:
    value = payload.get(name, default)
    if not isinstance(value, bool):
        raise PayloadError(f"option {name!r} must be true or false, got {value!r}")
    return value


def encode_options(rt: Runtime, payload: Any) -> tuple[dict, dict]:
    """The checked payload of an encode job, and the engine options it asks for."""
    payload = check_options(payload, wire.ENCODE_OPTIONS)
    check_size(rt, payload)
    max_length = payload.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or not 2 <= max_length <= rt.encoder.max_positions):
        raise PayloadError(f"option 'max_length' must be an integer from 2 to {rt.encoder.max_positions}, "
                           f"got {max_length!r}")
    side = payload.get("truncation_side", "right")
    if side not in wire.TRUNCATION_SIDES:
        raise PayloadError(f"option 'truncation_side' must be 'right' or 'left', got {side!r}")
    options = {"dense": _flag(payload, "dense", True), "sparse": _flag(payload, "sparse", True),
               "colbert": _flag(payload, "colbert", False), "max_length": max_length, "truncation_side": side,
               "normalize": _flag(payload, "normalize", True)}
    return payload, options


def encode_job(rt: Runtime, payload: Any, kind: str) -> wire.EncodeAnswer:
    """Encode a job's texts; vectors come back as bytes, bad texts as item errors."""
    payload, options = encode_options(rt, payload)
    return encode_result(rt, rt.engine.encode(payload["texts"], kind, **options))


def encode_result(rt: Runtime, result) -> wire.EncodeAnswer:
    """An encode job's answer, on either transport: items (vectors as bytes, bad texts as errors), counts, the stamp."""
    return {"items": [encode_item(i) for i in result.items], "truncated": result.truncated,
            "tokens": result.tokens, **stamp(rt)}



# ---- the tokenizer alone: answered at once, without the device ----------------------------------------

def tokenize_job(rt: Runtime, payload: Any) -> dict:
    """Each text's tokens by the checkpoint's own tokenizer (``CheckpointTokenizer.pieces``), or why it is
    refused: the texts an encode job would accept, untruncated."""
    payload = check_options(payload, wire.TOKENIZE_OPTIONS)
    check_size(rt, payload)
    special = _flag(payload, "add_special_tokens", True)
    items = []
    for text in payload["texts"]:
        reason = checks.text_problem(text, rt.settings.max_text_chars)
        items.append({"error": reason} if reason else {"tokens": rt.encoder.tokenizer.pieces(text, special)})
    return {"items": items, **stamp(rt)}


def decode_job(rt: Runtime, payload: Any) -> dict:
    """The text of each list of token ids, or why it is refused (an id outside the vocabulary)."""
    payload = check_options(payload, wire.DECODE_OPTIONS, items="sequences")
    check_size(rt, {"texts": payload["sequences"]})
    skip = _flag(payload, "skip_special_tokens", True)
    tokenizer = rt.encoder.tokenizer
    items = []
    for ids in payload["sequences"]:
        reason = _ids_problem(ids, tokenizer.vocab_size)
        items.append({"error": reason} if reason else {"text": tokenizer.decode(ids, skip)})
    return {"items": items, **stamp(rt)}


def _ids_problem(ids: Any, vocab_size: int) -> str | None:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return "must be a list of token ids (integers)"
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    return None if bad is None else f"token id {bad} is outside the vocabulary (0 to {vocab_size - 1})"


INSTANT_TASKS = {wire.TASK_INFO: lambda rt, payload: info_answer(rt), wire.TASK_TOKENIZE: tokenize_job,
                 wire.TASK_DECODE: decode_job}
"""Jobs that need no device: the query stream answers them as it reads them (Celery runs them as any task)."""


# ---- indexing ----------------------------------------------------------------------------------------

def index_job(task: Task, rt: Runtime, payload: Any) -> wire.IndexAnswer:
    """Encode documents and upsert them into Milvus; item errors for bad texts, ids or metadata."""
    payload = check_options(payload, wire.INDEX_OPTIONS)
    check_size(rt, payload)
    collection = payload.get("collection")
    if not isinstance(collection, str) or not collection:
        raise PayloadError("index job needs 'collection', a non-empty string")
    texts, n = payload["texts"], len(payload["texts"])
    if payload.get("ids") is None:
        raise PayloadError("index job needs 'ids', one per text (re-indexing upserts by id)")
    errors = _check_rows(rt, payload["ids"], payload.get("metadata"), n)
    metadata = payload.get("metadata") or [None] * n
    good = [i for i in range(n) if i not in errors]
    result = rt.engine.encode([texts[i] for i in good], "documents", colbert=False)
    rows = _rows(payload["ids"], texts, metadata, good, result.items, errors)
    stored = _upsert(task, rt, collection, rows) if rows else 0
    # Items are named by id, not by their place in this job: the producer maps places to input positions.
    return {"stored": stored, "ids": [r["id"] for r in rows], "truncated": result.truncated,
            "errors": [[i, f"{_name(payload['ids'][i])}: {errors[i]}"] for i in sorted(errors)],
            "batch": payload.get("batch"), **stamp(rt)}


def _name(raw_id: Any, limit: int = 80) -> str:
    shown = repr(raw_id)
    return f"id {shown if len(shown) <= limit else shown[:limit] + '...'}"


def _rows(ids: list, texts: list, metadata: list, good: list[int], items: list, errors: dict[int, str]) -> list[dict]:
    """Milvus rows of the encoded items; an item Milvus would refuse becomes an error, not a failed batch."""
    from worker.sink import row_problem

    rows = []
    for i, item in zip(good, items):
        if isinstance(item, ItemError):
            errors[i] = item.reason
            continue
        row = {"id": str(ids[i]), "text": texts[i], "dense": item.dense, "sparse": item.sparse_dict(),
               "metadata": metadata[i] or {}}
        problem = row_problem(row)
        if problem:
            errors[i] = problem
        else:
            rows.append(row)
    return rows


def _check_rows(rt: Runtime, ids: list, metadata: list | None, n: int) -> dict[int, str]:
    """Item errors for bad ids (type, length, repeats) and metadata (:mod:`producer.contract.checks`)."""
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != n):
        raise PayloadError("'metadata' must be a list as long as 'texts'")
    errors: dict[int, str] = {}
    first: dict[str, int] = {}
    for i, raw in enumerate(ids):
        reason = checks.id_problem(raw, rt.settings.max_id_chars)
        if reason is None and checks.repeat_of(first, raw, i) is not None:
            reason = f"duplicate id {str(raw)!r}: an earlier document of the same job has it"
        if reason is None and metadata is not None:
            reason = checks.metadata_problem(metadata[i])
        if reason:
            errors[i] = reason
    return errors


def _upsert(task: Task, rt: Runtime, collection: str, rows: list[dict]) -> int:
    from worker import sink

    try:
        client = rt.milvus()
        sink.ensure_collection(client, collection, int(rows[0]["dense"].shape[0]), wire.model_identity(rt.encoder.name))
        return sink.upsert(client, collection, rows)
    except (SchemaMismatch, MilvusRejected) as e:
        raise PayloadError(str(e)) from None
    except MilvusError as e:
        rt.reset_milvus()
        retries = task.request.retries or 0
        if retries >= rt.settings.index_retries:
            raise MilvusError(f"index batch {task.request.id} ({len(rows)} documents) not stored after "
                              f"{retries + 1} tries: {e}") from None
        delay = rt.settings.index_retry_backoff_s * 2 ** retries
        log.warning("Milvus failed on batch %s (%s); retry %d in %.1fs", task.request.id, e, retries + 1, delay)
        raise task.retry(countdown=delay, max_retries=rt.settings.index_retries, exc=e)
