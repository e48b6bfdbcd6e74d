"""TEI's API, as text-embeddings-inference serves it for an embedding model: ``POST /`` (and ``/invocations``)
= ``/embed``, ``/embed_sparse``, ``/embed_all``, ``/tokenize``, ``/decode`` and ``GET /info`` (``/rerank``, which
BGE-M3 answers with its own three outputs, is :mod:`producer.gateway.rerank`; ``/info`` names it under ``m3q``).

Requests and answers have TEI's shapes and defaults, so TEI's clients work unchanged. Where BGE-M3 or
m3-queue differs, on purpose:

- ``/embed_all`` gives BGE-M3's per-token output, its ColBERT vectors (one L2-normalized vector per token
  after CLS, as FlagEmbedding's ``colbert_vecs``), not the transformer's raw hidden states that TEI returns;
- ``/tokenize`` and ``/decode`` run on a worker, with the checkpoint's own ``tokenizer.json`` (the gateway
  never loads the model); ``/tokenize`` refuses what ``/embed`` would refuse (an empty text, a NUL);
- ``prompt_name`` and ``dimensions`` are refused: BGE-M3 has no prompts and its vectors cannot be shortened.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from producer.contract import wire
from producer.contract.wire import Embedding
from producer.gateway import http
from producer.gateway.encode import checked, texts_of
from producer.gateway.http import ApiError, invalid
from producer.gateway.rerank import CAPABILITY

TEI_VERSION = "1.8.0"
"""The TEI API version whose shapes these routes follow (reported by /info)."""


def options(body: dict[str, Any], normalize: bool = False) -> tuple[bool, dict[str, Any]]:
    """TEI's ``truncate`` (default false: a text over the limit is refused), and the job options of
    ``truncation_direction`` and (``normalize``: for /embed) ``normalize``; 422 for what BGE-M3 cannot do."""
    for name in ("prompt_name", "dimensions"):
        if body.get(name) is not None:
            raise invalid(name, "is not supported by BGE-M3 (no prompts, no shortened vectors); omit it")
    side = http.truncation_side(body)
    job: dict[str, Any] = {"truncation_side": "left"} if side == "left" else {}
    if normalize and not http.get_bool(body, "normalize", True):
        job["normalize"] = False  # the raw CLS state, as TEI returns it
    return http.get_bool(body, "truncate", False), job


def sparse_values(item: Embedding) -> list[dict[str, Any]]:
    """TEI's sparse shape, by ascending token id."""
    if item.sparse_ids is None:
        return []
    order = np.argsort(item.sparse_ids, kind="stable")
    ids, weights = item.sparse_ids[order].tolist(), item.sparse_weights[order].tolist()
    return [{"index": i, "value": w} for i, w in zip(ids, weights)]


def token(piece: list) -> dict[str, Any]:
    """One token of ``/tokenize``, from the worker's ``[id, text, special, start, stop]``."""
    token_id, text, special, start, stop = piece
    return {"id": token_id, "text": text, "special": special, "start": start, "stop": stop}


def sequences_of(value: Any, max_texts: int) -> list[list[int]]:
    """``/decode``'s ``ids``: one list of token ids, or a non-empty list of them."""
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if len(value) > max_texts:
            raise ApiError(413, f"ids has {len(value):,} sequences, over the limit of {max_texts:,} "
                                "(M3Q_MAX_JOB_TEXTS)", param="ids", code="too_large")
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [value]
    raise invalid("ids", "must be a list of token ids, or a non-empty list of such lists")


def answers(raw: dict[str, Any], field: str, key: str) -> list[Any]:
    """The ``key`` of each item a worker answered; 422 naming the items it refused."""
    items = raw["items"]
    rejected = [{"index": i, "reason": item["error"]} for i, item in enumerate(items) if "error" in item]
    if rejected:
        raise http.refuse_items(422, field, rejected, len(items), "inputs were rejected")
    return [item[key] for item in items]


