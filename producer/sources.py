"""Reading documents to index: JSONL, CSV, Parquet or plain text (one document per non-empty line).

A file is checked before its first row is read: a directory, a compressed or binary file, or a CSV/Parquet
file without the text column is refused whole, with one error naming the file and the way out. After
that, a bad row (invalid UTF-8, broken JSON) is one reject naming the file and line, and the rest is read.
Lines are split on ``\\n`` only, the same way :func:`count_documents` counts them, so a progress bar's
total is the number of rows read.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from producer.contract import checks
from producer.contract.errors import SourceError

SNIFF_BYTES = 8192
"""How much of a file is looked at to tell text from binary."""
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_MAGIC = ((b"\x1f\x8b", "gzip-compressed: decompress it first (gunzip)"),
          (b"PK\x03\x04", "a zip archive: extract it first (unzip)"),
          (b"BZh", "bzip2-compressed: decompress it first (bunzip2)"),
          (b"\xfd7zXZ\x00", "xz-compressed: decompress it first (unxz)"),
          (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (unzstd)"),
          (b"PAR1", "a Parquet file: give it the .parquet suffix"))
"""Leading bytes of formats that are not text, with what to do instead."""


@dataclass
class Document:
    """One row of a source: id, text, and every other field as metadata. ``error`` marks a bad row."""

    id: str
    text: Any
    metadata: dict = field(default_factory=dict)
    error: str | None = None


def read_documents(path: str | Path, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents of a file, by extension: .jsonl/.ndjson/.json, .csv, .parquet, anything else as plain text.
    Raises SourceError (or FileNotFoundError) now, before any row is read, for a file that is not readable
    as such or a table without the text column."""
    path = check_source(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl(path, text_field, id_field)
    if suffix == ".csv":
        with _csv_stream(path) as f:
            _require_column(path, text_field, next(csv.reader(f), []))
        return _csv(path, text_field, id_field)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        _require_column(path, text_field, pq.ParquetFile(path).schema_arrow.names)
        return _parquet(path, text_field, id_field)
    return _text(path)


def check_source(path: str | Path) -> Path:
    """``path`` as a Path once it is known to be a readable file of its format; SourceError naming the
    file and the way out otherwise (FileNotFoundError when it does not exist)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise SourceError(f"{path} is a directory: give one file (JSONL, CSV, Parquet or text)")
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if path.suffix.lower() == ".parquet":
        if not head.startswith(b"PAR1"):
            raise SourceError(f"{path} is not a Parquet file (no PAR1 header)")
        return path
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise SourceError(f"{path} is {what}; m3q reads JSONL, CSV, Parquet or UTF-8 text")
    if b"\x00" in head:
        what = ("UTF-16 text: convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"
                if head.startswith((b"\xff\xfe", b"\xfe\xff")) else "binary (it has NUL bytes), not text")
        raise SourceError(f"{path} is {what}; m3q reads JSONL, CSV, Parquet or UTF-8 text")
    return path


def count_documents(path: str | Path) -> int | None:
    """How many rows :func:`read_documents` yields for ``path``, for the progress bar (None when unknown)."""
    path = check_source(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if suffix == ".csv":
        with _csv_stream(path) as f:
            return sum(1 for row in csv.reader(f) if row) - 1  # less the header; DictReader skips blank rows
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def json_problem(n: int, e: json.JSONDecodeError) -> str:
    """A whole sentence for a line that is not JSON (``e.msg`` alone ends mid-sentence, e.g. "starting at")."""
    where = "" if e.msg.endswith(" at") else " at"
    return f"line {n} is not JSON: {e.msg}{where} column {e.colno}"


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) of each non-blank line; a line that is not UTF-8 has an error instead."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark
            try:
                yield n, raw.rstrip(b"\r\n").decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield n, None, f"line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})"


def _text(path: Path) -> Iterator[Document]:
    for n, line, error in _lines(path):
        yield Document(f"{path.name}:{n}", line, error=error)


def _jsonl(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    for n, line, error in _lines(path):
        if error:
            yield Document(f"{path.name}:{n}", None, error=error)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield Document(f"{path.name}:{n}", None, error=json_problem(n, e))
            continue
        if not isinstance(row, dict):
            yield Document(f"{path.name}:{n}", None, error=f"line {n} is not a JSON object")
            continue
        yield _row(row, n, path, text_field, id_field)


def _csv_stream(path: Path) -> IO[str]:
    # surrogateescape keeps a bad byte as a lone surrogate, so one row is rejected, not the whole file.
    return io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _csv(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    with _csv_stream(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            line = reader.line_num
            if any(checks.surrogate(v) for v in [*row.values(), *row.keys()] if isinstance(v, str)):
                yield Document(f"{path.name}:{line}", None, error=f"line {line} is not valid UTF-8")
            else:
                yield _row(row, line, path, text_field, id_field)


def _require_column(path: Path, text_field: str, columns: list[str]) -> None:
    if text_field not in columns:
        raise SourceError(f"{path} has no {text_field!r} column; its columns are: "
                          f"{', '.join(map(repr, columns)) or '(none)'}. Name the text column with --text-field")


def _row(row: dict, n: int, path: Path, text_field: str, id_field: str) -> Document:
    if text_field not in row:
        return Document(str(row.get(id_field, f"{path.name}:{n}")), None, error=f"line {n} has no {text_field!r} field")
    doc_id = row.get(id_field)
    metadata = {k: v for k, v in row.items() if k not in (text_field, id_field)}
    return Document(f"{path.name}:{n}" if doc_id in (None, "") else str(doc_id), row[text_field], metadata)


def _parquet(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield _row(row, n, path, text_field, id_field)
