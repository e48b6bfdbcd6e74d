"""What a text, an id and a metadata value must be: one rule each, used by the producer and the worker alike.

A producer answers what cannot even travel (``unsendable_*``) at once; a worker checks the rest before it
encodes (``*_problem``). Each function returns why the value is refused, in words that name the setting or
limit, or None when it is fine; callers prefix the item's name (:func:`name_item`).
"""
from __future__ import annotations

import json

ID_MAX_BYTES = 2048
"""Longest id in UTF-8 bytes (Milvus' primary key): M3Q_MAX_ID_CHARS (512) characters of up to 4 bytes each
always fit."""
TEXT_MAX_BYTES = 65535
"""Longest stored text in UTF-8 bytes (Milvus' VARCHAR limit); longer texts are stored truncated."""
METADATA_MAX_BYTES = 65536
"""Largest metadata as JSON (Milvus' default JSON field limit); a bigger one rejects its row."""

_SENDABLE = (str, bytes, int, float, bool, type(None), list, dict)


def name_item(index: int, item_id: object = None) -> str:
    """How an error names an item: its position, and its id when it has one."""
    return f"item {index}" if item_id is None else f"item {index} (id {item_id!r})"


def text_problem(value: object, max_chars: int) -> str | None:
    """Why ``value`` cannot be encoded, or None when it can."""
    if not isinstance(value, str):
        return f"text must be a string, got {type(value).__name__}"
    if not value.strip():
        return "text is empty or whitespace only"
    if len(value) > max_chars:
        return f"text is {len(value):,} characters, over the limit of {max_chars:,} (M3Q_MAX_TEXT_CHARS)"
    nul = value.find("\x00")
    if nul >= 0:
        return f"text contains a NUL character at offset {nul}"
    return surrogate(value)


def unsendable_text(value: object) -> str | None:
    """Why ``value`` cannot even travel on the wire (so the producer answers it), or None."""
    if not isinstance(value, _SENDABLE):
        return f"text must be a string, got {type(value).__name__}"
    return surrogate(value) if isinstance(value, str) else None


def id_problem(value: object, max_chars: int) -> str | None:
    """Why ``value`` cannot be a document's id (a non-empty string or integer, not too long), or None."""
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        return f"id must be a non-empty string or integer, got {type(value).__name__}"
    if len(str(value)) > max_chars:
        return f"id is {len(str(value))} characters, over the limit of {max_chars} (M3Q_MAX_ID_CHARS)"
    return surrogate(str(value), "id")


def metadata_problem(value: object) -> str | None:
    """Why ``value`` cannot be a document's metadata (absent, or a JSON object of at most 64 KiB), or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"metadata must be a JSON object, got {type(value).__name__}"
    try:
        size = len(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError) as e:  # a value JSON has no form for, NaN, a lone surrogate
        return f"metadata is not JSON: {e}"
    if size > METADATA_MAX_BYTES:
        return f"metadata is {size} bytes as JSON, over {METADATA_MAX_BYTES} (Milvus' JSON field limit)"
    return None


unsendable_metadata = metadata_problem
"""A metadata value that would be refused anyway does not travel: the producer answers it at once."""


def repeat_of(first: dict[str, int], item_id: object, position: int) -> int | None:
    """Record ``item_id`` as seen at ``position`` in ``first``; the earlier position if it was seen before.

    Ids compare as strings (``7`` and ``"7"`` are one document): a repeat in one call is refused, since its
    rows may land in different jobs, upserted in no fixed order.
    """
    earlier = first.setdefault(str(item_id), position)
    return None if earlier == position else earlier


def surrogate(value: str, what: str = "text") -> str | None:
    """Why ``value`` cannot be encoded as UTF-8 (a lone surrogate, which JSON can carry), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{what} contains a lone surrogate at offset {e.start}"
    return None
