"""Indexing a file through the queue: batches in flight, a progress bar, and a summary of what was stored."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from producer.client import Client
from producer.contract import checks, milvus
from producer.contract.errors import IndexInterrupted
from producer.contract.settings import Settings
from producer.index_batches import IndexReport
from producer.sources import Document, count_documents, read_documents


@dataclass
class FileReport(IndexReport):
    """An index report that also counts rows the file itself got wrong."""

    source_errors: list[tuple[int, str]] = field(default_factory=list)
    total: int = 0

    def summary(self) -> str:
        """Stored, rejected (with reasons), skipped as stored unchanged, truncated; then the notes."""
        rejected = sorted(self.source_errors + self.rejected)
        lines = [f"stored {self.stored} of {self.total} documents; rejected {len(rejected)}"
                 + (f"; {self.skipped} skipped (unchanged)" if self.skipped else "")
                 + (f"; {self.truncated} truncated to the document token limit" if self.truncated else "")]
        lines += [f"  row {row}: {reason}" for row, reason in rejected[:50]]
        if len(rejected) > 50:
            lines.append(f"  ... and {len(rejected) - 50} more")
        return "\n".join(lines + self.notes)


def index_file(s: Settings, path: str | Path, collection: str, text_field: str = "text", id_field: str = "id",
               client: Client | None = None, progress: bool = True, force: bool = False) -> FileReport:
    """Read ``path`` and index it into ``collection`` through the workers; documents the collection holds
    unchanged (same id, text and metadata) are skipped, unless ``force``.

    Milvus is checked first: unreachable, it fails in about a second naming M3Q_MILVUS_URI and `m3q milvus`,
    before anything is encoded (the workers would retry each batch for a minute, M3Q_INDEX_RETRIES).
    """
    milvus.check_reachable(s)
    client = client or Client(s)
    report = FileReport()
    docs = read_documents(path, text_field, id_field)  # a file it cannot read fails here, before the bar
    bar = _bar(count_documents(path), progress)
    try:
        rows = _rows(docs, report, bar)
        client.index_rows(collection, rows, progress=lambda n: _advance(bar, n, report), report=report, force=force)
    except KeyboardInterrupt:
        raise IndexInterrupted(report, bar.total) from None
    finally:
        bar.close()
    return report


def _rows(docs: Iterator[Document], report: FileReport, bar) -> Iterator[tuple[int, object, object, object]]:
    # (row number, text, id, metadata); rows the file itself got wrong are reported and never sent (the bar
    # counts them at once, so it ends at the file's row count).
    # A repeated id is one of those: its rows may land in different jobs, upserted in no fixed order.
    first_row: dict[str, int] = {}
    for row, doc in enumerate(docs, 1):
        report.total += 1
        if doc.error:
            report.source_errors.append((row, f"{doc.id}: {doc.error}"))
        elif (earlier := checks.repeat_of(first_row, doc.id, row)) is not None:
            report.source_errors.append((row, f"id {doc.id!r}: duplicate id, first at row {earlier}"))
        else:
            yield row, doc.text, doc.id, doc.metadata
            continue
        bar.update(1)


def _advance(bar, n: int, report: FileReport) -> None:
    bar.update(n)
    bar.set_postfix_str(f"{report.stored} stored, {report.skipped} skipped (unchanged), "
                        f"{len(report.rejected) + len(report.source_errors)} rejected")


def _bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="indexing", disable=not enabled, dynamic_ncols=True)
