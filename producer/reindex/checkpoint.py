"""A re-index job's checkpoint in Redis: its state, its keys, and the atomic steps that change them.

Under ``{M3Q_QUEUE_PREFIX}:reindex:{job_id}`` (``job_key``):

- the job hash: source, alias, target, state (a :class:`State`), total, done, stored, rejected,
  truncated, started, updated, rate, error (naming the failed batch), unconfirmed_resends, the options;
- ``:batches``: the batch numbers whose result is recorded (a batch is counted once, atomically);
- ``:tasks`` / ``:sent``: the Celery task id chosen for a batch *before* it is sent, and the batches whose
  send returned; on resume a sent batch is awaited by its task id, never sent again;
- ``:rejects``: the first REJECTS_KEPT rejected rows with their reasons (the count is always exact);
- ``:driver``: the driver lock (:mod:`producer.reindex.lock`).

Beside them: ``{prefix}:reindex-jobs``, the set of job ids, and ``{prefix}:reindex-target:{collection}``,
a versioned collection's reservation by the job that will write it (its value: that job's id).

A :class:`Checkpoint` holds one Redis client for the whole job: the driver, its lock's heartbeat and its
reads all share it.
"""
from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Any

import redis

from producer.contract.errors import ConfigError
from producer.contract.redis_conn import redis_client
from producer.contract.settings import Settings


class State(str, Enum):
    """Where a job stands; stored in the job hash as its value, which it equals."""

    STARTING = "starting"
    """``start_in_background`` recorded it; its thread has not yet read the source and made the job."""
    RUNNING = "running"
    FAILED = "failed"
    """A batch or the driver failed; resumable."""
    DONE = "done"
    """Every batch recorded, the alias not switched (rows were rejected, or nothing was stored)."""
    SWITCHED = "switched"

    def __str__(self) -> str:
        return self.value  # in messages and f-strings, on every Python version


DRIVABLE = (State.RUNNING, State.FAILED)
"""The states a driver sends batches in."""
UNFINISHED = (State.STARTING, State.RUNNING, State.FAILED, State.DONE)
"""The states of a job that may still write to its target (a done job switches once rejects are allowed)."""
REJECTS_KEPT = 1000
"""Rejected rows kept with their reasons in Redis (the count is always exact)."""
FINISHED_KEPT_S = 7 * 24 * 3600
"""How long a done or switched job keeps its Redis keys (failed jobs keep theirs: they can be resumed)."""
JOB_KEY_SUFFIXES = (":batches", ":tasks", ":sent", ":rejects")
"""The keys that go with the job hash, named by their suffix; they expire with it."""

_COMPLETE = """
redis.call('HSET', KEYS[1], 'rate', ARGV[6])
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'stored', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'rejected', #ARGV - 6)
redis.call('HINCRBY', KEYS[1], 'truncated', ARGV[4])
redis.call('HSET', KEYS[1], 'updated', ARGV[5])
redis.call('SREM', KEYS[4], ARGV[1])
for i = 7, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
redis.call('LTRIM', KEYS[3], 0, %d - 1)
return 1
""" % REJECTS_KEPT
"""Record one batch's result exactly once (SADD guards the counters), atomically."""

