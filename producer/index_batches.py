"""Index batches: rows checked here, sent as index jobs (a bounded number in flight), and a report of what was
stored, skipped and rejected, each rejection with its input position (:meth:`producer.client.Client.index`).

A row whose id the collection already holds with the same content hash (text and metadata,
:func:`producer.contract.milvus.content_hash`) is skipped: it is never encoded again. Its ids are looked up
LOOKUP_ROWS at a time, before its jobs are sent; ``force`` sends every row."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from producer import pipeline
from producer.contract import checks, wire
from producer.contract.settings import Settings

Row = tuple[int, object, object, object]
"""(input position, text, id, metadata) of one document."""
LOOKUP_ROWS = 1000
"""Ids looked up in Milvus in one query to find the documents stored unchanged."""


@dataclass
class IndexReport:
    """What an index call stored, skipped (stored unchanged already) and rejected, and any notes on how it ran
    (one line each, e.g. why nothing could be skipped)."""

    stored: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0
    jobs: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)


def index_rows(client: Any, collection: str, rows: Iterable[Row], *, job_texts: int | None = None,
               progress: Callable[[int], None] | None = None, report: IndexReport | None = None,
               force: bool = False) -> IndexReport:
    """Index rows in jobs of ``job_texts``, a bounded number in flight, through ``client`` (a
    :class:`~producer.client.Client`: :meth:`~producer.client.Client.index_rows` calls this). Rows stored
    unchanged are skipped (``progress`` counts them too), unless ``force``."""
    report = report or IndexReport()
    sendable = (row for row in rows if _sendable(row, report))
    if not force:
        sendable = skip_unchanged(client.settings, collection, sendable, report, progress)
    batches = _first_checked(client, pipeline.chunked(sendable, job_texts or client.settings.job_texts))
    for batch, handle in pipeline.window(batches, lambda batch: _submit(client, collection, batch),
                                         client.settings.max_in_flight):
        raw = handle.raw()
        report.stored += raw["stored"]
        report.truncated += raw.get("truncated", 0)
        report.jobs += 1
        # The worker names items by place in the job; they are reported by input position.
        report.rejected += [(batch[i][0], reason) for i, reason in raw["errors"]]
        if progress:
            progress(len(batch))
    return report


def skip_unchanged(s: Settings, collection: str, rows: Iterable[Row], report: IndexReport,
                   progress: Callable[[int], None] | None = None) -> Iterator[Row]:
    """The rows that ``collection`` does not hold unchanged; the others are counted in ``report.skipped`` and
    ``progress``. Where nothing can be looked up (no such collection, or one without content hashes, or a
    Milvus Lite file only the worker opens), every row, with a line in ``report.notes`` saying why."""
    from producer.contract import milvus  # pymilvus: loaded by indexing, never by `import producer`

    mc = _hash_reader(s, collection, report)
    if mc is None:
        yield from rows
        return
    try:
        for chunk in pipeline.chunked(rows, LOOKUP_ROWS):
            stored = milvus.stored_hashes(mc, collection, [str(row[2]) for row in chunk])
            fresh = [row for row in chunk if not _unchanged(row, stored, milvus.content_hash)]
            report.skipped += len(chunk) - len(fresh)
            if progress and len(fresh) < len(chunk):
                progress(len(chunk) - len(fresh))
            yield from fresh
    finally:
        mc.close()


def _hash_reader(s: Settings, collection: str, report: IndexReport) -> Any:
    """A Milvus client to read ``collection``'s content hashes with, or None (and why, in the notes)."""
    from producer.contract import milvus

    if "://" not in milvus.milvus_uri(s):
        report.notes.append("note: unchanged documents are not skipped, all are encoded: M3Q_MILVUS_URI is a "
                            "Milvus Lite file, which only the worker opens (serve it with `m3q milvus` to skip them)")
        return None
    mc = milvus.connect(s)
    if not milvus.has_collection(mc, collection):
        mc.close()
        return None  # a new collection: nothing is stored yet
    if milvus.HASH_FIELD in milvus.collection_fields(mc, collection):
        return mc
    mc.close()
    report.notes.append(f"note: collection {collection!r} has no {milvus.HASH_FIELD} field, so unchanged documents "
                        "cannot be skipped and all are encoded; `m3q reindex` it into a new collection to get the "
                        "field, or pass --force (force=True) to encode all without this note")
    return None


def _unchanged(row: Row, stored: dict[str, str | None], content_hash: Callable[[object, object], str | None]) -> bool:
    digest = content_hash(row[1], row[3])
    return digest is not None and stored.get(str(row[2])) == digest


def _submit(client: Any, collection: str, batch: list[Row]):
    positions, texts, ids, metadata = (list(column) for column in zip(*batch))
    return client.submit_index(collection, texts, ids, metadata, first_index=positions[0])


def _first_checked(client: Any, batches: Iterator[list[Row]]) -> Iterator[list[Row]]:
    # A live worker is looked for once the first batch is read: an input with nothing to send needs none.
    for n, batch in enumerate(batches):
        if n == 0:
            client.liveness.ensure(wire.document_queue(client.settings), None)
        yield batch


def _sendable(row: Row, report: IndexReport) -> bool:
    reason = checks.unsendable_text(row[1]) or checks.unsendable_metadata(row[3])
    if reason:
        report.rejected.append((row[0], f"{checks.name_item(row[0], row[2])}: {reason}"))
    return reason is None


def first_of_each_id(rows: Iterable[Row], report: IndexReport) -> Iterator[Row]:
    """The rows whose id comes first in this call; a repeat is rejected here, since its jobs may run in any order."""
    first: dict[str, int] = {}
    for row in rows:
        earlier = checks.repeat_of(first, row[2], row[0]) if isinstance(row[2], (str, int)) else None
        if earlier is not None:
            report.rejected.append((row[0], f"{checks.name_item(row[0], row[2])}: duplicate id {str(row[2])!r}, "
                                            f"first at item {earlier}"))
            continue
        yield row
