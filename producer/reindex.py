"""Background re-indexing: resumable, throttled, with a zero-downtime alias switch.

    report = start_reindex(settings, "docs.jsonl", "docs")        # into docs_v{N}, then alias docs -> it
    report = start_reindex(settings, "milvus:docs_v1", "docs")     # re-encode what a collection stores
    job_id = start_in_background(settings, "docs.jsonl", "docs")   # from a web app; poll get_job(...)
    report = resume_reindex(settings, job_id)                      # after a crash or a failed batch

The source is read in a deterministic order (file order; primary-key order for ``milvus:COLLECTION``) and
cut into fixed batches of ``M3Q_JOB_TEXTS`` rows: batch k is always rows [k*B, (k+1)*B). The checkpoint
lives in Redis under ``{M3Q_QUEUE_PREFIX}:reindex:{job_id}``:

- the job hash: source, alias, target, state (running/failed/done/switched), total, done, stored, rejected,
  started, updated, rate, error (naming the failed batch);
- ``:batches``: the set of batch numbers whose result is recorded (a batch is counted once, atomically);
- ``:tasks`` / ``:sent``: the Celery task id chosen for a batch *before* it is sent, and the set of batches
  whose send returned. On resume, a sent batch is awaited by its task id, never sent again;
- ``:rejects``: the first REJECTS_KEPT rejected rows with their reasons;
- ``:driver``: the driver lock (a ``producer.lease.Lease``: SET NX with a TTL of DRIVER_LOCK_TTL_S,
  renewed by a heartbeat thread): one process at a time drives a job, a second one fails at once with
  DriverBusy naming the holder. A driver that dies leaves its lock to expire, so a resume works at most
  DRIVER_LOCK_TTL_S later. A driver whose lock is lost (not renewed in time, or taken) sends no further
  batch and fails with DriverLost.

A job that reaches a final state (done or switched) gives all its keys, and its target's reservation, a
TTL of FINISHED_KEPT_S (7 days): they expire then, and ``list_jobs`` forgets the job. A failed job keeps
its keys without a TTL, since it can be resumed.

Guarantee about double encoding: a batch that a worker stored is never sent again. The only batch that
may be encoded twice is one whose send was cut by the crash itself (its task id is recorded, the end of
its send is not): sends are sequential, so that is at most one batch (``M3Q_JOB_TEXTS`` documents) per
interrupted run, counted in the job's ``unconfirmed_resends``. A batch whose job failed is sent again.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import redis
from celery.result import AsyncResult

from producer import checks, milvus, wire
from producer.client import Client, Handle, JobFailed
from producer.lease import Lease, LeaseBusy
from producer.settings import Settings
from producer.sources import count_documents, read_documents
from producer.wire import redis_client
from producer.wire import PayloadError
from producer.errors import ConfigError, DriverBusy, DriverLost, ReindexFailed, ReindexInterrupted

MILVUS_PREFIX = "milvus:"
"""A source of this form re-encodes what an existing collection stores (id, text, metadata)."""
REJECTS_KEPT = 1000
"""Rejected rows kept with their reasons in Redis (the count is always exact)."""
READ_BATCH_ROWS = 1000
"""Rows fetched per page when reading a Milvus source."""
STATES = ("running", "failed", "done", "switched")
DRIVER_LOCK_TTL_S = 30.0
"""A driver's lock lives this long unless its heartbeat renews it (every third of it): short, because a
dead driver's job can be resumed only once its lock has expired."""
FINISHED_KEPT_S = 7 * 24 * 3600
"""How long a done or switched job keeps its Redis keys (failed jobs keep theirs: they can be resumed)."""
JOB_KEY_SUFFIXES = (":batches", ":tasks", ":sent", ":rejects")
"""The keys that go with the job hash, named by their suffix; they expire with it."""

_COMPLETE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'stored', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'rejected', #ARGV - 5)
redis.call('HINCRBY', KEYS[1], 'truncated', ARGV[4])
redis.call('HSET', KEYS[1], 'updated', ARGV[5])
redis.call('SREM', KEYS[4], ARGV[1])
for i = 6, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
redis.call('LTRIM', KEYS[3], 0, %d - 1)
return 1
""" % REJECTS_KEPT
"""Record one batch's result exactly once (SADD guards the counters), atomically."""

