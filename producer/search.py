"""Search for web apps: encode the query on the workers (the query stream), then search Milvus."""
from __future__ import annotations

import asyncio

from producer.client import Client
from producer.contract import milvus
from producer.contract.errors import ConfigError
from producer.contract.milvus import Hit
from producer.contract.settings import Settings
from producer.contract.wire import ItemError

MAX_K = 16384
"""Most hits one search returns (Milvus' limit on ``limit``)."""


class Searcher:
    """Holds a producer client and a Milvus client; reuse one per process."""

    def __init__(self, settings: Settings | None = None, client: Client | None = None) -> None:
        self.settings = settings or (client.settings if client else Settings.from_env())
        self.client = client or Client(self.settings)
        self._milvus = None
        self._checked: set[str] = set()
        self._identity: tuple[int, str] | None = None

    def search(self, text: str, collection: str, mode: str = "hybrid", k: int = 10) -> list[Hit]:
        """Ranked hits for ``text`` in ``collection``; mode is hybrid, dense or sparse."""
        self._prepare(collection, mode, k)
        (item,) = self.client.encode_queries([text])
        return self._search(collection, item, mode, k)

    def _prepare(self, collection: str, mode: str, k: int) -> None:
        """The arguments checked, Milvus connected and the collection checked: before the query is encoded,
        so that a wrong collection fails in milliseconds."""
        if mode not in ("hybrid", "dense", "sparse"):
            raise ConfigError(f"mode must be hybrid, dense or sparse, got {mode!r}")
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
        return await asyncio.to_thread(self._search, collection, item, mode, k)

    def close(self) -> None:
        """Close the Milvus connection (a later search opens a new one)."""
        if self._milvus is not None:
            self._milvus.close()
            self._milvus = None


def search(text: str, collection: str, mode: str = "hybrid", k: int = 10,
           settings: Settings | None = None) -> list[Hit]:
    """One-off search (a web app should keep a :class:`Searcher`)."""
    return Searcher(settings).search(text, collection, mode, k)
