"""The HTTP gateway (``m3q serve``): any web app, in any language, enqueues over HTTP.

An asyncio producer on FastAPI and uvicorn: it enqueues on Redis through m3-queue's own client and awaits
the workers; it never loads the model and holds no thread per request. It is stateless (index jobs are
recorded in Redis), so N processes run behind any load balancer. Routes:

- ``POST /v1/embeddings``, ``GET /v1/models``: OpenAI's API (the ``openai`` client works unchanged with
  ``base_url=``);
- ``POST /`` (= ``/embed``), ``/embed_sparse``, ``/embed_all``, ``/tokenize``, ``/decode``, ``GET /info``: TEI's
  API (``huggingface_hub``, Haystack, Milvus' TEI text-embedding function), and TEI's ``POST /rerank``,
  answered with BGE-M3's own dense + sparse + ColBERT score (Haystack's and LlamaIndex's TEI rerankers);
- ``POST /v1/encode``: m3-queue's own, dense, sparse and ColBERT, JSON or msgpack;
- ``POST /v1/index``, ``GET /v1/jobs/{id}``, ``POST /v1/search``: collections in Milvus;
- ``GET /health`` (503 without a live worker), ``GET /metrics`` (Prometheus).

Modules: :mod:`.app` (the app), :mod:`.guard` (API keys, the in-flight bound, metrics), :mod:`.http`
(errors, bodies, responses), :mod:`.encode`, :mod:`.tei`, :mod:`.rerank` and :mod:`.jobs` (the routes), :mod:`.server`
(uvicorn).
docs/http-api.md documents the API.
"""
from __future__ import annotations

from producer.gateway.app import create_app
from producer.gateway.server import serve

__all__ = ["create_app", "serve"]
