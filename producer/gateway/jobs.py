"""Collections over HTTP: ``POST /v1/index`` enqueues documents, ``GET /v1/jobs/{id}`` follows them,
``POST /v1/search`` searches.

The gateway keeps no state of its own, so any gateway process answers for any job: a job's record (the
Celery task id of each of its index jobs and the document positions each holds, and what the gateway
rejected) is kept in Redis under ``{M3Q_QUEUE_PREFIX}:gateway:job:{id}`` for ``M3Q_RESULT_EXPIRES_S``, as
long as the workers' results, from which its progress is read (one ``MGET`` on the result backend).
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from producer.contract import checks
from producer.contract.redis_conn import async_redis
from producer.contract.settings import Settings
from producer.gateway import http
from producer.gateway.http import ApiError, invalid
from producer.index_batches import IndexReport, skip_unchanged

COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
"""Milvus' rule for collection names."""
JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_K = 16384
"""Most hits one search returns (Milvus' limit)."""

Row = tuple[int, str, Any, Any]
"""(position in the request, text, id, metadata) of one document."""


class JobStore:
    """Index jobs' records in Redis, and their progress from the Celery result backend."""

    def __init__(self, s: Settings, backend: Any) -> None:
        self.settings = s
        self.backend = backend  # the client's Celery result backend: its keys and its decoding of results
        self._broker = async_redis(s)
        self._results = self._broker if s.backend_url == s.broker_url else async_redis(s, s.backend_url)

    def key(self, job_id: str) -> str:
        return f"{self.settings.queue_prefix}:gateway:job:{job_id}"

    async def save(self, record: dict[str, Any]) -> None:
        await self._broker.set(self.key(record["id"]), orjson.dumps(record), ex=self.settings.result_expires_s)

    async def load(self, job_id: str) -> dict[str, Any] | None:
        raw = await self._broker.get(self.key(job_id)) if JOB_ID.fullmatch(job_id) else None
        return orjson.loads(raw) if raw else None

    async def results(self, task_ids: list[str]) -> list[dict[str, Any] | None]:
        """Each task's final meta (status, result) as the backend decodes it, None while it has none."""
        raws = await self._results.mget([self.backend.get_key_for_task(t) for t in task_ids]) if task_ids else []
        return [self.backend.decode_result(raw) if raw else None for raw in raws]

    async def aclose(self) -> None:
        await self._broker.aclose()
        if self._results is not self._broker:
            await self._results.aclose()


def rows_of(documents: Any, s: Settings) -> tuple[list[Row], list[dict[str, Any]]]:
    """The documents that can be sent, and the rejected ones, each with its position and reason."""
    if not isinstance(documents, list) or not documents:
        raise invalid("documents", 'must be a non-empty list of {"id", "text", "metadata"} objects')
    if len(documents) > s.max_job_texts:
        raise ApiError(413, f"documents has {len(documents):,} items, over the limit of {s.max_job_texts:,} "
                            "(M3Q_MAX_JOB_TEXTS); send them in several requests", param="documents",
                       code="too_large")
    rows: list[Row] = []
    rejected: list[dict[str, Any]] = []
    first: dict[str, int] = {}
    for i, doc in enumerate(documents):
        reason = document_problem(doc, s)
        earlier = checks.repeat_of(first, doc["id"], i) if reason is None else None
        if earlier is not None:
            reason = f"duplicate id {str(doc['id'])!r}, first at documents[{earlier}]"
        if reason is None:
            rows.append((i, doc["text"], doc["id"], doc.get("metadata")))
        else:
            rejected.append({"index": i, "id": doc.get("id") if isinstance(doc, dict) else None, "reason": reason})
    return rows, rejected


def document_problem(doc: Any, s: Settings) -> str | None:
    """Why one document cannot be indexed, or None: the rules of :mod:`producer.contract.checks`, in the order a worker
    applies them to an index job (id, metadata, text), so the reasons are the ones `m3q index` reports."""
    if not isinstance(doc, dict):
        return f'must be an object {{"id", "text", "metadata"}}, got {http.describe(doc)}'
    return (checks.id_problem(doc.get("id"), s.max_id_chars) or checks.metadata_problem(doc.get("metadata"))
            or checks.text_problem(doc.get("text"), s.max_text_chars))


def submit(client: Any, collection: str, rows: list[Row], job_texts: int) -> list[dict[str, Any]]:
    """Send the rows as index jobs of ``job_texts`` (blocking: run on a thread); NoWorker before any is sent."""
    client.require_worker()
    # Celery subscribes to each sent task's result for its sender; the gateway reads results by key instead.
    consumer = getattr(client.app.backend, "result_consumer", None)
    tasks = []
    for start in range(0, len(rows), job_texts):
        chunk = rows[start:start + job_texts]
        positions = [row[0] for row in chunk]
        handle = client.submit_index(collection, [r[1] for r in chunk], [r[2] for r in chunk],
                                     [r[3] for r in chunk], first_index=positions[0])
        if consumer is not None:
            consumer.cancel_for(handle.id)
        tasks.append({"task": handle.id, "rows": positions})
    return tasks


