"""``RemoteBGEM3EmbeddingFunction``: a drop-in for pymilvus' ``BGEM3EmbeddingFunction``, computed by the workers.

Same methods, options and return types: dense is a list of float32 arrays, sparse a scipy ``csr_array`` of
shape (n, vocabulary size), ColBERT a list of float32 arrays. The model, device and precision are the
workers' (``m3q worker --model/--device/--dtype``), so ``model_name``, ``device`` and ``use_fp16`` are
accepted for compatibility and otherwise ignored.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.sparse import csr_array

from producer.client import Client
from producer.contract.checks import name_item
from producer.contract.errors import ConfigError
from producer.contract.settings import Settings
from producer.contract.wire import Embedding, ItemError


class RemoteBGEM3EmbeddingFunction:
    """BGE-M3 embeddings from the m3-queue workers, with pymilvus' interface."""

    def __init__(self, model_name: str = "BAAI/bge-m3", batch_size: int = 16, device: str | None = None,
                 normalize_embeddings: bool = True, use_fp16: bool = False, return_dense: bool = True,
                 return_sparse: bool = True, return_colbert_vecs: bool = False, *, client: Client | None = None,
                 settings: Settings | None = None, **kwargs: Any) -> None:
        if not normalize_embeddings:
            raise ConfigError("m3-queue workers always L2-normalize (BGE-M3's default); "
                              "normalize_embeddings=False is not supported")
        if not (return_dense or return_sparse or return_colbert_vecs):
            raise ConfigError("choose at least one of return_dense, return_sparse, return_colbert_vecs")
        self.model_name = model_name
        self.batch_size = batch_size
        self.device = device
        self.use_fp16 = use_fp16
        self.client = client or Client(settings)
        self._options = {"dense": return_dense, "sparse": return_sparse, "colbert": return_colbert_vecs}
        self._max_length = {"queries": kwargs.pop("query_max_length", None),
                            "documents": kwargs.pop("passage_max_length", None)}

    def __call__(self, texts: Sequence[str]) -> dict:
        return self.encode_documents(texts)

    @property
    def dim(self) -> dict[str, int]:
        """{'dense', 'colbert_vecs', 'sparse'} sizes, answered by a worker once and cached."""
        return dict(self.client.dims())

    def encode_queries(self, queries: Sequence[str]) -> dict:
        """Encode queries on the query stream."""
        return self._encode(queries, "queries")

    def encode_documents(self, documents: Sequence[str]) -> dict:
        """Encode documents as Celery jobs."""
        return self._encode(documents, "documents")

    def _encode(self, texts: Sequence[str], kind: str) -> dict:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        items = self.client.encode(list(texts), kind, job_texts=self.batch_size,
                                   max_length=self._max_length[kind], **self._options)
        bad = [f"{name_item(i)}: {item.reason}" for i, item in enumerate(items) if isinstance(item, ItemError)]
        if bad:
            raise ConfigError(f"{len(bad)} of {len(items)} texts rejected: " + "; ".join(bad[:10]))
        return self._results(items)  # type: ignore[arg-type]

    def _results(self, items: list[Embedding]) -> dict:
        out: dict[str, Any] = {}
        if self._options["dense"]:
            out["dense"] = [item.dense for item in items]
        if self._options["sparse"]:
            out["sparse"] = to_csr(items, self.dim["sparse"])
        if self._options["colbert"]:
            out["colbert_vecs"] = [item.colbert for item in items]
        return out


def to_csr(items: Sequence[Embedding], vocab_size: int) -> csr_array:
    """Sparse weights as one csr_array of shape (len(items), vocab_size), float64 like pymilvus."""
    indptr = np.cumsum([0] + [len(item.sparse_ids) for item in items])
    indices = np.concatenate([item.sparse_ids for item in items]) if items else np.zeros(0, np.int64)
    values = np.concatenate([item.sparse_weights for item in items]).astype(np.float64) if items else np.zeros(0)
    matrix = csr_array((values, indices, indptr), shape=(len(items), vocab_size))
    matrix.sort_indices()
    return matrix
