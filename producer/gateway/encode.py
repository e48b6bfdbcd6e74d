"""Encoding over HTTP: OpenAI's ``/v1/embeddings`` and ``/v1/models``, and m3-queue's own ``/v1/encode``
(TEI's routes are :mod:`.tei`).

OpenAI's and TEI's routes encode as queries, on the query stream (awaited natively by the
client: no thread): their vectors are ``Client.encode_queries``' bit for bit, and their token limit is
``M3Q_QUERY_MAX_LENGTH``. Longer texts go through ``/v1/encode`` with ``"kind": "documents"`` (up to
``M3Q_DOCUMENT_MAX_LENGTH`` tokens, as Celery jobs) or ``/v1/index``.
"""
from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from producer.contract import wire
from producer.contract.wire import Embedding, ItemError, encode_item
from producer.gateway import http
from producer.gateway.http import ApiError, invalid

OWNER = "m3-queue"
"""``owned_by`` of the model in ``/v1/models``."""


def texts_of(value: Any, field: str, max_texts: int, max_chars: int) -> list[str]:
    """The texts of an OpenAI ``input`` or a TEI ``inputs``: a string or a non-empty list of strings. Token
    arrays are refused (the workers tokenize with the checkpoint's own tokenizer); over the limits is 413."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise invalid(field, "must be a string or a non-empty list of strings")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or \
            any(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
        raise invalid(field, "token arrays are not supported: send the texts (the workers tokenize them with "
                             "the checkpoint's own tokenizer); LangChain's OpenAIEmbeddings sends texts with "
                             "check_embedding_ctx_length=False")
    if len(value) > max_texts:
        raise ApiError(413, f"{field} has {len(value):,} texts, over the limit of {max_texts:,} "
                            "(M3Q_MAX_JOB_TEXTS); send them in several requests", param=field, code="too_large")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise invalid(f"{field}[{i}]", f"must be a string, got {http.describe(text)}")
        if len(text) > max_chars:
            raise ApiError(413, f"{field}[{i}] is {len(text):,} characters, over the limit of {max_chars:,} "
                                "(M3Q_MAX_TEXT_CHARS)", param=f"{field}[{i}]", code="too_large")
    return value


def checked(items: list, field: str, truncate: bool, limit: int) -> list[Embedding]:
    """The items when each one is a vector; 422 naming the rejected ones, or 413 naming the ones cut at the
    token limit when the caller asked not to truncate."""
    rejected = [{"index": i, "reason": item.reason} for i, item in enumerate(items) if isinstance(item, ItemError)]
    if rejected:
        raise http.refuse_items(422, field, rejected, len(items), "inputs were rejected")
    if not truncate:
        cut = [{"index": i, "reason": f"over the limit of {limit} tokens (M3Q_QUERY_MAX_LENGTH); send "
                                      '"truncate": true to cut it (truncation_direction says which end)'}
               for i, item in enumerate(items) if item.truncated]
        if cut:
            raise http.refuse_items(413, field, cut, len(items), "inputs are too long")
    return items


class EncodeRoutes(http.Routes):
    """The encoding routes of gateway ``gw`` (a ``producer.gateway.app.Gateway``), one method each."""

    def __init__(self, gw: Any) -> None:
        super().__init__(gw)
        self.created = int(time.time())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.gw.model, "object": "model", "created": self.created, "owned_by": OWNER}

    @http.endpoint("GET", "/v1/models")
    async def models(self, request: Request) -> Response:
        """OpenAI's model list: the one model the workers serve."""
        return http.json_response({"object": "list", "data": [self._model_card()]})

    @http.endpoint("GET", "/v1/models/{model_id:path}")
    async def model(self, request: Request) -> Response:
        """OpenAI's model lookup; 404 for any other name."""
        name = request.path_params["model_id"]
        if name != self.gw.model:
            raise ApiError(404, f"model {name!r} is not served here; this gateway serves {self.gw.model!r}",
                           param="model", code="model_not_found")
        return http.json_response(self._model_card())

    @http.endpoint("POST", "/v1/embeddings", "/embeddings")
    async def openai_embeddings(self, request: Request) -> Response:
        """OpenAI's embeddings API (also the default ``openai`` client, which asks for base64)."""
        body = await http.read_object(request, self.limit)
        texts = texts_of(http.required(body, "input"), "input", self.s.max_job_texts, self.s.max_text_chars)
        http.get_str(body, "model")
        http.get_str(body, "user")
        encoding = http.get_choice(body, "encoding_format", ("float", "base64"), "float")
        dimensions = http.get_int(body, "dimensions", None, 1, None)
        items = checked(await self.gw.client.aencode_queries(texts, dense=True, sparse=False), "input",
                        http.get_bool(body, "truncate", True), self.s.query_max_length)
        size = len(items[0].dense)
        if dimensions is not None and dimensions != size:
            raise invalid("dimensions", f"this model gives {size}-dimensional vectors, not {dimensions}; "
                                        "omit dimensions (BGE-M3 vectors cannot be shortened)")
        if encoding == "base64":  # OpenAI's base64: the little-endian float32 bytes of each vector
            vectors = [base64.b64encode(np.ascontiguousarray(item.dense, dtype="<f4").tobytes()).decode()
                       for item in items]
        else:
            vectors = [item.dense for item in items]
        tokens = sum(item.n_tokens for item in items)
        return http.json_response({
            "object": "list", "model": self.gw.model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @http.endpoint("POST", "/v1/encode")
    async def encode(self, request: Request) -> Response:
        """m3-queue's own: queries or documents; dense, sparse, ColBERT; JSON or msgpack (``Accept``)."""
        body = await http.read_object(request, self.limit)
        texts = http.required(body, "texts")
        if not isinstance(texts, list) or not texts:
            raise invalid("texts", "must be a non-empty list of strings")
        if len(texts) > self.s.max_job_texts:
            raise ApiError(413, f"texts has {len(texts):,} items, over the self.limit of {self.s.max_job_texts:,} "
                                "(M3Q_MAX_JOB_TEXTS)", param="texts", code="too_large")
        kind = http.get_choice(body, "kind", ("queries", "documents"), "queries")
        options = {"dense": http.get_bool(body, "dense", True), "sparse": http.get_bool(body, "sparse", True),
                   "colbert": http.get_bool(body, "colbert", False),
                   # The workers know the model's positions, and refuse more (422, naming the bound).
                   "max_length": http.get_int(body, "max_length", None, 2, None)}
        # These two travel only when not the default (None is left out of the payload).
        side = http.get_choice(body, "truncation_side", wire.TRUNCATION_SIDES, "right")
        options["truncation_side"] = None if side == "right" else side
        options["normalize"] = None if http.get_bool(body, "normalize", True) else False
        if not (options["dense"] or options["sparse"] or options["colbert"]):
            raise invalid("dense", "ask for at least one of dense, sparse and colbert")
        run = self.gw.client.aencode_queries if kind == "queries" else self.gw.client.aencode_documents
        items = await run(texts, **options)
        binary = http.wants_msgpack(request)
        tokens = sum(item.n_tokens for item in items if isinstance(item, Embedding))
        out = {"model": self.gw.model, "kind": kind,
               "items": [encoded(i, item, binary) for i, item in enumerate(items)],
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return http.msgpack_response(out) if binary else http.json_response(out)


def add_routes(app: FastAPI, gw: Any) -> None:
    """Add the encoding routes of gateway ``gw``."""
    EncodeRoutes(gw).add_to(app)


def encoded(index: int, item: Any, binary: bool) -> dict[str, Any]:
    """One item of /v1/encode: vectors as JSON numbers, or (msgpack) as little-endian float32/int32 bytes."""
    if isinstance(item, ItemError):
        return {"index": index, "error": item.reason}
    if binary:  # the workers' own compact form (producer.contract.wire.encode_item), with the item's place
        return {"index": index, **encode_item(item)}
    out: dict[str, Any] = {"index": index, "tokens": item.n_tokens, "truncated": item.truncated}
    if item.dense is not None:
        out["dense"] = item.dense
    if item.sparse_ids is not None:
        out["sparse"] = {str(k): v for k, v in item.sparse_dict().items()}
    if item.colbert is not None:
        out["colbert"] = item.colbert
    return out
