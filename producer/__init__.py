"""m3-queue's producer side: send texts to the BGE-M3 workers and get vectors back, or index into Milvus.

Light on purpose: it imports neither torch nor transformers.
"""
from producer.client import Client, Handle, IndexReport, JobFailed, JobTimeout, LaneHandle, NoWorker
from producer.embedding_function import RemoteBGEM3EmbeddingFunction
from producer.settings import Settings
from producer.wire import Embedding, ItemError, PayloadError

__all__ = ["Client", "Handle", "IndexReport", "JobFailed", "JobTimeout", "LaneHandle", "NoWorker", "RemoteBGEM3EmbeddingFunction",
           "Settings", "Embedding", "ItemError", "PayloadError"]
