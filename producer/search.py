"""Search for web apps: encode the query on the workers (the query stream), then search Milvus.

Mode ``m3`` adds BGE-M3's own rerank: hybrid search recalls ``M3Q_RERANK_CANDIDATES`` documents, and the
workers re-score their stored texts against the query with dense, sparse and ColBERT together
(:meth:`Client.compute_score <producer.client.Client.compute_score>`, weights 0.4 / 0.2 / 0.4).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from producer.client import Client
from producer.contract import milvus
from producer.contract.errors import ConfigError
from producer.contract.milvus import Hit
from producer.contract.settings import Settings
from producer.contract.wire import ItemError
from producer.rerank import RERANK_WEIGHTS, Scores

MAX_K = 16384
"""Most hits one search returns (Milvus' limit on ``limit``)."""
MODES = ("hybrid", "dense", "sparse", "m3")


@dataclass
class M3Hit(Hit):
    """A hit of mode ``m3``: ``score`` is ``colbert+sparse+dense``, with each signal's own score beside it."""

    dense: float = 0.0
    sparse: float = 0.0
    colbert: float = 0.0


def rescored(candidates: list[Hit], scores: Scores, k: int) -> list[M3Hit]:
    """The candidates ordered by their three-signal score (ties keep the recall's order), the first ``k``."""
    total = scores["colbert+sparse+dense"]
    order = sorted(range(len(candidates)), key=lambda i: (-total[i], i))[:k]
    return [M3Hit(candidates[i].id, total[i], candidates[i].text, candidates[i].metadata, scores["dense"][i],
                  scores["sparse"][i], scores["colbert"][i]) for i in order]


class Searcher:
    """Holds a producer client and a Milvus client; reuse one per process."""

    def __init__(self, settings: Settings | None = None, client: Client | None = None) -> None:
        self.settings = settings or (client.settings if client else Settings.from_env())
        self.client = client or Client(self.settings)
        self._milvus = None
        self._checked: set[str] = set()
        self._identity: tuple[int, str] | None = None

    def search(self, text: str, collection: str, mode: str = "hybrid", k: int = 10) -> list[Hit]:
        """Ranked hits for ``text`` in ``collection``; mode is hybrid, dense, sparse or m3 (hybrid recall of
        ``M3Q_RERANK_CANDIDATES``, re-scored on the workers with all three signals: :class:`M3Hit`)."""
        self._prepare(collection, mode, k)
        (item,) = self.client.encode_queries([text])
        if mode != "m3":
            return self._search(collection, item, mode, k)
        candidates = self._search(collection, item, "hybrid", self._recall(k))
        return rescored(candidates, self.client.compute_score(_pairs(text, candidates), RERANK_WEIGHTS), k)

    def _recall(self, k: int) -> int:
        return min(MAX_K, max(k, self.settings.rerank_candidates))

    def _prepare(self, collection: str, mode: str, k: int) -> None:
        """The arguments checked, Milvus connected and the collection checked: before the query is encoded,
        so that a wrong collection fails in milliseconds."""
        if mode not in MODES:
            raise ConfigError(f"mode must be hybrid, dense, sparse or m3, got {mode!r}")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ConfigError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        if self._milvus is None:
            self._milvus = milvus.connect(self.settings)
        self._check(collection)

    def _search(self, collection: str, item: object, mode: str, k: int) -> list[Hit]:
        if isinstance(item, ItemError):
            raise ConfigError(f"query rejected: {item.reason}")
        return milvus.search(self._milvus, collection, item.dense, item.sparse_dict(), mode=mode, k=k)

    def _check(self, collection: str) -> None:
        """The collection exists and holds vectors of the workers' model and dense size (once per name:
        SchemaMismatch rather than a dimension error deep in Milvus)."""
        if collection in self._checked:
            return
        if not milvus.has_collection(self._milvus, collection):
            uri = milvus.redact(milvus.milvus_uri(self.settings))
            raise milvus.MilvusRejected(f"collection {collection!r} does not exist in Milvus at {uri}; index into "
                                        f"it first (`m3q index FILE --collection {collection}`)")
        dim, model = self._workers_model()
        milvus.check_collection(self._milvus, collection, dim, model)
        self._checked.add(collection)

    def _workers_model(self) -> tuple[int, str]:
        """(dense size, model identity) of the workers, asked once on the query stream."""
        if self._identity is None:
            raw = self.client.info()  # no worker: NoWorker, at once
            self._identity = int(raw["dims"]["dense"]), str(raw.get("model_identity") or raw["model"])
        return self._identity

    async def asearch(self, text: str, collection: str, mode: str = "hybrid", k: int = 10) -> list[Hit]:
        """:meth:`search` for asyncio handlers: the query is encoded through the client's native asyncio path
        (no thread); only Milvus' blocking calls run on the loop's default executor (connecting and checking a
        collection on its first search, then each search)."""
        if self._milvus is None or collection not in self._checked:
            await asyncio.to_thread(self._prepare, collection, mode, k)
        else:
            self._prepare(collection, mode, k)  # no I/O left: arguments only
        (item,) = await self.client.aencode_queries([text])
        if mode != "m3":
            return await asyncio.to_thread(self._search, collection, item, mode, k)
        candidates = await asyncio.to_thread(self._search, collection, item, "hybrid", self._recall(k))
        return rescored(candidates, await self.client.acompute_score(_pairs(text, candidates), RERANK_WEIGHTS), k)

    def close(self) -> None:
        """Close the Milvus connection (a later search opens a new one)."""
        if self._milvus is not None:
            self._milvus.close()
            self._milvus = None


def _pairs(text: str, candidates: list[Hit]) -> list[tuple[str, str]]:
    return [(text, hit.text) for hit in candidates]


def search(text: str, collection: str, mode: str = "hybrid", k: int = 10,
           settings: Settings | None = None) -> list[Hit]:
    """One-off search (a web app should keep a :class:`Searcher`)."""
    return Searcher(settings).search(text, collection, mode, k)
