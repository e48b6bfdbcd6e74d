"""TEI's ``POST /rerank``, answered by BGE-M3 itself: the query and each text encoded once on the workers (one
pass gives dense, sparse and ColBERT), each text scored with ``colbert+sparse+dense`` at the weights
0.4 / 0.2 / 0.4, as :meth:`Client.rerank <producer.client.Client.rerank>` scores it.

The request and the answer have TEI's shapes: ``{"query", "texts", "raw_scores", "return_text", "truncate",
"truncation_direction"}`` gives ``[{"index", "score", "text"?}]``, best first. Where it differs, on purpose:

- TEI reranks with a cross-encoder and turns its logits into probabilities unless ``raw_scores``; BGE-M3's
  score is already a similarity (a weighted mean of three, each about -1 to 1 for dense and ColBERT, and
  0 or more for sparse), so ``raw_scores`` is accepted and changes nothing;
- texts and query are encoded apart, so their token limits are apart too: the query up to
  ``M3Q_QUERY_MAX_LENGTH`` tokens, each text up to ``M3Q_DOCUMENT_MAX_LENGTH``, not the two together.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from producer.contract import checks
from producer.gateway import http
from producer.gateway.encode import texts_of
from producer.gateway.http import ApiError, invalid
from producer.rerank import RERANK_WEIGHTS, ranked

SCORES = "colbert+sparse+dense"
"""The list of ``compute_score`` that ``/rerank`` ranks by."""
CAPABILITY = {"route": "/rerank", "scores": SCORES, "weights": list(RERANK_WEIGHTS)}
"""What ``GET /info`` says of this route: the model also reranks, with its own three outputs."""


def options(body: dict[str, Any]) -> tuple[bool, str]:
    """TEI's ``truncate`` (default false: a text over its limit is refused) and ``truncation_direction``."""
    side = http.truncation_side(body)
    http.get_bool(body, "raw_scores", False)  # checked, and without effect: the scores are similarities
    return http.get_bool(body, "truncate", False), side


def checked_texts(body: dict[str, Any], s: Any) -> tuple[str, list[str]]:
    """The query and the texts, or 422 naming what a worker would refuse (413 over the limits)."""
    query = http.get_str(body, "query", need=True)
    reason = checks.text_problem(query, s.max_text_chars)
    if reason:
        raise ApiError(413 if "over the limit" in reason else 422, f"query: {reason}", param="query",
                       code="too_large" if "over the limit" in reason else "invalid_field")
    value = http.required(body, "texts")
    if isinstance(value, str):
        raise invalid("texts", "must be a non-empty list of strings")
    texts = texts_of(value, "texts", s.max_job_texts, s.max_text_chars)
    rejected = [{"index": i, "reason": r} for i, r in enumerate(checks.text_problem(t, s.max_text_chars)
                                                                 for t in texts) if r]
    if rejected:
        raise http.refuse_items(422, "texts", rejected, len(texts), "texts were rejected")
    return query, texts


def too_long(cut: tuple[int, ...], n: int, s: Any) -> ApiError:
    """413 naming the texts cut at their token limit, when the caller asked not to truncate."""
    reason = (f"the query (over {s.query_max_length} tokens, M3Q_QUERY_MAX_LENGTH) or this text (over "
              f"{s.document_max_length} tokens, M3Q_DOCUMENT_MAX_LENGTH) is too long; send \"truncate\": true "
              "to cut it (truncation_direction says which end)")
    return http.refuse_items(413, "texts", [{"index": i, "reason": reason} for i in cut], n, "inputs are too long")


class RerankRoutes(http.Routes):
    """``/rerank`` of gateway ``gw`` (a ``producer.gateway.app.Gateway``)."""

    @http.endpoint("POST", "/rerank")
    async def rerank(self, request: Request) -> Response:
        """``[{"index", "score", "text"?}]``, best first: BGE-M3's three-signal score of each text."""
        body = await http.read_object(request, self.s.gateway_max_body_bytes)
        query, texts = checked_texts(body, self.s)
        truncate, side = options(body)
        return_text = http.get_bool(body, "return_text", False)
        pairs = [(query, t) for t in texts]
        scores = await self.gw.client.acompute_score(pairs, list(RERANK_WEIGHTS), truncation_side=side)
        if scores.cut and not truncate:
            raise too_long(scores.cut, len(texts), self.s)
        return http.json_response([{"index": r.index, "score": r.score, **({"text": texts[r.index]} if return_text
                                                                            else {})} for r in ranked(scores, None)])


def add_routes(app: FastAPI, gw: Any) -> None:
    """Add ``/rerank`` of gateway ``gw``."""
    RerankRoutes(gw).add_to(app)
