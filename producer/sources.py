"""Reading documents to index: JSONL, CSV, Parquet or plain text (one document per non-empty line)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class Document:
    """One row of a source: id, text, and every other field as metadata. ``error`` marks a bad row."""

    id: str
    text: Any
    metadata: dict = field(default_factory=dict)
    error: str | None = None


def read_documents(path: str | Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents of a file, by extension: .jsonl/.json, .csv, .parquet, anything else as plain text."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        yield from _jsonl(path, text_field, id_field)
    elif suffix == ".csv":
        yield from (_row(r, i, path, text_field, id_field) for i, r in enumerate(csv.DictReader(path.open(newline="")), 2))
    elif suffix == ".parquet":
        yield from _parquet(path, text_field, id_field)
    else:
        for n, line in enumerate(path.open(encoding="utf-8", errors="surrogateescape"), 1):
            if line.strip():
                yield Document(f"{path.name}:{n}", line.rstrip("\n"))


def count_documents(path: str | Path) -> int | None:
    """How many rows a source has, cheaply, for the progress bar (None when unknown)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        lines = sum(1 for line in f if line.strip())
    return lines - 1 if path.suffix.lower() == ".csv" else lines


def _jsonl(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    for n, line in enumerate(path.open(encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield Document(f"{path.name}:{n}", None, error=f"line {n} is not JSON: {e.msg}")
            continue
        if not isinstance(row, dict):
            yield Document(f"{path.name}:{n}", None, error=f"line {n} is not a JSON object")
            continue
        yield _row(row, n, path, text_field, id_field)


def _row(row: dict, n: int, path: Path, text_field: str, id_field: str) -> Document:
    if text_field not in row:
        return Document(str(row.get(id_field, f"{path.name}:{n}")), None, error=f"line {n} has no {text_field!r} field")
    doc_id = row.get(id_field)
    metadata = {k: v for k, v in row.items() if k not in (text_field, id_field)}
    return Document(f"{path.name}:{n}" if doc_id in (None, "") else str(doc_id), row[text_field], metadata)


def _parquet(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield _row(row, n, path, text_field, id_field)
