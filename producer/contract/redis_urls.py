"""The forms of a Redis URL that m3-queue reads (the settings check them; :mod:`producer.contract.redis_conn`
connects by them). Imports nothing of the project."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SENTINEL_PORT = 26379
"""A Sentinel's port when its address names none."""


@dataclass(frozen=True)
class SentinelURL:
    """What a ``sentinel://`` URL says: the Sentinels, and the database and credentials of the primary."""

    nodes: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names Sentinels rather than one Redis."""
    return url.startswith("sentinel://")


def parse_sentinel(url: str) -> SentinelURL:
    """The parts of a ``sentinel://`` URL; ValueError saying what is wrong with it."""
    parts = [urlsplit(chunk.strip()) for chunk in url.split(";") if chunk.strip()]
    for n, part in enumerate(parts, 1):
        if part.scheme != "sentinel" or not part.hostname:
            raise ValueError(f"its address {n} is not sentinel://HOST[:PORT] (each address of the list must be)")
        part.port  # noqa: B018 - raises ValueError for a port that is not a number
    first = parts[0]
    db = _db(first.path)
    later = {_db(p.path) for p in parts[1:] if p.path.strip("/")}
    if later - {db}:
        raise ValueError(f"the database is read from the first address (as kombu and Celery read it), which "
                         f"says {db}: put /{min(later - {db})} on the first address, or the same on all")
    return SentinelURL(nodes=tuple((p.hostname, p.port or SENTINEL_PORT) for p in parts), db=db,
                       username=unquote(first.username) if first.username else None,
                       password=unquote(first.password) if first.password else None)


def _db(path: str) -> int:
    path = path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database {path!r} is not a number")
    return int(path or 0)
