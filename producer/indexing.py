"""Indexing a file through the queue: batches in flight, a progress bar, and a summary of what was stored."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from producer.client import Client, IndexReport, merge_index_result
from producer.settings import Settings
from producer.sources import Document, count_documents, read_documents


@dataclass
class FileReport(IndexReport):
    """An index report that also counts rows the file itself got wrong."""

    source_errors: list[tuple[int, str]] = field(default_factory=list)
    total: int = 0

    def summary(self) -> str:
        """Stored, rejected (with reasons), truncated."""
        rejected = sorted(self.source_errors + self.rejected)
        lines = [f"stored {self.stored} of {self.total} documents; rejected {len(rejected)}"
                 + (f"; {self.truncated} truncated to the document token limit" if self.truncated else "")]
        lines += [f"  row {row}: {reason}" for row, reason in rejected[:50]]
        if len(rejected) > 50:
            lines.append(f"  ... and {len(rejected) - 50} more")
        return "\n".join(lines)


def index_file(s: Settings, path: str | Path, collection: str, text_field: str = "text", id_field: str = "id",
               client: Client | None = None, progress: bool = True) -> FileReport:
    """Read ``path`` and index it into ``collection`` through the workers."""
    client = client or Client(s)
    report = FileReport()
    bar = _bar(count_documents(path), progress)
    try:
        batches = _batches(read_documents(path, text_field, id_field), s.job_texts, report)
        for handle in client.pipelined(batches, lambda batch: _submit(client, collection, batch)):
            raw = handle.raw()
            merge_index_result(report, {**raw, "errors": []}, 0)
            report.rejected += [(handle.rows[i], reason) for i, reason in raw["errors"]]
            bar.update(handle.size)
            bar.set_postfix(stored=report.stored, rejected=len(report.rejected) + len(report.source_errors))
    finally:
        bar.close()
    return report


def _submit(client: Client, collection: str, batch: tuple[list, list, list, list]):
    rows, texts, ids, metadata = batch
    handle = client.submit_index(collection, texts, ids, metadata, first_index=rows[0])
    handle.rows = rows  # item errors come back by position in the job; report them by row of the file
    return handle


def _batches(docs: Iterator[Document], size: int, report: FileReport) -> Iterator[tuple[list, list, list, list]]:
    # (row numbers, texts, ids, metadata); rows the file got wrong are reported and never sent.
    batch: list[tuple[int, Document]] = []
    for row, doc in enumerate(docs, 1):
        report.total += 1
        if doc.error:
            report.source_errors.append((row, f"{doc.id}: {doc.error}"))
            continue
        batch.append((row, doc))
        if len(batch) == size:
            yield _columns(batch)
            batch = []
    if batch:
        yield _columns(batch)


def _columns(batch: list[tuple[int, Document]]) -> tuple[list, list, list, list]:
    docs = [doc for _, doc in batch]
    return [row for row, _ in batch], [d.text for d in docs], [d.id for d in docs], [d.metadata for d in docs]


def _bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="indexing", disable=not enabled, dynamic_ncols=True)