def progress(record: dict[str, Any], metas: list[dict[str, Any] | None]) -> dict[str, Any]:
    """A job as ``GET /v1/jobs/{id}`` shows it, from its record and its tasks' results."""
    rejected = list(record["rejected"])
    stored = truncated = done = failed = 0
    for task, meta in zip(record["tasks"], metas):
        status = (meta or {}).get("status")
        if status == "SUCCESS":
            done += 1
            result = meta["result"]
            stored += int(result.get("stored", 0))
            truncated += int(result.get("truncated", 0))
            rejected += [{"index": task["rows"][i], "reason": reason} for i, reason in result.get("errors", [])]
        elif status in ("FAILURE", "REVOKED"):
            failed += 1
            error = meta.get("result")
            reason = f"its index job {task['task']} failed: {type(error).__name__}: {error}"
            rejected += [{"index": row, "reason": reason} for row in task["rows"]]
    pending = len(record["tasks"]) - done - failed
    state = "pending" if pending else ("failed" if failed else "done")
    return {"id": record["id"], "collection": record["collection"], "state": state,
            "documents": record["documents"], "accepted": sum(len(t["rows"]) for t in record["tasks"]),
            "stored": stored, "skipped": record.get("skipped", 0), "truncated": truncated,
            "jobs": {"total": len(record["tasks"]), "done": done, "failed": failed, "pending": pending},
            "age_s": round(time.time() - record["created"], 3),
            "rejected": sorted(rejected, key=lambda r: r["index"])}


class CollectionRoutes(http.Routes):
    """The collection routes of gateway ``gw`` (a ``producer.gateway.app.Gateway``), one method each."""

    def _collection_of(self, body: dict[str, Any]) -> str:
        name = http.get_str(body, "collection", need=True)
        if not COLLECTION_NAME.fullmatch(name):
            raise invalid("collection", f"{name!r} is not a Milvus collection name (a letter or _, then letters, "
                                        "digits or _; at most 255)")
        return name

    @http.endpoint("POST", "/v1/index")
    async def index(self, request: Request) -> Response:
        """Enqueue documents into a collection; 202 with the job's id, rejected documents named."""
        body = await http.read_object(request, self.s.gateway_max_body_bytes)
        collection = self._collection_of(body)
        force = http.get_bool(body, "force", False)
        rows, rejected = rows_of(http.required(body, "documents"), self.s)
        if not rows:
            raise http.refuse_items(422, "documents", rejected, len(rejected), "documents were rejected")
        report = IndexReport()
        if not force:  # documents the collection holds unchanged are not sent (Milvus lookups: on a thread)
            rows = await asyncio.to_thread(list, skip_unchanged(self.s, collection, rows, report))
        tasks = await asyncio.to_thread(submit, self.gw.client, collection, rows, self.s.job_texts) if rows else []
        record = {"id": uuid.uuid4().hex, "collection": collection, "created": time.time(),
                  "documents": len(body["documents"]), "tasks": tasks, "rejected": rejected, "skipped": report.skipped}
        await self.gw.jobs.save(record)
        return http.json_response({"id": record["id"], "url": f"/v1/jobs/{record['id']}", "state": "pending",
                                   "collection": collection, "documents": record["documents"],
                                   "accepted": len(rows), "skipped": report.skipped, "notes": report.notes,
                                   "jobs": len(tasks), "rejected": rejected}, 202)

    @http.endpoint("GET", "/v1/jobs/{job_id}")
    async def job(self, request: Request) -> Response:
        """An index job's progress: state pending, done or failed; stored; rejected documents with reasons."""
        job_id = request.path_params["job_id"]
        record = await self.gw.jobs.load(job_id)
        if record is None:
            raise ApiError(404, f"no index job {job_id!r}: unknown, or older than M3Q_RESULT_EXPIRES_S "
                                f"({self.s.result_expires_s} s)", param="job_id", code="no_job")
        return http.json_response(progress(record, await self.gw.jobs.results([t["task"] for t in record["tasks"]])))

    @http.endpoint("POST", "/v1/search")
    async def search(self, request: Request) -> Response:
        """Dense, sparse, hybrid or m3 search: the query encoded on the query stream, then Milvus (m3: then
        the candidates re-scored on the workers, each hit with its dense, sparse and colbert scores)."""
        body = await http.read_object(request, self.s.gateway_max_body_bytes)
        query = http.get_str(body, "query", need=True)
        if len(query) > self.s.max_text_chars:
            raise ApiError(413, f"query is {len(query):,} characters, over the self.limit of {self.s.max_text_chars:,} "
                                "(M3Q_MAX_TEXT_CHARS)", param="query", code="too_large")
        collection = self._collection_of(body)
        mode = http.get_choice(body, "mode", ("hybrid", "dense", "sparse", "m3"), "hybrid")
        k = http.get_int(body, "k", 10, 1, MAX_K)
        hits = await self.gw.searcher.asearch(query, collection, mode, k)
        return http.json_response({"collection": collection, "mode": mode, "hits": [
            {"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata,
             **({"dense": h.dense, "sparse": h.sparse, "colbert": h.colbert} if mode == "m3" else {})}
            for h in hits]})


def add_routes(app: FastAPI, gw: Any) -> None:
    """Add the collection routes of gateway ``gw``."""
    CollectionRoutes(gw).add_to(app)
