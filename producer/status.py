"""What `m3q status` shows: live workers (from their Redis heartbeats), queue depths, failed jobs."""
from __future__ import annotations

import json
import time
from typing import Any

import redis

from producer import wire
from producer.settings import Settings


def redis_client(s: Settings) -> redis.Redis:
    """A Redis client on the broker, with TLS certificate checks for rediss://."""
    kwargs: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5, "health_check_interval": 30}
    if s.broker_url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = "required"
        if s.redis_tls_ca_file:
            kwargs["ssl_ca_certs"] = s.redis_tls_ca_file
    return redis.Redis.from_url(s.broker_url, **kwargs)


def failures_key(s: Settings) -> str:
    """Redis list of failed jobs (newest first)."""
    return f"{s.queue_prefix}:failures"


def record_failure(s: Settings, task: str, job_id: str, reason: str, client: redis.Redis | None = None) -> None:
    """Remember a job that failed for good, for `m3q status`."""
    r = client or redis_client(s)
    entry = json.dumps({"task": task, "id": job_id, "reason": reason[:2000], "time": time.time()})
    r.lpush(failures_key(s), entry)
    r.ltrim(failures_key(s), 0, 999)


def collect(s: Settings) -> dict[str, Any]:
    """Workers, queue depths and recent failures."""
    r = redis_client(s)
    keys = r.keys(f"{s.queue_prefix}:worker:*")
    workers = [json.loads(v) for v in (r.mget(keys) if keys else []) if v]
    queues = {q: r.llen(q) for q in _queues(s, r)}
    failures = [json.loads(v) for v in r.lrange(failures_key(s), 0, 19)]
    return {"workers": sorted(workers, key=lambda w: w["hostname"]), "queues": queues, "failures": failures,
            "reindex": _reindex_jobs(s)}


def _reindex_jobs(s: Settings) -> list[dict[str, Any]]:
    """Re-index jobs (done/total, rate, eta_s, state), oldest first."""
    from producer.reindex import list_jobs  # imported here: reindex imports this module

    return list_jobs(s)


def _render_reindex(jobs: list[dict[str, Any]]) -> list[str]:
    if not jobs:
        return []
    lines = ["RE-INDEX JOBS"]
    for j in jobs:
        eta = f" eta={j['eta_s']:.0f}s" if j.get("eta_s") else ""
        lines.append(f"  {j['id']}  {j.get('state')}  {j.get('source')} -> {j.get('target', '?')} "
                     f"(alias {j.get('alias')})  {j.get('done', 0)}/{j.get('total', '?')} "
                     f"rate={float(j.get('rate') or 0):.1f} docs/s{eta} rejected={j.get('rejected', 0)}")
        if j.get("error"):
            lines.append(f"    error: {j['error']}")
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
                     f"  rate={w['texts_per_s']:.1f} texts/s {w['tokens_per_s']:.0f} tokens/s")
    lines.append("QUEUES")
    lines += [f"  {name}: {depth} waiting" for name, depth in status["queues"].items()]
    if status["failures"]:
        lines.append("FAILED JOBS (newest first)")
        lines += [f"  {f['task']} {f['id']}: {f['reason']}" for f in status["failures"]]
    lines += _render_reindex(status.get("reindex", []))
    for extra in status.get("sections", []):
        lines += extra
    return "\n".join(lines)
