"""The query stream's wire contract: queries on a Redis stream, replies on one list per client process.

Both sides import this module (it needs neither torch nor Celery). The flow:

- A producer ``XADD``s one entry per query job to :func:`stream_key` (fields below; the payload is msgpack,
  exactly an ``m3q.encode_queries`` payload), or to a device's own stream when the caller routes it there.
  The tokenizer's tasks and ``m3q.info`` travel the same way (:data:`F_TASK`). ``MAXLEN ~``
  :data:`settings.query_stream_max` caps a stream when no worker reads it.
- Workers read the streams in one consumer group (:data:`GROUP`), each under its heartbeat hostname, many
  entries per ``XREADGROUP``; the device loop batches them across jobs.
- A worker answers a job by ``RPUSH``ing :func:`encode_reply` to the entry's reply list (one per client
  process, :func:`reply_key`), refreshing that list's TTL (:data:`REPLY_TTL_S`), then ``XACK`` + ``XDEL``
  the entry: all replies of a step go out in one write, replies before acknowledgements (at least once).
- Entries still pending on a consumer whose heartbeat has expired are claimed (``XCLAIM``) by a live worker
  and answered; the times-delivered count of the pending list bounds poison queries.
"""
from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack

from producer.contract.settings import Settings

TASK_DEFAULT = "m3q.encode_queries"
"""The task of an entry without a ``task`` field (the same name as ``wire.TASK_ENCODE_QUERIES``)."""

GROUP = "m3q-workers"
"""The consumer group of every worker on a stream."""

REPLY_TTL_S = 600
"""A reply list outlives its last reply by this much, so a client process that went away leaves nothing."""

F_ID, F_REPLY, F_BODY, F_SENT, F_TASK = b"id", b"reply", b"body", b"sent", b"task"
"""The fields of a stream entry: job id, reply list, msgpack payload, the producer's send time (Unix s), and
the task (``m3q.encode_queries`` when absent; ``m3q.info``, ``m3q.tokenize`` and ``m3q.decode`` are answered
at once, without the device)."""


def stream_key(s: Settings, device: str | None = None) -> str:
    """The stream of query jobs that every worker reads, or (``device``) the one that only the workers of
    that device read (``m3q worker --device``): a worker reads both in one ``XREADGROUP``."""
    return f"{s.queue_prefix}:lane:queries" + (f":device:{device}" if device else "")


def reply_key(s: Settings, client_id: str) -> str:
    """The reply list of one client process."""
    return f"{s.queue_prefix}:lane:reply:{client_id}"


def new_client_id() -> str:
    """A fresh id for a client process's reply list."""
    return uuid.uuid4().hex


def new_job_id() -> str:
    """A job id unique across processes and hosts: this process's random prefix, then a count. No system
    call per job (``uuid4`` reads the OS's random source each time, and a thread that does gives up the GIL)."""
    return f"{_job_ids.prefix}-{next(_job_ids.count):x}"


class _JobIds:
    def __init__(self) -> None:
        self.prefix, self.count = uuid.uuid4().hex[:16], itertools.count()


_job_ids = _JobIds()
os.register_at_fork(after_in_child=_job_ids.__init__)  # a forked child must not repeat its parent's ids


def request_fields(job_id: str, reply_to: str, payload: dict[str, Any], body: bytes | None = None,
                   task: str = TASK_DEFAULT) -> dict[bytes, bytes]:
    """The fields of the stream entry for one job (``body``: ``payload`` already packed, if it is)."""
    fields = {F_ID: job_id.encode(), F_REPLY: reply_to.encode(), F_BODY: body or msgpack.packb(payload),
              F_SENT: repr(time.time()).encode()}
    if task != TASK_DEFAULT:
        fields[F_TASK] = task.encode()
    return fields


@dataclass
class Request:
    """A stream entry as a worker reads it. ``payload`` is None when the body is not msgpack (``error`` says)."""

    entry_id: bytes
    job_id: str
    reply_to: str
    payload: Any
    sent: float | None
    error: str | None = None
    task: str = TASK_DEFAULT
    stream: str = ""
    """The stream it was read from (set by the reader)."""


def read_request(entry_id: bytes, fields: dict[bytes, bytes]) -> Request:
    """Decode one entry; a malformed one comes back with ``error`` set (still answered when it has a reply list)."""
    job_id = fields.get(F_ID, b"?").decode(errors="replace")
    reply_to = fields.get(F_REPLY, b"").decode(errors="replace")
    task = fields.get(F_TASK, TASK_DEFAULT.encode()).decode(errors="replace")
    try:
        sent = float(fields[F_SENT]) if F_SENT in fields else None
    except ValueError:
        sent = None
    try:
        payload = msgpack.unpackb(fields[F_BODY], raw=False, strict_map_key=False)
    except KeyError:
        return Request(entry_id, job_id, reply_to, None, sent, "the entry has no 'body' field", task)
    except Exception as e:  # noqa: BLE001 - pickle, JSON or garbage: refused, never decoded further
        return Request(entry_id, job_id, reply_to, None, sent, f"the body is not msgpack ({type(e).__name__})", task)
    return Request(entry_id, job_id, reply_to, payload, sent, task=task)


def read_entries(response: Any) -> list[tuple[str, bytes, dict[bytes, bytes] | None]]:
    """(stream, entry id, fields) of each entry in an ``XREADGROUP`` answer as the connection parsed it: a list
    of [stream, entries] (RESP2), a map (RESP3) or nothing. Fields are None for an entry deleted while it was
    pending."""
    streams = response.items() if isinstance(response, dict) else response or []
    return [(text(key), entry_id, _fields(fields)) for key, entries in streams for entry_id, fields in entries]


def _fields(fields: list | dict | None) -> dict | None:
    if fields is None or isinstance(fields, dict):
        return fields
    pairs = iter(fields)  # [name, value, name, value, ...]
    return dict(zip(pairs, pairs))


def text(value: bytes | str) -> str:
    """A stream key, consumer name or field as text, whichever the connection returned."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def encode_reply(job_id: str, result: dict[str, Any] | None = None, error: str | None = None) -> bytes:
    """A worker's answer to one job: its result (as an ``m3q.encode_queries`` task returns it), or why it failed."""
    return msgpack.packb({"id": job_id, "result": result} if error is None else {"id": job_id, "error": error})


def decode_reply(raw: bytes) -> tuple[str, dict[str, Any] | None, str | None]:
    """(job id, result, error) of a reply."""
    reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    return str(reply.get("id")), reply.get("result"), reply.get("error")
