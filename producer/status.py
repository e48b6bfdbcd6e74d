"""What `m3q status` shows: live workers (from their Redis heartbeats), queue depths, failed jobs."""
from __future__ import annotations

import json
import time
from typing import Any

import redis

from producer.contract import wire
from producer.contract.redis_conn import redis_client
from producer.contract.settings import Settings


def clear_failures(s: Settings) -> int:
    """Forget the failed jobs that `m3q status` lists (`m3q status --clear-failures`); returns how many."""
    r = redis_client(s)
    count = r.llen(wire.failures_key(s))
    r.delete(wire.failures_key(s))
    return count


def collect(s: Settings) -> dict[str, Any]:
    """Workers, queue depths and recent failures."""
    r = redis_client(s)
    workers = wire.live_workers(s, r)
    for w in workers:  # a worker silent for two heartbeats is probably dead: its jobs go back when it expires
        w["silent_s"] = max(0.0, time.time() - float(w.get("time", time.time())))
        w["silent"] = w["silent_s"] > 2 * wire.heartbeat_s(s)
    queues = {q: r.llen(q) for q in _queues(s, r)}
    failures = [json.loads(v) for v in r.lrange(wire.failures_key(s), 0, 19)]
    stream = stream_status(s, r, workers)
    return {"workers": sorted(workers, key=lambda w: w["hostname"]), "queues": queues, "failures": failures,
            "held_by_dead": held_by_dead(s, workers), "dead_worker_s": s.dead_worker_s, "query_stream": stream,
            "reindex": _reindex_jobs(s)}


def held_by_dead(s: Settings, workers: list[dict[str, Any]]) -> int:
    """Jobs taken over two heartbeats ago that no live worker holds: their worker died before its heartbeat
    listed them, and a running worker's sweep puts them back. Read from the heartbeats (``unheld``: what each
    worker's last sweep found held by none), so `m3q status` needs a live worker to count them."""
    listed = {tag for w in workers for tag in w.get("held", ())}
    before = time.time() - 2 * wire.heartbeat_s(s)
    return len({tag for w in workers for tag, taken in (w.get("unheld") or {}).items()
                if taken < before and tag not in listed})


def stream_status(s: Settings, r: redis.Redis, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The query stream: entries in it (waiting or taken), taken and not yet answered, replies per second."""
    from producer.contract import stream

    key = stream.stream_key(s)
    try:
        pending = int(r.xpending(key, stream.GROUP)["pending"]) if r.exists(key) else 0
    except redis.ResponseError:  # no consumer group yet: no worker has read the stream
        pending = 0
    devices = sorted(k.decode() for k in r.scan_iter(match=stream.stream_key(s, "*"), count=1000))
    return {"stream": key, "depth": int(r.xlen(key)), "pending": pending,
            "devices": {k: int(r.xlen(k)) for k in devices},
            "replies_per_s": sum(float((w.get("query_stream") or {}).get("replies_per_s", 0)) for w in workers)}


def _reindex_jobs(s: Settings) -> list[dict[str, Any]]:
    """Re-index jobs (done/total, rate, eta_s, state), oldest first."""
    from producer.reindex import list_jobs  # here: the re-index package loads the client and pymilvus

    return list_jobs(s)


def _render_reindex(jobs: list[dict[str, Any]]) -> list[str]:
    if not jobs:
        return []
    lines = ["RE-INDEX JOBS"]
    for j in jobs:
        eta = f" eta={j['eta_s']:.0f}s" if j.get("eta_s") else ""
        state = "interrupted" if j.get("interrupted") else j.get("state")
        lines.append(f"  {j['id']}  {state}  {j.get('source')} -> {j.get('target', '?')} "
                     f"(alias {j.get('alias')})  {j.get('done', 0)}/{j.get('total', '?')} "
                     f"rate={float(j.get('rate') or 0):.1f} docs/s{eta} rejected={j.get('rejected', 0)}")
        if j.get("error"):
            lines.append(f"    error: {j['error']}")
        if j.get("interrupted") or j.get("state") == "failed":
            lines.append(f"    no driver: `m3q reindex --resume {j['id']}` goes on")
    return lines


def _queues(s: Settings, r: redis.Redis) -> list[str]:
    names = {wire.query_queue(s), wire.document_queue(s)}
    names.update(k.decode() for k in r.keys(f"{s.queue_prefix}.device.*"))
    return sorted(names)


def render(status: dict[str, Any]) -> str:
    """A human table of :func:`collect`'s output."""
    lines = ["WORKERS"]
    if not status["workers"]:
        lines.append("  (none alive: start one with `m3q worker --device cpu`)")
    for w in status["workers"]:
        lines.append(f"  {w['hostname']}  device={w['device']} model={w['model']} dtype={w['dtype']}"
                     f"{' REPLICA' if w.get('replica') else ''}  jobs={w['jobs']} texts={w['texts']}"
                     f"  rate={w['texts_per_s']:.1f} texts/s {w['tokens_per_s']:.0f} tokens/s"
                     f"  held={len(w.get('held', ()))}")
        if w.get("silent"):
            lines.append(f"    silent for {w['silent_s']:.0f}s: dead? its jobs go back to their queues within "
                         f"{status.get('dead_worker_s', 30):.0f}s of its death (M3Q_DEAD_WORKER_S)")
    lines.append("QUEUES")
    lines += [f"  {name}: {depth} waiting" for name, depth in status["queues"].items()]
    if status.get("query_stream"):
        ln = status["query_stream"]
        lines.append(f"  {ln['stream']} (query stream): {ln['depth'] - ln['pending']} waiting, {ln['pending']} taken "
                     f"and not yet answered, {ln['replies_per_s']:.1f} replies/s")
        lines += [f"  {key} (a device's query stream): {depth} in it" for key, depth in ln.get("devices", {}).items()]
    if status.get("held_by_dead"):
        lines.append(f"  {status['held_by_dead']} job(s) held by a dead worker, going back to their queues")
    if status["failures"]:
        lines.append("FAILED JOBS (newest first; `m3q status --clear-failures` forgets them)")
        lines += [f"  {f['task']} {f['id']}: {f['reason']}" for f in status["failures"]]
    lines += _render_reindex(status.get("reindex", []))
    for extra in status.get("sections", []):
        lines += extra
    return "\n".join(lines)