class TeiRoutes(http.Routes):
    """TEI's routes of gateway ``gw`` (a ``producer.gateway.app.Gateway``), one method each."""

    async def _inputs(self, request: Request) -> tuple[dict[str, Any], list[str]]:
        body = await http.read_object(request, self.limit)
        return body, texts_of(http.required(body, "inputs"), "inputs", self.s.max_job_texts, self.s.max_text_chars)

    @http.endpoint("POST", "/", "/invocations", "/embed")
    async def embed(self, request: Request) -> Response:
        """One dense vector per input (``"normalize": false``: the raw CLS state)."""
        body, texts = await self._inputs(request)
        truncate, job = options(body, normalize=True)
        items = await self.gw.client.aencode_queries(texts, dense=True, sparse=False, **job)
        return http.json_response([item.dense for item in checked(items, "inputs", truncate, self.s.query_max_length)])

    @http.endpoint("POST", "/embed_sparse")
    async def embed_sparse(self, request: Request) -> Response:
        """``[{"index": token id, "value": weight}, ...]`` per input, by token id."""
        body, texts = await self._inputs(request)
        truncate, job = options(body)
        items = await self.gw.client.aencode_queries(texts, dense=False, sparse=True, **job)
        items = checked(items, "inputs", truncate, self.s.query_max_length)
        return http.json_response([sparse_values(i) for i in items])

    @http.endpoint("POST", "/embed_all")
    async def embed_all(self, request: Request) -> Response:
        """BGE-M3's ColBERT vectors: per input, one vector per token after CLS."""
        body, texts = await self._inputs(request)
        truncate, job = options(body)
        items = await self.gw.client.aencode_queries(texts, dense=False, sparse=False, colbert=True, **job)
        return http.json_response([i.colbert for i in checked(items, "inputs", truncate, self.s.query_max_length)])

    @http.endpoint("POST", "/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """Per input, its tokens: ``{"id", "text", "special", "start", "stop"}`` (byte offsets, as TEI)."""
        body, texts = await self._inputs(request)
        if body.get("prompt_name") is not None:
            raise invalid("prompt_name", "is not supported by BGE-M3 (no prompts); omit it")
        raw = await self.gw.client.acall(wire.TASK_TOKENIZE, {
            "texts": texts, "add_special_tokens": http.get_bool(body, "add_special_tokens", True)})
        return http.json_response([[token(p) for p in pieces] for pieces in answers(raw, "inputs", "tokens")])

    @http.endpoint("POST", "/decode")
    async def decode(self, request: Request) -> Response:
        """The text of each list of token ids."""
        body = await http.read_object(request, self.limit)
        sequences = sequences_of(http.required(body, "ids"), self.s.max_job_texts)
        raw = await self.gw.client.acall(wire.TASK_DECODE, {
            "sequences": sequences, "skip_special_tokens": http.get_bool(body, "skip_special_tokens", True)})
        return http.json_response(answers(raw, "ids", "text"))

    @http.endpoint("GET", "/info")
    async def info(self, request: Request) -> Response:
        """From the settings and the first live worker's heartbeat."""
        workers = await asyncio.to_thread(self.gw.client.workers)
        worker = workers[0] if workers else {}
        return http.json_response({
            "model_id": self.gw.model, "model_sha": None, "model_dtype": worker.get("dtype", self.s.dtype),
            "served_model_name": self.gw.model, "model_type": {"embedding": {"pooling": "cls"}},
            "max_concurrent_requests": self.s.gateway_max_in_flight, "max_input_length": self.s.query_max_length,
            "max_batch_tokens": self.s.max_batch_tokens, "max_batch_requests": None,
            "max_client_batch_size": self.s.max_job_texts, "auto_truncate": False, "tokenization_workers": len(workers),
            "version": TEI_VERSION, "sha": None, "docker_label": None,
            "m3q": {"workers": len(workers), "dims": worker.get("dims"), "device": worker.get("device"),
                    "rerank": CAPABILITY}})


def add_routes(app: FastAPI, gw: Any) -> None:
    """Add tEI's routes of gateway ``gw``."""
    TeiRoutes(gw).add_to(app)