_FAIL_UNLESS_DRIVEN = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', '%s', 'error', ARGV[2], 'updated', ARGV[3])
return 1
""" % State.FAILED.value
"""Mark the job failed unless another driver holds its lock now (the checkpoint is then that driver's)."""

_FINALIZE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
for i = 1, #KEYS - 1 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
if redis.call('GET', KEYS[#KEYS]) == ARGV[2] then redis.call('EXPIRE', KEYS[#KEYS], ARGV[1]) end
return 1
"""
"""Write a final state and, in the same step, give the job's keys a TTL; the last key is the target's
reservation, which expires only when it is this job's."""


def job_key(s: Settings, job_id: str) -> str:
    """The job's checkpoint hash; its sets and lists share this prefix."""
    return f"{s.queue_prefix}:reindex:{job_id}"


def jobs_key(s: Settings) -> str:
    """The set of every job id of this queue prefix."""
    return f"{s.queue_prefix}:reindex-jobs"


def target_key(s: Settings, target: str) -> str:
    """The reservation of a versioned collection by the job that will write it (its value: the job id)."""
    return f"{s.queue_prefix}:reindex-target:{target}"


def new_job_id() -> str:
    """A fresh job id."""
    return uuid.uuid4().hex[:12]


def claim_target(r: redis.Redis, s: Settings, target: str, owner: str, ttl_s: int | None = None) -> bool:
    """Reserve collection ``target`` for ``owner`` unless another holds it (SET NX); whether it is ours."""
    return bool(r.set(target_key(s, target), owner, nx=True, ex=ttl_s))


def read_all(s: Settings, r: redis.Redis) -> list[dict[str, Any]]:
    """Every job of this queue prefix (see :meth:`Checkpoint.read`), by id; an expired one leaves the index."""
    jobs = []
    for job_id in sorted(v.decode() for v in r.smembers(jobs_key(s))):
        try:
            jobs.append(Checkpoint(s, job_id, r).read(rejects=0))
        except ConfigError:
            r.srem(jobs_key(s), job_id)  # its checkpoint expired or was deleted
    return jobs


class Checkpoint:
    """One job's keys in Redis and the steps that change them, on one Redis client (``with`` closes it)."""

    def __init__(self, s: Settings, job_id: str, r: redis.Redis | None = None) -> None:
        self.settings, self.job_id = s, job_id
        # Its writes are safe to repeat (a batch is recorded once, by its number; a repeated count of
        # unconfirmed resends overstates that count, no more), so a command that a Redis restart or a
        # failover cut is sent again, for as long as a job may wait.
        self.redis = r if r is not None else redis_client(s, retry_s=s.job_timeout_s)
        self.key = job_key(s, job_id)
        self.batches_key, self.tasks_key = self.key + ":batches", self.key + ":tasks"
        self.sent_key, self.rejects_key = self.key + ":sent", self.key + ":rejects"
        self.driver_key = self.key + ":driver"
        self._complete = self.redis.register_script(_COMPLETE)
        self._fail_unless_driven = self.redis.register_script(_FAIL_UNLESS_DRIVEN)
        self._finalize = self.redis.register_script(_FINALIZE)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the job's Redis client (after its lock is released: the lock shares it)."""
        self.redis.close()

    # ---- reading ------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the job hash exists."""
        return bool(self.redis.exists(self.key))

    def state(self) -> str | None:
        """The job's state, or None when there is no such job."""
        state = self.redis.hget(self.key, "state")
        return state.decode() if state is not None else None

    def read(self, rejects: int = 20) -> dict[str, Any]:
        """The job hash (numbers as numbers) with ``id``, ``batches_done``, ``driver`` (the lock's holder or
        None) and the first ``rejects`` rejected rows as (position, reason); ConfigError for an unknown job."""
        raw = self.redis.hgetall(self.key)
        if not raw:
            raise ConfigError(f"no re-index job {self.job_id!r}")
        job: dict[str, Any] = {"id": self.job_id, **{k.decode(): _number(v.decode()) for k, v in raw.items()}}
        job["batches_done"] = self.redis.scard(self.batches_key)
        driver = self.redis.get(self.driver_key)
        job["driver"] = driver.decode() if driver else None
        kept = self.redis.lrange(self.rejects_key, 0, rejects - 1) if rejects > 0 else []
        job["rejects"] = [_reject(v) for v in kept]
        return job

    def progress(self) -> tuple[set[int], set[int], dict[int, str]]:
        """(batches recorded, batches whose send returned, the task id chosen for each batch sent)."""
        done = {int(b) for b in self.redis.smembers(self.batches_key)}
        sent = {int(b) for b in self.redis.smembers(self.sent_key)}
        tasks = {int(k): v.decode() for k, v in self.redis.hgetall(self.tasks_key).items()}
        return done, sent, tasks

    # ---- writing ------------------------------------------------------------------------------------------

    def create(self, fields: dict[str, Any]) -> None:
        """Write the job hash and list the job."""
        self.redis.hset(self.key, mapping=fields)
        self.redis.sadd(jobs_key(self.settings), self.job_id)

    def update(self, fields: dict[str, Any]) -> None:
        """Set some fields of the job hash."""
        self.redis.hset(self.key, mapping=fields)

    def record_task(self, batch: int, task_id: str) -> None:
        """The task id chosen for ``batch``, recorded before its send: a crash after this is seen on resume."""
        self.redis.hset(self.tasks_key, batch, task_id)

    def forget_task(self, batch: int) -> None:
        """Drop ``batch``'s task id: it was refused before anything was sent."""
        self.redis.hdel(self.tasks_key, batch)

    def mark_sent(self, batch: int) -> None:
        """``batch``'s send returned: a resume awaits it by its task id."""
        self.redis.sadd(self.sent_key, batch)

    def count_unconfirmed_resend(self) -> None:
        """One more batch whose send a crash cut: it may have reached a worker and is sent again."""
        self.redis.hincrby(self.key, "unconfirmed_resends", 1)

    def complete(self, batch: int, size: int, stored: int, truncated: int, rejects: list[tuple[int, str]],
                 rate: float) -> None:
        """Record one batch's result exactly once, with the job's rate (docs/s) at that moment."""
        self._complete(keys=[self.key, self.batches_key, self.rejects_key, self.sent_key],
                       args=[batch, size, stored, truncated, time.time(), round(rate, 2)]
                       + [f"{position}\t{why}" for position, why in sorted(rejects)])

    def fail(self, error: str) -> None:
        """Mark the job failed with ``error``."""
        self.update({"state": State.FAILED, "error": error[:2000], "updated": time.time()})

    def fail_unless_driven(self, token: str, error: str) -> bool:
        """Mark the job failed unless a driver other than ``token`` holds its lock; whether it was marked."""
        return bool(self._fail_unless_driven(keys=[self.key, self.driver_key], args=[token, error[:2000], time.time()]))

    def finalize(self, target: str, fields: dict[str, Any]) -> None:
        """Record a final state (done, switched) and let the job's keys, and ``target``'s reservation while
        it is this job's, live FINISHED_KEPT_S from now on."""
        keys = [self.key] + [self.key + suffix for suffix in JOB_KEY_SUFFIXES] + [target_key(self.settings, target)]
        pairs = [item for field_value in fields.items() for item in field_value]
        self._finalize(keys=keys, args=[FINISHED_KEPT_S, self.job_id, *pairs])


def _reject(raw: bytes) -> tuple[int, str]:
    position, _, reason = raw.decode().partition("\t")
    return int(position), reason


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
