"""What a worker writes to Redis about its jobs, for `m3q status` and the delivery bound.

The keys are the contract's (:mod:`producer.contract.wire`); only workers write them.
"""
from __future__ import annotations

import json
import time

import redis

from producer.contract import wire
from producer.contract.settings import Settings


def record_failure(s: Settings, r: redis.Redis, task: str, job_id: str, reason: str) -> None:
    """Remember a job that failed for good (newest first, the last 1,000 kept), for `m3q status`."""
    entry = json.dumps({"task": task, "id": job_id, "reason": reason[:2000], "time": time.time()})
    r.pipeline(transaction=False).lpush(wire.failures_key(s), entry).ltrim(wire.failures_key(s), 0, 999).execute()


def count_delivery(s: Settings, r: redis.Redis, job_id: str) -> int:
    """Count one more delivery of a job and return the count so far (kept as long as its result)."""
    key = wire.deliveries_key(s, job_id)
    counted, _ = r.pipeline(transaction=False).incr(key).expire(key, s.result_expires_s).execute()
    return int(counted)
