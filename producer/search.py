"""Search for web apps: encode the query on the workers (query lane), then search Milvus."""
from __future__ import annotations

import asyncio

from producer import milvus
from producer.client import Client
from producer.milvus import Hit
from producer.settings import Settings
from producer.wire import ItemError

MAX_K = 16384
"""Most hits one search returns (Milvus' limit on ``limit``)."""


class Searcher:
    """Holds a producer client and a Milvus client; reuse one per process."""

    def __init__(self, settings: Settings | None = None, client: Client | None = None) -> None:
        self.settings = settings or (client.settings if client else Settings.from_env())
        self.client = client or Client(self.settings)
        self._milvus = None

    def search(self, text: str, collection: str, mode: str = "hybrid", k: int = 10) -> list[Hit]:
        """Ranked hits for ``text`` in ``collection``; mode is hybrid, dense or sparse."""
        if mode not in ("hybrid", "dense", "sparse"):
            raise ValueError(f"mode must be hybrid, dense or sparse, got {mode!r}")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")  # before encoding the query
        (item,) = self.client.encode_queries([text])
        if isinstance(item, ItemError):
            raise ValueError(f"query rejected: {item.reason}")
        if self._milvus is None:
            self._milvus = milvus.connect(self.settings)
        return milvus.search(self._milvus, collection, item.dense, item.sparse_dict(), mode=mode, k=k)

    async def asearch(self, text: str, collection: str, mode: str = "hybrid", k: int = 10) -> list[Hit]:
        """:meth:`search` for asyncio handlers."""
        return await asyncio.to_thread(self.search, text, collection, mode, k)


def search(text: str, collection: str, mode: str = "hybrid", k: int = 10, settings: Settings | None = None) -> list[Hit]:
    """One-off search (a web app should keep a :class:`Searcher`)."""
    return Searcher(settings).search(text, collection, mode, k)
