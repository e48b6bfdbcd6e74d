"""Index batches: rows checked here, sent as index jobs (a bounded number in flight), and a report of what was
stored and rejected, each rejection with its input position (:meth:`producer.client.Client.index`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from producer import pipeline
from producer.contract import checks, wire

Row = tuple[int, object, object, object]
"""(input position, text, id, metadata) of one document."""


@dataclass
class IndexReport:
    """What an index call stored and rejected."""

    stored: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0
    jobs: int = 0


def index_rows(client: Any, collection: str, rows: Iterable[Row], *, job_texts: int | None = None,
               progress: Callable[[int], None] | None = None, report: IndexReport | None = None) -> IndexReport:
    """Index rows in jobs of ``job_texts``, a bounded number in flight, through ``client`` (a
    :class:`~producer.client.Client`: :meth:`~producer.client.Client.index_rows` calls this)."""
    report = report or IndexReport()
    batches = _first_checked(client, pipeline.chunked((row for row in rows if _sendable(row, report)),
                                                      job_texts or client.settings.job_texts))
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