_FAIL_UNLESS_DRIVEN = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[2], 'updated', ARGV[3])
return 1
"""
"""Mark the job failed unless another driver holds its lock now (the checkpoint is then that driver's)."""

_FINALIZE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
for i = 1, #KEYS - 1 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
if redis.call('GET', KEYS[#KEYS]) == ARGV[2] then redis.call('EXPIRE', KEYS[#KEYS], ARGV[1]) end
return 1
"""
"""Write a final state and, in the same step, give the job's keys a TTL; the last key is the target's
reservation, which expires only when it is this job's."""


@dataclass
class ReindexReport:
    """What a re-index run did."""

    job_id: str
    target: str
    state: str
    total: int = 0
    stored: int = 0
    count: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    switched: bool = False
    previous: str | None = None
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for the CLI."""
        lines = [f"re-index {self.job_id}: {self.state}; {self.count} documents in {self.target} "
                 f"({self.stored} stored of {self.total}); rejected {len(self.rejected)}"]
        lines += [f"  row {row}: {reason}" for row, reason in self.rejected[:50]]
        if self.switched:
            lines.append(f"alias now points to {self.target}" + (f" (was {self.previous})" if self.previous else ""))
        elif self.state == "done" and self.rejected:
            lines.append("alias NOT switched: there were rejected rows (use --allow-rejects, then --resume)")
        elif self.state == "done":
            lines.append("alias NOT switched: nothing was stored")
        lines += [f"dropped {name}" for name in self.dropped]
        return "\n".join(lines)


# ---- keys ---------------------------------------------------------------------------------------------

def job_key(s: Settings, job_id: str) -> str:
    """The job's checkpoint hash; its sets and lists share this prefix."""
    return f"{s.queue_prefix}:reindex:{job_id}"


def _jobs_key(s: Settings) -> str:
    return f"{s.queue_prefix}:reindex-jobs"


def _target_key(s: Settings, target: str) -> str:
    """The reservation of a versioned collection by the job that will write it (its value: the job id)."""
    return f"{s.queue_prefix}:reindex-target:{target}"


def _new_job_id() -> str:
    return uuid.uuid4().hex[:12]


# ---- the driver lock ----------------------------------------------------------------------------------

class DriverLock(Lease):
    """The right to drive one job: a lease on the job's ``:driver`` key (see producer/lease.py), so two
    processes never send a job's batches at once. What it adds is the job: a refusal or a loss names it
    and says how to resume it, and a lost driver marks it failed.

    Re-entrant: ``start_in_background`` takes it before its thread starts (a second driver fails at once,
    in the caller) and the thread's ``start_reindex`` holds it once more; the last release frees it."""

    def __init__(self, s: Settings, job_id: str) -> None:
        super().__init__(redis_client(s), job_key(s, job_id) + ":driver", DRIVER_LOCK_TTL_S,
                         thread_name=f"m3q-reindex-lock-{job_id}")
        self.settings, self.job_id = s, job_id

    def acquire(self) -> "DriverLock":
        """Take the lock, or hold it once more; raise DriverBusy at once when another driver holds it."""
        try:
            super().acquire()
        except LeaseBusy as busy:
            raise DriverBusy(f"re-index {self.job_id} is already being driven by {busy.holder}; if that "
                             f"process is gone, its lock expires in {busy.expires_in_s:.1f} s and "
                             f"`m3q reindex --resume {self.job_id}` works again") from None
        return self

    def ensure_held(self) -> None:
        """Raise DriverLost once the lock is lost: a driver that may have a successor sends nothing more."""
        reason = self.lost_reason()
        if reason is None:
            return
        error = f"the driver {self.token} lost its lock ({reason}) and stopped sending batches"
        with contextlib.suppress(redis.RedisError):  # Redis gone: the job stays "running" until resumed
            self.fail_job(error)
        raise DriverLost(f"re-index {self.job_id}: {error}; `m3q reindex --resume {self.job_id}` goes on")

    def fail_job(self, error: str) -> bool:
        """Mark the job failed with ``error`` unless another driver holds it now; whether it was marked."""
        fail = self.redis.register_script(_FAIL_UNLESS_DRIVEN)
        return bool(fail(keys=[job_key(self.settings, self.job_id), self.key],
                         args=[self.token, error[:2000], time.time()]))


# ---- public API ---------------------------------------------------------------------------------------

def start_reindex(settings: Settings, source: str, alias: str, *, allow_rejects: bool = False,
                  rate_limit_docs_s: float | None = None, drop_old: bool = False, job_id: str | None = None,
                  progress: bool = True, text_field: str = "text", id_field: str = "id",
                  adopt: bool = False, lock: DriverLock | None = None) -> ReindexReport:
    """Re-index ``source`` (a file or ``milvus:COLLECTION``) into ``{alias}_v{N}``, then switch ``alias``.
    ``alias`` must be an alias or a free name: a collection of that name is refused before anything is
    encoded, unless ``adopt``, which first renames it to the next ``{alias}_v{N}`` and points the alias
    at it (see :func:`adopt_collection`). Raises DriverBusy when another process drives ``job_id``.
    ``lock``: one the caller already holds on the job (it replaces ``job_id``), as
    ``start_in_background`` does before its thread starts."""
    r = redis_client(settings)
    with lock or DriverLock(settings, job_id or _new_job_id()) as lock:
        _refuse_existing(settings, lock.job_id)
        client = Client(settings)
        mc = milvus.connect(settings)
        try:
            job = _create_job(settings, mc, lock.job_id, source, alias, text_field, id_field, adopt)
            job.update(allow_rejects=int(allow_rejects), drop_old=int(drop_old),
                       rate_limit_docs_s=rate_limit_docs_s or 0)
            r.hset(job_key(settings, lock.job_id), mapping=job)
            r.sadd(_jobs_key(settings), lock.job_id)
            return _run(settings, client, mc, lock, progress)
        finally:
            mc.close()


def resume_reindex(settings: Settings, job_id: str, *, allow_rejects: bool | None = None,
                   rate_limit_docs_s: float | None = None, drop_old: bool | None = None,
                   progress: bool = True) -> ReindexReport:
    """Go on with a job: batches already stored are skipped (never encoded again); options left None keep
    the job's own. A job that is done but unswitched (rejects) switches when ``allow_rejects`` is given.
    Raises DriverBusy, changing nothing, while another process drives the job."""
    r = redis_client(settings)
    if not r.exists(job_key(settings, job_id)):
        raise ConfigError(f"no re-index job {job_id!r} (see `m3q status`)")
    with DriverLock(settings, job_id) as lock:
        job = get_job(settings, job_id, rejects=0)
        if "target" not in job:  # its start failed, or its starter died before creating it ("starting")
            why = job.get("error") or "the process that started it ended before it read the source"
            raise ConfigError(f"re-index job {job_id} never started ({why}); start it again with "
                             f"`m3q reindex {job.get('source')} {job.get('alias')}`")
        changes = {"allow_rejects": allow_rejects, "rate_limit_docs_s": rate_limit_docs_s, "drop_old": drop_old}
        changes = {k: int(v) if isinstance(v, bool) else v for k, v in changes.items() if v is not None}
        if changes:
            r.hset(job_key(settings, job_id), mapping=changes)
        client = Client(settings)
        mc = milvus.connect(settings)
        try:
            return _run(settings, client, mc, lock, progress)
        finally:
            mc.close()


def start_in_background(settings: Settings, source: str, alias: str, **options: Any) -> str:
    """Start a re-index in a daemon thread and return its job id at once; poll :func:`get_job`. The driver
    lock is taken here, before the thread starts: a job id that another process drives raises DriverBusy
    in the caller, and one that exists raises ValueError."""
    lock = DriverLock(settings, options.pop("job_id", None) or _new_job_id()).acquire()
    try:
        _refuse_existing(settings, lock.job_id)
        r = redis_client(settings)
        r.hset(job_key(settings, lock.job_id),
               mapping={"state": "starting", "source": source, "alias": alias, "started": time.time()})
        r.sadd(_jobs_key(settings), lock.job_id)
        threading.Thread(target=_drive_in_background, args=(lock, source, alias, options),
                         name=f"m3q-reindex-{lock.job_id}", daemon=True).start()
    except BaseException:
        lock.release()
        raise
    return lock.job_id


def _drive_in_background(lock: DriverLock, source: str, alias: str, options: dict[str, Any]) -> None:
    """The background thread's work; it still holds the lock when it records an error in the checkpoint,
    where the job's poller looks, and releases it last."""
    try:
        start_reindex(lock.settings, source, alias, lock=lock, progress=False, **options)
    except ReindexFailed:
        pass  # already recorded (or, for a lost lock, left to the driver that holds the job now)
    except Exception as e:  # noqa: BLE001 - a background job's error belongs in its checkpoint
        lock.fail_job(f"{type(e).__name__}: {e}")
    finally:
        lock.release()


def get_job(settings: Settings, job_id: str, rejects: int = 20) -> dict[str, Any]:
    """A job's checkpoint: done/total, stored, rejected, rate (docs/s), eta_s, state, error, target, ...
    plus the first ``rejects`` rejected rows. Raises ValueError for an unknown job."""
    r = redis_client(settings)
    raw = r.hgetall(job_key(settings, job_id))
    if not raw:
        raise ConfigError(f"no re-index job {job_id!r}")
    job: dict[str, Any] = {"id": job_id, **{k.decode(): _number(v.decode()) for k, v in raw.items()}}
    job["batches_done"] = r.scard(job_key(settings, job_id) + ":batches")
    driver = r.get(job_key(settings, job_id) + ":driver")
    job["driver"] = driver.decode() if driver else None
    # A running job without a driver lock is interrupted: its driver released the lock on Ctrl-C, or died
    # and left it to expire (DRIVER_LOCK_TTL_S); nothing goes on until `m3q reindex --resume`.
    job["interrupted"] = job.get("state") == "running" and driver is None
    left = max(0, int(job.get("total", 0)) - int(job.get("done", 0)))
    rate = float(job.get("rate", 0) or 0)
    live = job.get("state") == "running" and not job["interrupted"]
    job["eta_s"] = 0.0 if left == 0 else (left / rate if rate > 0 and live else None)
    job["rejects"] = [_reject(v) for v in r.lrange(job_key(settings, job_id) + ":rejects", 0, rejects - 1)]
    return job


def list_jobs(settings: Settings) -> list[dict[str, Any]]:
    """Every re-index job of this queue prefix, oldest first."""
    r = redis_client(settings)
    ids = sorted(v.decode() for v in r.smembers(_jobs_key(settings)))
    jobs = []
    for job_id in ids:
        try:
            jobs.append(get_job(settings, job_id, rejects=0))
        except ValueError:
            r.srem(_jobs_key(settings), job_id)  # its checkpoint was deleted
    return sorted(jobs, key=lambda j: float(j.get("started", 0) or 0))


def drop_unaliased(settings: Settings, alias: str) -> list[str]:
    """Drop the versioned collections ``{alias}_v{N}`` that no alias points to; return their names."""
    mc = milvus.connect(settings)
    try:
        current = _alias_target(mc, alias)
        dropped = []
        for name in _versions(mc, alias):
            if name != current and not _aliases_of(mc, name) and not _in_use(settings, name):
                milvus._call(f"drop collection {name!r}", mc.drop_collection, name)
                dropped.append(name)
        return dropped
    finally:
        mc.close()


# ---- creating a job -----------------------------------------------------------------------------------

def _refuse_existing(s: Settings, job_id: str) -> None:
    """A new job never takes over an existing one's checkpoint ("starting" is start_in_background's own)."""
    r = redis_client(s)
    if r.exists(job_key(s, job_id)) and r.hget(job_key(s, job_id), "state") != b"starting":
        raise ConfigError(f"re-index job {job_id} exists; resume it with `m3q reindex --resume {job_id}`")


def _create_job(s: Settings, mc: Any, job_id: str, source: str, alias: str,
                text_field: str, id_field: str, adopt: bool = False) -> dict[str, Any]:
    """Check the alias and the source, reserve the next versioned collection and describe the job; all of
    it before anything is encoded."""
    _check_alias(s, mc, alias, adopt)
    source_collection = _source_collection(mc, source)
    if not source_collection:
        read_documents(_path(source), text_field, id_field)  # a file it cannot read fails now (SourceError)
    total = milvus.count(mc, source_collection) if source_collection else count_documents(_path(source))
    # The worker creates the collection on its first upsert, with the model identity it records.
    target = _reserve_target(s, mc, alias, job_id)
    now = time.time()
    return {"source": source, "source_collection": source_collection or "", "alias": alias, "target": target,
            "state": "running", "total": total or 0, "done": 0, "stored": 0, "rejected": 0, "truncated": 0,
            "batch_texts": s.job_texts, "text_field": text_field, "id_field": id_field, "started": now,
            "updated": now, "rate": 0, "error": "", "unconfirmed_resends": 0}


def _check_alias(s: Settings, mc: Any, alias: str, adopt: bool) -> None:
    """``alias`` is an alias or a free name; a collection of that name is adopted, or refused with the way out."""
    if _alias_target(mc, alias) is not None or not milvus._call(f"has_collection {alias!r}", mc.has_collection, alias):
        return
    if not adopt:
        raise ConfigError(f"{alias!r} is a collection, not an alias (nothing was encoded): add --adopt to turn it "
                         f"into {_next_version(mc, alias)} behind an alias {alias!r} first, or pick another --into")
    adopt_collection(s, mc, alias)


def adopt_alias(settings: Settings, name: str) -> str:
    """`m3q reindex --into NAME --adopt` alone: turn collection ``name`` into a version behind an alias
    ``name`` (see :func:`adopt_collection`); returns the collection it now points to."""
    mc = milvus.connect(settings)
    try:
        current = _alias_target(mc, name)
        if current is not None:
            return current  # already an alias: nothing to do
        if not milvus._call(f"has_collection {name!r}", mc.has_collection, name):
            raise ConfigError(f"no collection {name!r} to adopt")
        return adopt_collection(settings, mc, name)
    finally:
        mc.close()


def adopt_collection(s: Settings, mc: Any, name: str) -> str:
    """Turn collection ``name`` into the first version behind an alias: rename it to the next free
    ``{name}_v{N}``, then create alias ``name`` on it; returns the new collection name. Searches of
    ``name`` fail only between the two calls (milliseconds); re-indexing into ``name`` works afterwards."""
    version = _next_version(mc, name)
    while not redis_client(s).set(_target_key(s, version), f"adopted:{name}", nx=True, ex=FINISHED_KEPT_S):
        version = f"{name}_v{int(version.rsplit('_v', 1)[1]) + 1}"  # a job has reserved it meanwhile
    milvus._call(f"rename collection {name!r} to {version!r}", mc.rename_collection, name, version)
    # Milvus Lite releases a renamed collection: load it again, or searches through the alias would fail.
    milvus._call(f"load collection {version!r}", mc.load_collection, version)
    milvus._call(f"create alias {name!r}", mc.create_alias, version, name)
    return version


def _next_version(mc: Any, alias: str) -> str:
    versions = _versions(mc, alias)
    return f"{alias}_v{int(versions[-1].rsplit('_v', 1)[1]) + 1 if versions else 1}"


def _path(source: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file (a collection is written milvus:NAME)")
    return path


def _source_collection(mc: Any, source: str) -> str | None:
    """For ``milvus:NAME``: the collection itself (an alias is resolved now, so a resume reads the same one)."""
    if not source.startswith(MILVUS_PREFIX):
        return None
    name = source[len(MILVUS_PREFIX):]
    resolved = _alias_target(mc, name) or name
    if not milvus._call(f"has_collection {resolved!r}", mc.has_collection, resolved):
        raise ConfigError(f"source collection {name!r} does not exist")
    return resolved


def _versions(mc: Any, alias: str) -> list[str]:
    pattern = re.compile(re.escape(alias) + r"_v(\d+)$")
    names = [n for n in milvus._call("list collections", mc.list_collections) if pattern.match(n)]
    return sorted(names, key=lambda n: int(pattern.match(n).group(1)))


def _reserve_target(s: Settings, mc: Any, alias: str, job_id: str) -> str:
    """The next free ``{alias}_v{N}``: above every existing version, and claimed in Redis (SET NX) so two
    jobs started at once never share one before a worker has created it."""
    n = int(_next_version(mc, alias).rsplit("_v", 1)[1])
    r = redis_client(s)
    while not r.set(_target_key(s, f"{alias}_v{n}"), job_id, nx=True):
        n += 1
    return f"{alias}_v{n}"


# ---- the driver ---------------------------------------------------------------------------------------

@dataclass
class _Batch:
    number: int
    rows: list[tuple[int, Any, Any, Any]]   # (position, text, id, metadata) to send
    rejects: list[tuple[int, str]]           # rows refused before sending
    size: int                                # every row of the batch, sent or not
    handle: Handle | None = None


def _run(s: Settings, client: Client, mc: Any, lock: DriverLock, progress: bool) -> ReindexReport:
    """Send the batches not yet recorded, record each as it finishes, then switch the alias; all of it
    under the job's driver lock, which the caller holds."""
    job_id = lock.job_id
    job = get_job(s, job_id, rejects=0)
    if job["state"] in ("running", "failed"):
        redis_client(s).hset(job_key(s, job_id), mapping={"state": "running", "error": ""})
        try:
            _drive(s, client, mc, job, lock, progress)
        except KeyboardInterrupt:
            raise ReindexInterrupted(get_job(s, job_id, rejects=0)) from None
        except ReindexFailed:
            raise  # recorded where it happened
        except Exception as e:  # the source, Milvus or Redis failed: the checkpoint says so, and resume goes on
            with contextlib.suppress(redis.RedisError):
                lock.fail_job(f"{type(e).__name__}: {e}")
            raise
        lock.ensure_held()  # only the job's driver may declare it done
        _finalize(s, job, {"state": "done", "total": get_job(s, job_id)["done"], "updated": time.time()})
    job = get_job(s, job_id, rejects=REJECTS_KEPT)
    if job["state"] == "done" and int(job["stored"]) > 0 and (int(job["rejected"]) == 0 or job.get("allow_rejects")):
        _switch(s, mc, job)
        job = get_job(s, job_id, rejects=REJECTS_KEPT)
    return _report(mc, job)


def _drive(s: Settings, client: Client, mc: Any, job: dict, lock: DriverLock, progress: bool) -> None:
    key = job_key(s, lock.job_id)
    r = redis_client(s)
    done = {int(b) for b in r.smembers(key + ":batches")}
    sent = {int(b) for b in r.smembers(key + ":sent")}
    tasks = {int(k): v.decode() for k, v in r.hgetall(key + ":tasks").items()}
    complete = r.register_script(_COMPLETE)
    pace = _Pacer(float(job.get("rate_limit_docs_s") or 0))
    bar = _bar(int(job["total"]) or None, int(job["done"]), progress)
    window: deque[_Batch] = deque()
    started, docs = time.monotonic(), 0
    try:
        for batch in _batches(mc, job, done):
            if len(window) >= s.max_in_flight:
                docs += _finish(s, r, complete, key, window.popleft(), started, docs, bar)
            pace.wait(batch.size)
            lock.ensure_held()  # a driver whose lock may be another's by now sends nothing more
            batch.handle = _send(s, client, r, key, job, batch, tasks.get(batch.number), batch.number in sent)
            window.append(batch)
        while window:
            docs += _finish(s, r, complete, key, window.popleft(), started, docs, bar)
    finally:
        bar.close()


def _batches(mc: Any, job: dict, done: set[int]) -> Iterator[_Batch]:
    """The source's fixed batches not yet done; rows that cannot be sent are rejected with a reason."""
    size = int(job["batch_texts"])
    chunk: list = []
    number = 0
    for row in _source_rows(mc, job):
        chunk.append(row)
        if len(chunk) == size:
            if number not in done:
                yield _make_batch(number, chunk)
            chunk, number = [], number + 1
    if chunk and number not in done:
        yield _make_batch(number, chunk)


def _make_batch(number: int, chunk: list) -> _Batch:
    rows, rejects = [], []
    for position, text, doc_id, metadata, error in chunk:
        reason = error or checks.unsendable_text(text) or checks.unsendable_metadata(metadata)
        if reason:
            rejects.append((position, f"{checks.name_item(position, doc_id)}: {reason}"))
        else:
            rows.append((position, text, doc_id, metadata))
    return _Batch(number, rows, rejects, len(chunk))


def _source_rows(mc: Any, job: dict) -> Iterator[tuple[int, Any, Any, Any, str | None]]:
    """(position, text, id, metadata, error) in the source's natural order; positions start at 1."""
    if job.get("source_collection"):
        yield from _collection_rows(mc, str(job["source_collection"]))
        return
    docs = read_documents(_path(str(job["source"])), str(job["text_field"]), str(job["id_field"]))
    for position, doc in enumerate(docs, 1):
        yield position, doc.text, doc.id, doc.metadata, doc.error


def _collection_rows(mc: Any, name: str) -> Iterator[tuple[int, Any, Any, Any, None]]:
    # A query iterator pages by primary key, so the order (and with it every batch) is the same each run.
    it = milvus._call(f"read {name!r}", mc.query_iterator, name, batch_size=READ_BATCH_ROWS, filter="",
                      output_fields=["id", "text", "metadata"])
    position = 0
    try:
        while page := milvus._call(f"read {name!r}", it.next):
            for row in page:
                position += 1
                yield position, row["text"], row["id"], row.get("metadata") or {}, None
    finally:
        it.close()


def _send(s: Settings, client: Client, r: Any, key: str, job: dict, batch: _Batch, task_id: str | None,
          was_sent: bool) -> Handle | None:
    """A handle on the batch's job: the one sent by an earlier run when its send finished, else a new one."""
    if not batch.rows:
        return None
    if task_id and was_sent:
        previous = AsyncResult(task_id, app=client.app)
        if previous.state != "FAILURE":
            return Handle(previous, wire.TASK_INDEX_DOCUMENTS, len(batch.rows), s.job_timeout_s, batch.rows[0][0])
    elif task_id:
        r.hincrby(key, "unconfirmed_resends", 1)  # the crash cut this send: it may have reached a worker
    positions, texts, ids, metadata = (list(c) for c in zip(*batch.rows))
    payload = {"collection": str(job["target"]), "texts": texts, "ids": ids, "metadata": metadata,
               "batch": batch.number}
    new_id = str(uuid.uuid4())
    r.hset(key + ":tasks", batch.number, new_id)   # recorded before sending: a crash after it is seen
    result = client.app.send_task(wire.TASK_INDEX_DOCUMENTS, args=[payload], task_id=new_id,
                                  queue=wire.task_queue(s, wire.TASK_INDEX_DOCUMENTS),
                                  headers={"m3q_sent": time.time()})
    r.sadd(key + ":sent", batch.number)
    return Handle(result, wire.TASK_INDEX_DOCUMENTS, len(texts), s.job_timeout_s, positions[0], positions)


def _finish(s: Settings, r: Any, complete: Any, key: str, batch: _Batch, started: float, docs: int, bar) -> int:
    """Wait for one batch and record it once; a failed job marks the whole re-index failed."""
    stored, truncated, rejects = 0, 0, list(batch.rejects)
    if batch.handle is not None:
        try:
            raw = batch.handle.raw()
        except (JobFailed, PayloadError) as e:
            _fail(r, key, batch, e)
        positions = [row[0] for row in batch.rows]
        stored, truncated = int(raw["stored"]), int(raw.get("truncated", 0))
        rejects += [(positions[i], reason) for i, reason in raw["errors"]]
    now = time.time()
    rate = (docs + batch.size) / max(time.monotonic() - started, 1e-6)
    r.hset(key, "rate", round(rate, 2))
    complete(keys=[key, key + ":batches", key + ":rejects", key + ":sent"],
             args=[batch.number, batch.size, stored, truncated, now] + [f"{p}\t{why}" for p, why in sorted(rejects)])
    bar.update(batch.size)
    return batch.size


def _fail(r: Any, key: str, batch: _Batch, e: Exception) -> None:
    first, last = (batch.rows[0][0], batch.rows[-1][0]) if batch.rows else (0, 0)
    error = f"batch {batch.number} (rows {first}..{last}) failed: {type(e).__name__}: {e}"
    r.hset(key, mapping={"state": "failed", "error": error[:2000], "updated": time.time()})
    job_id = key.rsplit(":", 1)[1]
    raise ReindexFailed(f"re-index {job_id}: {error}; fix the cause, then `m3q reindex --resume {job_id}`") from e


class _Pacer:
    """Producer-side pacing to at most ``rate`` documents/s (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.docs = 0

    def wait(self, docs: int) -> None:
        if self.rate > 0:
            delay = self.start + self.docs / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.docs += docs


def _bar(total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="doc", desc="re-indexing", disable=not enabled,
                dynamic_ncols=True)


# ---- the switch ---------------------------------------------------------------------------------------

def _switch(s: Settings, mc: Any, job: dict) -> None:
    """Point ``alias`` at the finished collection in one step; drop the previous one when asked."""
    alias, target = str(job["alias"]), str(job["target"])
    previous = _alias_target(mc, alias)
    if previous is None:
        if milvus._call(f"has_collection {alias!r}", mc.has_collection, alias):
            raise ConfigError(f"{alias!r} is a collection, not an alias: `m3q reindex --into {alias} --adopt` "
                             f"turns it into a version behind an alias")
        milvus._call(f"create alias {alias!r}", mc.create_alias, target, alias)
    elif previous != target:
        milvus._call(f"alter alias {alias!r}", mc.alter_alias, target, alias)
    fields = {"state": "switched", "previous": previous or "", "switched_at": time.time()}
    if job.get("drop_old") and previous and previous != target and not _aliases_of(mc, previous):
        milvus._call(f"drop collection {previous!r}", mc.drop_collection, previous)
        fields["dropped"] = previous
    _finalize(s, job, fields)


def _finalize(s: Settings, job: dict, fields: dict[str, Any]) -> None:
    """Record a final state (done, switched) and let the job's keys live FINISHED_KEPT_S from now on."""
    key = job_key(s, str(job["id"]))
    keys = [key] + [key + suffix for suffix in JOB_KEY_SUFFIXES] + [_target_key(s, str(job["target"]))]
    pairs = [item for field_value in fields.items() for item in field_value]
    redis_client(s).register_script(_FINALIZE)(keys=keys, args=[FINISHED_KEPT_S, job["id"], *pairs])


def _alias_target(mc: Any, alias: str) -> str | None:
    """The collection behind ``alias``, or None when there is no such alias."""
    if alias not in milvus._call("list aliases", mc.list_aliases).get("aliases", []):
        return None  # asked first: describe_alias logs an error for an unknown alias
    return milvus._call(f"describe alias {alias!r}", mc.describe_alias, alias)["collection_name"]


def _aliases_of(mc: Any, collection: str) -> list[str]:
    return list(milvus._call(f"list aliases of {collection!r}", mc.list_aliases, collection_name=collection)
                .get("aliases", []))


def _in_use(s: Settings, collection: str) -> bool:
    """Whether an unfinished re-index job writes to or reads from ``collection``."""
    return any(j.get("state") in ("starting", "running", "failed", "done")
               and collection in (j.get("target"), j.get("source_collection")) for j in list_jobs(s))


# ---- helpers ------------------------------------------------------------------------------------------

def _report(mc: Any, job: dict) -> ReindexReport:
    target = str(job["target"])
    return ReindexReport(job_id=str(job["id"]), target=target, state=str(job["state"]), total=int(job["total"]),
                         stored=int(job["stored"]), count=_count(mc, target), rejected=job["rejects"],
                         switched=job["state"] == "switched", previous=job.get("previous") or None,
                         dropped=[str(job["dropped"])] if job.get("dropped") else [])


def _count(mc: Any, name: str) -> int:
    # A job that stored nothing never made its collection.
    return milvus.count(mc, name) if milvus._call(f"has_collection {name!r}", mc.has_collection, name) else 0


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
