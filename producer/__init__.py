"""m3-queue's producer side: send texts to the BGE-M3 workers and get vectors back, or index into Milvus.

Light on purpose: it imports neither torch nor transformers, and ``import producer`` loads nothing but this
file; each name below is imported on first use (``from producer import Client`` loads the client, and
scipy only with ``RemoteBGEM3EmbeddingFunction``). See docs/architecture.md for what lives where.
"""
from __future__ import annotations

import importlib
from typing import Any

_CONTRACT = "producer.contract"
_EXPORTS = {
    "Client": "producer.client", "Handle": "producer.celery_jobs",
    "StreamHandle": "producer.query_stream", "IndexReport": "producer.index_batches",
    "RemoteBGEM3EmbeddingFunction": "producer.embedding_function",
    "Settings": f"{_CONTRACT}.settings", "Embedding": f"{_CONTRACT}.wire", "ItemError": f"{_CONTRACT}.wire",
    **{name: f"{_CONTRACT}.errors" for name in ("M3QError", "JobFailed", "JobTimeout", "NoWorker", "PayloadError")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
