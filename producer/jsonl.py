"""``m3q encode``'s line protocol: JSONL read from a stream as it arrives, in batches that never wait for more
input, and one JSON object out per input line."""
from __future__ import annotations

import json
import queue
import threading
from typing import Any, Iterator

from producer.contract.wire import ItemError
from producer.sources import json_problem


def ready_batches(items: Iterator, size: int) -> Iterator[list]:
    """Batches of up to ``size`` items, each of what has arrived by then: a batch never waits for more input
    once it has one item, so a line typed at a terminal is answered at once, and a piped file still goes
    in full batches. A daemon thread reads ahead (the reading cannot be interrupted otherwise)."""
    ahead: queue.Queue = queue.Queue(maxsize=4 * size)
    end = object()

    def pump() -> None:
        try:
            for item in items:
                ahead.put((item, None))
        except Exception as e:  # noqa: BLE001 - handed to the main thread, which raises it
            ahead.put((end, e))
        ahead.put((end, None))

    threading.Thread(target=pump, name="m3q-encode-stdin", daemon=True).start()
    batch: list = []
    while True:
        item, error = ahead.get() if not batch else _next_ready(ahead)
        if item is None and error is None:  # nothing more has arrived: send what we have
            yield batch
            batch = []
            continue
        if item is end:
            if batch:
                yield batch
            if error is not None:
                raise error
            return
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []


def _next_ready(ahead) -> tuple[Any, Exception | None]:
    try:
        return ahead.get_nowait()
    except queue.Empty:
        return None, None


def read_lines(stream) -> Iterator[tuple[Any, Any, str | None]]:
    """(id, text, error) per input line; a bad line keeps its place with an error."""
    for n, line in enumerate(stream, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield None, None, json_problem(n, e)
            continue
        if not isinstance(row, dict) or "text" not in row:
            yield (row.get("id") if isinstance(row, dict) else None), None, f"line {n} has no 'text' field"
            continue
        yield row.get("id"), row["text"], None


def item_json(doc_id: Any, error: str | None, item: Any, colbert: bool) -> dict:
    """One output line: the vectors of ``item`` (sparse weights keyed by token id), or why it has none."""
    if error or isinstance(item, ItemError):
        return {"id": doc_id, "error": error or item.reason}
    out: dict[str, Any] = {"id": doc_id, "dense": item.dense.tolist(),
                           "sparse": {str(k): v for k, v in item.sparse_dict().items()}}
    if colbert:
        out["colbert"] = item.colbert.tolist()
    return out
