"""The collection side of a re-index: versioned collections ``{alias}_v{N}`` behind an alias.

A job writes the next free version (reserved in Redis, so two jobs started at once never share one), and
once it is complete points the alias at it in one step. A plain collection of the alias's name can be
adopted first: renamed to a version, with the alias made on it.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import redis

from producer.contract import milvus
from producer.contract.errors import ConfigError
from producer.contract.redis_conn import redis_client
from producer.contract.settings import Settings
from producer.reindex import checkpoint
from producer.reindex.checkpoint import FINISHED_KEPT_S, UNFINISHED, Checkpoint, State


def version_name(alias: str, number: int) -> str:
    """The name of version ``number`` of ``alias``."""
    return f"{alias}_v{number}"


def next_number(mc: Any, alias: str) -> int:
    """The version number above every existing ``{alias}_v{N}``."""
    found = milvus.versions(mc, alias)
    return int(found[-1].rsplit("_v", 1)[1]) + 1 if found else 1


def reserve_target(cp: Checkpoint, mc: Any, alias: str) -> str:
    """The next free ``{alias}_v{N}``: above every existing version, and claimed in Redis (SET NX) for the
    job, so two jobs started at once never share one before a worker has created it."""
    n = next_number(mc, alias)
    while not checkpoint.claim_target(cp.redis, cp.settings, version_name(alias, n), cp.job_id):
        n += 1
    return version_name(alias, n)


def check_alias(cp: Checkpoint, mc: Any, alias: str, adopt: bool) -> None:
    """``alias`` is an alias or a free name; a collection of that name is adopted, or refused with the way out."""
    if milvus.alias_target(mc, alias) is not None or not milvus.has_collection(mc, alias):
        return
    if not adopt:
        raise ConfigError(f"{alias!r} is a collection, not an alias (nothing was encoded): add --adopt to turn it "
                          f"into {version_name(alias, next_number(mc, alias))} behind an alias {alias!r} first, "
                          f"or pick another --into")
    adopt_collection(cp.redis, cp.settings, mc, alias)


def adopt_alias(settings: Settings, name: str) -> str:
    """`m3q reindex --into NAME --adopt` alone: turn collection ``name`` into a version behind an alias
    ``name`` (see :func:`adopt_collection`); returns the collection it now points to."""
    with contextlib.closing(milvus.connect(settings)) as mc:
        current = milvus.alias_target(mc, name)
        if current is not None:
            return current  # already an alias: nothing to do
        if not milvus.has_collection(mc, name):
            raise ConfigError(f"no collection {name!r} to adopt")
        with contextlib.closing(redis_client(settings)) as r:
            return adopt_collection(r, settings, mc, name)


def adopt_collection(r: redis.Redis, s: Settings, mc: Any, name: str) -> str:
    """Turn collection ``name`` into the first version behind an alias: rename it to the next free
    ``{name}_v{N}``, then create alias ``name`` on it; returns the new collection name. Searches of
    ``name`` fail only between the two calls (milliseconds); re-indexing into ``name`` works afterwards."""
    n = next_number(mc, name)
    while not checkpoint.claim_target(r, s, version_name(name, n), f"adopted:{name}", ttl_s=FINISHED_KEPT_S):
        n += 1  # a job has reserved it meanwhile
    version = version_name(name, n)
    milvus.rename_collection(mc, name, version)
    # Milvus Lite releases a renamed collection: load it again, or searches through the alias would fail.
    milvus.load_collection(mc, version)
    milvus.point_alias(mc, name, version)
    return version


def switch(cp: Checkpoint, mc: Any, job: dict[str, Any]) -> None:
    """Point the job's alias at its finished target in one step, drop the previous collection when asked,
    and record the job switched (its keys then expire)."""
    alias, target = str(job["alias"]), str(job["target"])
    if milvus.alias_target(mc, alias) is None and milvus.has_collection(mc, alias):
        raise ConfigError(f"{alias!r} is a collection, not an alias: `m3q reindex --into {alias} --adopt` "
                          f"turns it into a version behind an alias")
    previous = milvus.point_alias(mc, alias, target)
    fields: dict[str, Any] = {"state": State.SWITCHED, "previous": previous or "", "switched_at": time.time()}
    if job.get("drop_old") and previous and previous != target and not milvus.aliases_of(mc, previous):
        milvus.drop_collection(mc, previous)
        fields["dropped"] = previous
    cp.finalize(target, fields)


def drop_unaliased(settings: Settings, alias: str) -> list[str]:
    """Drop the versioned collections ``{alias}_v{N}`` that no alias points to and no unfinished job writes
    or reads; return their names."""
    with contextlib.closing(milvus.connect(settings)) as mc, contextlib.closing(redis_client(settings)) as r:
        current = milvus.alias_target(mc, alias)
        in_use = _in_use(settings, r)
        dropped = []
        for name in milvus.versions(mc, alias):
            if name != current and name not in in_use and not milvus.aliases_of(mc, name):
                milvus.drop_collection(mc, name)
                dropped.append(name)
        return dropped


def _in_use(s: Settings, r: redis.Redis) -> set[str]:
    """The collections that an unfinished re-index job writes to or reads from."""
    jobs = [j for j in checkpoint.read_all(s, r) if j.get("state") in UNFINISHED]
    return {str(j[k]) for j in jobs for k in ("target", "source_collection") if j.get(k)}
