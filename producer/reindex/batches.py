"""The source of a re-index, read in a deterministic order and cut into fixed batches.

A source is a file (file order) or ``milvus:COLLECTION`` (primary-key order). Batch k is always rows
[k*B, (k+1)*B) of it, B being the job's ``batch_texts`` (``M3Q_JOB_TEXTS`` when it started), so a resume
finds every batch where the first run left it. Rows that cannot be sent are rejected here, with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from producer.contract import checks, milvus
from producer.contract.errors import ConfigError
from producer.sources import count_documents, read_documents

MILVUS_PREFIX = "milvus:"
"""A source of this form re-encodes what an existing collection stores (id, text, metadata)."""
READ_BATCH_ROWS = 1000
"""Rows fetched per page when reading a Milvus source."""

Row = tuple[int, Any, Any, Any]
"""(position, text, id, metadata); positions start at 1."""


@dataclass
class Batch:
    """One fixed batch of the source: the rows to send, and those refused before sending."""

    number: int
    rows: list[Row]
    rejects: list[tuple[int, str]]
    size: int
    """Every row of the batch, sent or not."""

    @property
    def positions(self) -> list[int]:
        """The source positions of the rows to send, in order."""
        return [row[0] for row in self.rows]

    def payload(self, collection: str) -> dict[str, Any]:
        """The index job that encodes the rows and stores them into ``collection``."""
        _, texts, ids, metadata = (list(column) for column in zip(*self.rows))
        return {"collection": collection, "texts": texts, "ids": ids, "metadata": metadata, "batch": self.number}


def open_source(mc: Any, source: str, text_field: str, id_field: str) -> tuple[str | None, int | None]:
    """(the collection behind ``milvus:NAME`` or None for a file, its row count when known); a source that
    cannot be read fails now, before anything is encoded."""
    collection = source_collection(mc, source)
    if collection:
        return collection, milvus.count(mc, collection)
    read_documents(_path(source), text_field, id_field)  # a file it cannot read fails now (SourceError)
    return None, count_documents(_path(source))


def source_collection(mc: Any, source: str) -> str | None:
    """For ``milvus:NAME``: the collection itself (an alias is resolved now, so a resume reads the same one)."""
    if not source.startswith(MILVUS_PREFIX):
        return None
    name = source[len(MILVUS_PREFIX):]
    resolved = milvus.alias_target(mc, name) or name
    if not milvus.has_collection(mc, resolved):
        raise ConfigError(f"source collection {name!r} does not exist")
    return resolved


def pending(mc: Any, job: dict[str, Any], done: set[int]) -> Iterator[Batch]:
    """The job's fixed batches that are not in ``done``, in order."""
    size = int(job["batch_texts"])
    chunk: list = []
    number = 0
    for row in _source_rows(mc, job):
        chunk.append(row)
        if len(chunk) == size:
            if number not in done:
                yield _make_batch(number, chunk)
            chunk, number = [], number + 1
    if chunk and number not in done:
        yield _make_batch(number, chunk)


def _make_batch(number: int, chunk: list) -> Batch:
    rows, rejects = [], []
    for position, text, doc_id, metadata, error in chunk:
        reason = error or checks.unsendable_text(text) or checks.unsendable_metadata(metadata)
        if reason:
            rejects.append((position, f"{checks.name_item(position, doc_id)}: {reason}"))
        else:
            rows.append((position, text, doc_id, metadata))
    return Batch(number, rows, rejects, len(chunk))


def _source_rows(mc: Any, job: dict[str, Any]) -> Iterator[tuple[int, Any, Any, Any, str | None]]:
    """(position, text, id, metadata, error) in the source's natural order."""
    if job.get("source_collection"):
        yield from _collection_rows(mc, str(job["source_collection"]))
        return
    docs = read_documents(_path(str(job["source"])), str(job["text_field"]), str(job["id_field"]))
    for position, doc in enumerate(docs, 1):
        yield position, doc.text, doc.id, doc.metadata, doc.error


def _collection_rows(mc: Any, name: str) -> Iterator[tuple[int, Any, Any, Any, None]]:
    # Rows come in primary-key order, so every batch is the same on each run.
    rows = milvus.iter_rows(mc, name, ("id", "text", "metadata"), READ_BATCH_ROWS)
    for position, row in enumerate(rows, 1):
        yield position, row["text"], row["id"], row.get("metadata") or {}, None


def _path(source: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file (a collection is written milvus:NAME)")
    return path
