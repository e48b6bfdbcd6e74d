"""The producer client: split inputs into jobs, keep a bounded number in flight, wait blocking or with asyncio.

    client = Client()                                   # settings from M3Q_* variables
    vectors = client.encode_documents(texts)            # blocking, input order, Embedding or ItemError each
    vectors = await client.aencode_queries([question])  # from an asyncio handler
    report = client.index("docs", texts, ids)           # encode on the workers, upsert into Milvus

A facade over one module per concept: queries travel on the query stream (:mod:`producer.query_stream`),
documents and index batches as Celery jobs (:mod:`producer.celery_jobs`); :mod:`producer.pipeline` keeps a
call's jobs in flight, :mod:`producer.liveness` finds the workers, :mod:`producer.index_batches` reports what
an index stored, :mod:`producer.redis_errors` sorts an outage from a refusal. Every send returns a handle at
once; a blocking call waits with ``handle.result()``, an asyncio one with ``await handle``: the same jobs,
the same code, two ways to wait (and, for queries, an event loop's own reader and sender: see
:mod:`producer.query_stream`).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterable, Sequence

import msgpack

from producer import index_batches, pipeline
from producer.celery_jobs import CeleryJobs, Handle
from producer.celery_results import AsyncResults
from producer.contract import wire
from producer.contract.errors import BrokerError, ConfigError, JobFailed, JobTimeout, NoWorker  # noqa: F401 - re-exported
from producer.contract.settings import Settings
from producer.contract.wire import Item, PayloadError
from producer.index_batches import IndexReport, Row  # noqa: F401 - re-exported
from producer.liveness import Liveness
from producer.query_stream import LoopSender, QueryStream, StreamHandle
from producer.redis_errors import check_broker  # noqa: F401 - re-exported
from producer.replies import LoopReplies
from producer.rerank import RERANK_WEIGHTS, Ranked, ScoreCall, ScoreJob, Scores, ranked, rerank_pairs

Job = Handle | StreamHandle
"""A job in flight, on either transport: ``.result()`` blocks, ``await job`` does not."""


class Client:
    """Submit encode and index jobs to the workers and wait for them."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.liveness = Liveness(self.settings)
        self.jobs = CeleryJobs(self.settings, self.liveness)
        self.queries = QueryStream(self.settings, self.liveness.watch)
        self._info: dict | None = None

    @property
    def app(self):
        """The client's Celery app (documents and index batches)."""
        return self.jobs.app

    # ---- many texts, bounded in flight -------------------------------------------------------------------

    def encode(self, texts: Sequence[object], kind: str = "documents", *, job_texts: int | None = None,
               device: str | None = None, **options: Any) -> list[Item]:
        """Encode any number of texts through the queue; items in input order. Queries go on the query
        stream (``device``'s own, when given), documents are Celery jobs (on ``device``'s queue, when given)."""
        out, chunks = self._split(texts, kind, job_texts)
        if chunks:
            self.liveness.ensure(self._queue_of(kind, device), device)
        for chunk, job in self._window(texts, chunks, kind, device, options, background=False):
            pipeline.place(out, chunk, job.result())
        return out  # type: ignore[return-value]

    async def aencode(self, texts: Sequence[object], kind: str = "documents", *, job_texts: int | None = None,
                      device: str | None = None, **options: Any) -> list[Item]:
        """:meth:`encode` for asyncio handlers, without a thread per await: the same jobs, awaited (Celery's
        blocking publish runs on the client's one publishing thread)."""
        out, chunks = self._split(texts, kind, job_texts)
        if chunks:
            await self.liveness.aensure(self._queue_of(kind, device), device)
        for chunk, job in self._window(texts, chunks, kind, device, options, background=True):
            pipeline.place(out, chunk, await job.aresult())
        return out  # type: ignore[return-value]

    def encode_queries(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Encode queries (up to 512 tokens each by default) through the query stream."""
        return self.encode(texts, "queries", **options)

    def encode_documents(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Encode documents (up to 8192 tokens each by default) as Celery jobs."""
        return self.encode(texts, "documents", **options)

    async def aencode_queries(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Await the vectors of queries, e.g. from a FastAPI handler."""
        return await self.aencode(texts, "queries", **options)

    async def aencode_documents(self, texts: Sequence[object], **options: Any) -> list[Item]:
        """Await the vectors of documents."""
        return await self.aencode(texts, "documents", **options)

    def _split(self, texts: Sequence[object], kind: str, job_texts: int | None) -> tuple[list, list[list[int]]]:
        _check_kind(kind)
        size = job_texts or (self.settings.job_texts if kind == "documents" else max(self.settings.job_texts, 256))
        return pipeline.split(texts, size)

    def _window(self, texts: Sequence[object], chunks: list[list[int]], kind: str, device: str | None,
                options: dict[str, Any], background: bool) -> Iterable[tuple[list[int], Job]]:
        def submit(chunk: list[int]) -> Job:
            payload = wire.encode_payload([texts[i] for i in chunk], **options)
            return self._send(_task_of(kind), payload, device, chunk[0], background)
        return pipeline.window(chunks, submit, self.settings.max_in_flight)

    def _queue_of(self, kind: str, device: str | None) -> str:
        return self.liveness.queue_of(_task_of(kind), device)

    # ---- single jobs -----------------------------------------------------------------------------------------

    def submit_encode(self, texts: Sequence[object], kind: str = "documents", *, device: str | None = None,
                      first_index: int = 0, **options: Any) -> Job:
        """Send one encode job (kind 'queries' or 'documents'); wait with ``.result()`` or ``await``."""
        _check_kind(kind)
        self.liveness.check_redis()
        return self._send(_task_of(kind), wire.encode_payload(texts, **options), device, first_index)

    def submit_index(self, collection: str, texts: Sequence[object], ids: Sequence[object],
                     metadata: Sequence[object] | None = None, first_index: int = 0,
                     device: str | None = None) -> Handle:
        """Send one index job: encode on a worker, upsert into Milvus ``collection``."""
        payload = {"collection": collection, "texts": list(texts), "ids": list(ids), "batch": first_index}
        if metadata is not None:
            payload["metadata"] = list(metadata)
        return self.submit(wire.TASK_INDEX_DOCUMENTS, payload, device, first_index)

    def submit(self, task: str, payload: dict, device: str | None = None, first_index: int = 0, *,
               task_id: str | None = None) -> Job:
        """Send one job of any task, on its transport (``device``'s own queue or stream, when given).
        ``task_id``: a Celery job's id when the caller chose it (re-index records it before the send)."""
        self.liveness.check_redis()
        return self._send(task, payload, device, first_index, task_id=task_id)

    def attach(self, task: str, task_id: str, payload: dict, first_index: int = 0) -> Handle:
        """A handle on a Celery job sent earlier as ``task_id`` (perhaps by another process), with the same
        watch as a new one's: a job a worker lost as it took it is sent again, with ``payload``."""
        return self.jobs.attach(task, task_id, payload, wire.task_queue(self.settings, task), first_index)

    def _send(self, task: str, payload: dict, device: str | None, first_index: int, background: bool = False,
              task_id: str | None = None) -> Job:
        body = self._check_size(payload)
        if task in wire.QUERY_TASKS:
            loop = asyncio.get_running_loop() if background else None
            return self.queries.submit(task, payload, body, device, first_index, loop)
        return self.jobs.submit(task, payload, self.liveness.queue_of(task, device), first_index, task_id=task_id,
                                background=background)

    def _check_size(self, payload: dict) -> bytes:
        """``payload`` packed as msgpack (the query stream sends these bytes), refused if too big."""
        try:
            body = msgpack.packb(payload)
        except (TypeError, ValueError) as e:
            raise PayloadError(f"payload cannot be sent as msgpack: {e}") from None
        if len(body) > self.settings.max_payload_bytes:
            raise PayloadError(f"job payload is {len(body):,} bytes, over the limit of "
                               f"{self.settings.max_payload_bytes:,} (M3Q_MAX_PAYLOAD_BYTES); send smaller jobs")
        return body

    def call(self, task: str, payload: dict) -> dict:
        """One job of any task (``m3q.info``, ``m3q.tokenize``, ``m3q.decode``): the worker's answer as it sent
        it. :class:`NoWorker` when no worker serves the task."""
        self.liveness.ensure(wire.task_queue(self.settings, task), None)
        return self._send(task, payload, None, 0).raw()

    async def acall(self, task: str, payload: dict) -> dict:
        """:meth:`call`, awaited."""
        await self.liveness.aensure(wire.task_queue(self.settings, task), None)
        return await self._send(task, payload, None, 0, background=True).araw()

    def info(self) -> dict:
        """What a worker says of its model (``m3q.info``: dims, model identity, dtype), asked once and cached."""
        if self._info is None:
            self._info = self.call(wire.TASK_INFO, {})
        return self._info

    def dims(self) -> dict[str, int]:
        """Output sizes (dense, colbert_vecs, sparse)."""
        return dict(self.info()["dims"])

    # ---- BGE-M3's rerank: dense, sparse and ColBERT --------------------------------------------------------

    def compute_score(self, pairs: Sequence[Any], weights: Sequence[float] | None = None,
                      max_query_length: int | None = None, max_passage_length: int | None = None, *,
                      batch_size: int = 256, truncation_side: str = "right") -> Scores:
        """``BGEM3FlagModel.compute_score`` on the workers: FlagEmbedding's five lists (one float per pair),
        ``weights`` [dense, sparse, colbert] (default [1, 1, 1]). Each query and passage is encoded once per
        job of 256 pairs, in one pass; only scores come back. Token limits default to M3Q_QUERY_MAX_LENGTH
        and M3Q_DOCUMENT_MAX_LENGTH (``truncation_side="left"`` keeps a text's last tokens); ``batch_size`` is
        FlagEmbedding's (its ColBERT score pads passages per batch). A bad pair: PayloadError naming it,
        before anything is sent."""
        call = ScoreCall(pairs, weights, max_query_length, max_passage_length, self.settings, batch_size,
                         truncation_side)
        if call.jobs:
            self.liveness.ensure(self._queue_of("queries", None), None)
        return call.merge([job.raw() for _, job in self._score_jobs(call, background=False)])

    async def acompute_score(self, pairs: Sequence[Any], weights: Sequence[float] | None = None,
                             max_query_length: int | None = None, max_passage_length: int | None = None, *,
                             batch_size: int = 256, truncation_side: str = "right") -> Scores:
        """:meth:`compute_score`, awaited: the same jobs, no thread."""
        call = ScoreCall(pairs, weights, max_query_length, max_passage_length, self.settings, batch_size,
                         truncation_side)
        if call.jobs:
            await self.liveness.aensure(self._queue_of("queries", None), None)
        return call.merge([await job.araw() for _, job in self._score_jobs(call, background=True)])

    def rerank(self, query: str, passages: Sequence[str], k: int | None = None,
               weights: Sequence[float] = RERANK_WEIGHTS, **options: Any) -> list[Ranked]:
        """``passages`` ranked for ``query`` by ``colbert+sparse+dense`` (weights 0.4 / 0.2 / 0.4 by default):
        ``(index, score)``, best first, the first ``k``. ``options``: ``max_query_length``,
        ``max_passage_length``, ``truncation_side``, as :meth:`compute_score`'s."""
        return ranked(self.compute_score(rerank_pairs(query, passages, k), weights, **options), k)

    async def arerank(self, query: str, passages: Sequence[str], k: int | None = None,
                      weights: Sequence[float] = RERANK_WEIGHTS, **options: Any) -> list[Ranked]:
        """:meth:`rerank`, awaited."""
        return ranked(await self.acompute_score(rerank_pairs(query, passages, k), weights, **options), k)

    def _score_jobs(self, call: ScoreCall, background: bool) -> Iterable[tuple[ScoreJob, Job]]:
        def submit(job: ScoreJob) -> Job:
            return self._send(wire.TASK_SCORE, job.payload, None, job.first, background)
        return pipeline.window(call.jobs, submit, self.settings.max_in_flight)

    # ---- indexing --------------------------------------------------------------------------------------------

    def index(self, collection: str, texts: Sequence[object], ids: Sequence[object],
              metadata: Sequence[object] | None = None, *, job_texts: int | None = None,
              progress: Callable[[int], None] | None = None, force: bool = False) -> IndexReport:
        """Index documents; rejected ones are reported with their input position, never dropped silently.
        Documents stored unchanged (same id, text and metadata) are skipped, unless ``force``."""
        if len(ids) != len(texts) or (metadata is not None and len(metadata) != len(texts)):
            raise ConfigError("texts, ids (and metadata) must have the same length")
        report = IndexReport()
        rows = ((i, texts[i], ids[i], None if metadata is None else metadata[i]) for i in range(len(texts)))
        return self.index_rows(collection, index_batches.first_of_each_id(rows, report), job_texts=job_texts,
                               progress=progress, report=report, force=force)

    def index_rows(self, collection: str, rows: Iterable[Row], *, job_texts: int | None = None,
                   progress: Callable[[int], None] | None = None, report: IndexReport | None = None,
                   force: bool = False) -> IndexReport:
        """Index (position, text, id, metadata) rows in jobs of ``job_texts``, a bounded number in flight;
        rows stored unchanged are skipped, unless ``force``."""
        return index_batches.index_rows(self, collection, rows, job_texts=job_texts, progress=progress, report=report,
                                        force=force)

    # ---- live workers ----------------------------------------------------------------------------------------

    def workers(self, device: str | None = None) -> list[dict]:
        """Live workers as their heartbeats describe them (device, model, dtype, rate; what `m3q status`
        shows); with ``device``, only those serving that device's own queue."""
        return self.liveness.workers(self._queue_of("queries", device))

    def require_worker(self, device: str | None = None, grace_s: float | None = None) -> list[dict]:
        """The live workers (of ``device``'s queue, when given), waiting up to ``grace_s`` (default
        ``M3Q_NO_WORKER_GRACE_S``) for one to appear; :class:`NoWorker` if none does."""
        grace_s = self.settings.no_worker_grace_s if grace_s is None else grace_s
        return self.liveness.require(self._queue_of("queries", device), device, grace_s)

    # ---- closing ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close this client's connections (its Celery app's pools, its Redis client). The process's reply
        reader and stream sender stay: other clients of the process share them, and they stop when idle."""
        self.jobs.close()
        self.liveness.close()

    async def aclose(self) -> None:
        """:meth:`close`, plus this event loop's Celery-result listener (a web app's shutdown hook); its
        pending awaits are cancelled."""
        await AsyncResults.close_loop(self.settings)
        await LoopSender.close_loop(self.settings)
        await LoopReplies.close_loop(self.settings)
        self.close()


def _check_kind(kind: str) -> None:
    if kind not in wire.KINDS:
        raise ConfigError(f"kind must be 'queries' or 'documents', got {kind!r}")


def _task_of(kind: str) -> str:
    return wire.TASK_ENCODE_QUERIES if kind == "queries" else wire.TASK_ENCODE_DOCUMENTS
