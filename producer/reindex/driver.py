"""Driving a re-index: create the job, send its batches (paced, a bounded number in flight), record each
as it finishes, then switch the alias. All of it under the job's driver lock.

Batches go through :meth:`producer.client.Client.submit` and :func:`producer.pipeline.window`, as every
producer job does (payload-size check, retries while Redis restarts, a bounded number in flight, a job a worker
lost as it took it sent again), with the task id recorded in the checkpoint before the send; a batch an
earlier run sent is waited for through :meth:`~producer.client.Client.attach`, with the same watch.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any, Callable, NamedTuple, NoReturn

import redis
from celery import states

from producer import pipeline
from producer.celery_jobs import Handle
from producer.client import Client
from producer.contract import milvus, wire
from producer.contract.errors import ConfigError, JobFailed, PayloadError, ReindexFailed, ReindexInterrupted
from producer.contract.settings import Settings
from producer.reindex import batches, versions
from producer.reindex.batches import Batch
from producer.reindex.checkpoint import DRIVABLE, REJECTS_KEPT, Checkpoint, State, new_job_id
from producer.reindex.lock import DriverLock
from producer.reindex.report import ReindexReport, report_of

log = logging.getLogger(__name__)

# ---- the public entry points --------------------------------------------------------------------------

def start_reindex(settings: Settings, source: str, alias: str, *, allow_rejects: bool = False,
                  rate_limit_docs_s: float | None = None, drop_old: bool = False, job_id: str | None = None,
                  progress: bool = True, text_field: str = "text", id_field: str = "id",
                  adopt: bool = False, lock: DriverLock | None = None) -> ReindexReport:
    """Re-index ``source`` (a file or ``milvus:COLLECTION``) into ``{alias}_v{N}``, then switch ``alias``.
    ``alias`` must be an alias or a free name: a collection of that name is refused before anything is
    encoded, unless ``adopt``, which first renames it to the next ``{alias}_v{N}`` and points the alias
    at it (see :func:`producer.reindex.versions.adopt_collection`). Raises DriverBusy when another process
    drives ``job_id``. ``lock``: one the caller already holds on the job (it replaces ``job_id``), as
    ``start_in_background`` does before its thread starts."""
    options = {"allow_rejects": int(allow_rejects), "drop_old": int(drop_old),
               "rate_limit_docs_s": rate_limit_docs_s or 0}
    spec = _Spec(source, alias, text_field, id_field, adopt)
    if lock is not None:
        return _start(lock, spec, options, progress)
    with Checkpoint(settings, job_id or new_job_id()) as cp:
        return _start(DriverLock(cp), spec, options, progress)


def resume_reindex(settings: Settings, job_id: str, *, allow_rejects: bool | None = None,
                   rate_limit_docs_s: float | None = None, drop_old: bool | None = None,
                   progress: bool = True) -> ReindexReport:
    """Go on with a job: batches already stored are skipped (never encoded again); options left None keep
    the job's own. A job that is done but unswitched (rejects) switches when ``allow_rejects`` is given.
    Raises DriverBusy, changing nothing, while another process drives the job."""
    with Checkpoint(settings, job_id) as cp:
        if not cp.exists():
            raise ConfigError(f"no re-index job {job_id!r} (see `m3q status`)")
        with DriverLock(cp) as lock:
            _refuse_unstarted(cp.read(rejects=0))
            changes = {"allow_rejects": allow_rejects, "rate_limit_docs_s": rate_limit_docs_s, "drop_old": drop_old}
            changes = {k: int(v) if isinstance(v, bool) else v for k, v in changes.items() if v is not None}
            if changes:
                cp.update(changes)
            with contextlib.closing(milvus.connect(settings)) as mc:
                return _run(Client(settings), mc, lock, progress)


def start_in_background(settings: Settings, source: str, alias: str, **options: Any) -> str:
    """Start a re-index in a daemon thread and return its job id at once; poll :func:`get_job`. The driver
    lock is taken here, before the thread starts: a job id that another process drives raises DriverBusy
    in the caller, and one that exists raises ConfigError (a ValueError)."""
    cp = Checkpoint(settings, options.pop("job_id", None) or new_job_id())
    try:
        lock = DriverLock(cp).acquire()
    except BaseException:
        cp.close()
        raise
    try:
        _refuse_existing(cp)
        cp.create({"state": State.STARTING, "source": source, "alias": alias, "started": time.time()})
        threading.Thread(target=_drive_in_background, args=(lock, source, alias, options),
                         name=f"m3q-reindex-{cp.job_id}", daemon=True).start()
    except BaseException:
        _let_go(lock)
        raise
    return cp.job_id


def _drive_in_background(lock: DriverLock, source: str, alias: str, options: dict[str, Any]) -> None:
    """The background thread's work; it still holds the lock when it records an error in the checkpoint,
    where the job's poller looks, and releases it last."""
    try:
        start_reindex(lock.checkpoint.settings, source, alias, lock=lock, progress=False, **options)
    except ReindexFailed:
        pass  # already recorded (or, for a lost lock, left to the driver that holds the job now)
    except Exception as e:  # noqa: BLE001 - a background job's error belongs in its checkpoint
        lock.fail_job(f"{type(e).__name__}: {e}")
    finally:
        _let_go(lock)


def _let_go(lock: DriverLock) -> None:
    """Release the lock, then close the job's Redis client, which the lock shares."""
    try:
        lock.release()
    finally:
        lock.checkpoint.close()


# ---- creating a job -----------------------------------------------------------------------------------

class _Spec(NamedTuple):
    """What a new job re-indexes, and into which alias."""

    source: str
    alias: str
    text_field: str
    id_field: str
    adopt: bool


def _start(lock: DriverLock, spec: _Spec, options: dict[str, Any], progress: bool) -> ReindexReport:
    """Create the job under ``lock`` (checked before anything is encoded), then drive it."""
    cp = lock.checkpoint
    with lock:
        _refuse_existing(cp)
        with contextlib.closing(milvus.connect(cp.settings)) as mc:
            cp.create({**_new_job(cp, mc, spec), **options})
            return _run(Client(cp.settings), mc, lock, progress)


def _refuse_existing(cp: Checkpoint) -> None:
    """A new job never takes over an existing one's checkpoint ("starting" is start_in_background's own)."""
    if cp.state() not in (None, State.STARTING):
        raise ConfigError(f"re-index job {cp.job_id} exists; resume it with `m3q reindex --resume {cp.job_id}`")


def _refuse_unstarted(job: dict[str, Any]) -> None:
    """A job whose start failed, or whose starter died before creating it ("starting"), cannot be resumed."""
    if "target" not in job:
        why = job.get("error") or "the process that started it ended before it read the source"
        raise ConfigError(f"re-index job {job['id']} never started ({why}); start it again with "
                          f"`m3q reindex {job.get('source')} {job.get('alias')}`")


def _new_job(cp: Checkpoint, mc: Any, spec: _Spec) -> dict[str, Any]:
    """Check the alias and the source, reserve the next versioned collection and describe the job; all of
    it before anything is encoded."""
    versions.check_alias(cp, mc, spec.alias, spec.adopt)
    source_collection, total = batches.open_source(mc, spec.source, spec.text_field, spec.id_field)
    # The worker creates the collection on its first upsert, with the model identity it records.
    target = versions.reserve_target(cp, mc, spec.alias)
    now = time.time()
    return {"source": spec.source, "source_collection": source_collection or "", "alias": spec.alias,
            "target": target, "state": State.RUNNING, "total": total or 0, "done": 0, "stored": 0, "rejected": 0,
            "truncated": 0, "batch_texts": cp.settings.job_texts, "text_field": spec.text_field,
            "id_field": spec.id_field, "started": now, "updated": now, "rate": 0, "error": "",
            "unconfirmed_resends": 0}


# ---- driving ------------------------------------------------------------------------------------------

def _run(client: Client, mc: Any, lock: DriverLock, progress: bool) -> ReindexReport:
    """Send the batches not yet recorded, record each as it finishes, then switch the alias; all of it
    under the job's driver lock, which the caller holds."""
    cp = lock.checkpoint
    job = cp.read(rejects=0)
    if job["state"] in DRIVABLE:
        _drive_to_done(client, mc, lock, job, progress)
    job = cp.read(rejects=REJECTS_KEPT)
    if _switchable(job):
        versions.switch(cp, mc, job)
        job = cp.read(rejects=REJECTS_KEPT)
    return report_of(mc, job)


def _switchable(job: dict[str, Any]) -> bool:
    """Done, something stored, and no row rejected unless the job allows it."""
    allowed = int(job["rejected"]) == 0 or bool(job.get("allow_rejects"))
    return job["state"] == State.DONE and int(job["stored"]) > 0 and allowed


def _drive_to_done(client: Client, mc: Any, lock: DriverLock, job: dict[str, Any], progress: bool) -> None:
    """Drive the job until every batch is recorded, then mark it done; any failure is recorded in the
    checkpoint, so a resume goes on from there."""
    cp = lock.checkpoint
    cp.update({"state": State.RUNNING, "error": ""})
    try:
        _drive(client, mc, job, lock, progress)
    except KeyboardInterrupt:
        raise ReindexInterrupted(cp.read(rejects=0)) from None
    except ReindexFailed:
        raise  # recorded where it happened
    except Exception as e:  # the source, Milvus or Redis failed: the checkpoint says so, and resume goes on
        with contextlib.suppress(redis.RedisError):
            lock.fail_job(f"{type(e).__name__}: {e}")
        raise
    lock.ensure_held()  # only the job's driver may declare it done
    cp.finalize(str(job["target"]), {"state": State.DONE, "total": cp.read(rejects=0)["done"],
                                     "updated": time.time()})


def _drive(client: Client, mc: Any, job: dict[str, Any], lock: DriverLock, progress: bool) -> None:
    """Send each pending batch (paced, at most M3Q_MAX_IN_FLIGHT waiting) and record each in order."""
    cp = lock.checkpoint
    done, sent, tasks = cp.progress()
    pace = _Pacer(float(job.get("rate_limit_docs_s") or 0))
    rate = _Rate()
    resend = lambda batch: _submit(client, cp, job, batch)  # noqa: E731

    def send(batch: Batch) -> tuple[Handle | None, bool]:
        """The batch's job, and whether an earlier run sent it."""
        pace.wait(batch.size)
        lock.ensure_held()  # a driver whose lock may be another's by now sends nothing more
        handle = _send(client, cp, job, batch, tasks.get(batch.number), batch.number in sent)
        return handle, handle is not None and handle.id == tasks.get(batch.number)

    with _bar(int(job["total"]) or None, int(job["done"]), progress) as bar:
        for batch, (handle, earlier) in pipeline.window(batches.pending(mc, job, done), send,
                                                        client.settings.max_in_flight):
            _record(cp, batch, handle, earlier, rate, bar, resend)


def _send(client: Client, cp: Checkpoint, job: dict[str, Any], batch: Batch, task_id: str | None,
          was_sent: bool) -> Handle | None:
    """A handle on the batch's job: the one an earlier run sent when its send finished, else a new one."""
    if not batch.rows:
        return None
    if task_id and was_sent:
        earlier = _sent_earlier(client, job, batch, task_id)
        if earlier is not None:
            return earlier
    elif task_id:
        cp.count_unconfirmed_resend()  # the crash cut this send: it may have reached a worker
    return _submit(client, cp, job, batch)


def _sent_earlier(client: Client, job: dict[str, Any], batch: Batch, task_id: str) -> Handle | None:
    """The job an earlier run sent for ``batch``, unless it failed (then the batch is sent again)."""
    handle = client.attach(wire.TASK_INDEX_DOCUMENTS, task_id, batch.payload(str(job["target"])), batch.positions[0])
    if handle.async_result.state == states.FAILURE:
        return None
    handle.rows = batch.positions
    return handle


def _submit(client: Client, cp: Checkpoint, job: dict[str, Any], batch: Batch) -> Handle:
    """Send ``batch`` under a task id recorded first: a crash after the record is seen on resume."""
    task_id = str(uuid.uuid4())
    cp.record_task(batch.number, task_id)
    try:
        handle = client.submit(wire.TASK_INDEX_DOCUMENTS, batch.payload(str(job["target"])),
                               first_index=batch.positions[0], task_id=task_id)
    except PayloadError as e:
        cp.forget_task(batch.number)  # refused before the send: nothing reached a worker
        _fail(cp, batch, e)
    cp.mark_sent(batch.number)
    handle.rows = batch.positions  # the worker names rows by place in the job; record them by source position
    return handle


def _record(cp: Checkpoint, batch: Batch, handle: Handle | None, earlier: bool, rate: "_Rate", bar: Any,
            resend: Callable[[Batch], Handle]) -> None:
    """Wait for one batch and record it once; a failed job marks the whole re-index failed. A job an earlier
    run sent that fails now is sent once more first: it may have run before the cause was fixed (a resume
    while the failed run's jobs were still running)."""
    stored, truncated, rejects = 0, 0, list(batch.rejects)
    if handle is not None:
        try:
            raw = handle.raw()
        except (JobFailed, PayloadError) as e:
            if not earlier:
                _fail(cp, batch, e)
            log.info("re-index %s: batch %d, sent by an earlier run, failed (%s); sending it again",
                     cp.job_id, batch.number, e)
            try:
                raw = resend(batch).raw()
            except (JobFailed, PayloadError) as again:
                _fail(cp, batch, again)
        stored, truncated = int(raw["stored"]), int(raw.get("truncated", 0))
        rejects += [(batch.positions[i], reason) for i, reason in raw["errors"]]
    cp.complete(batch.number, batch.size, stored, truncated, rejects, rate.add(batch.size))
    bar.update(batch.size)


def _fail(cp: Checkpoint, batch: Batch, e: Exception) -> NoReturn:
    """Mark the job failed, naming the batch, and raise ReindexFailed with the way to resume it."""
    first, last = (batch.rows[0][0], batch.rows[-1][0]) if batch.rows else (0, 0)
    error = f"batch {batch.number} (rows {first}..{last}) failed: {type(e).__name__}: {e}"
    cp.fail(error)
    raise ReindexFailed(f"re-index {cp.job_id}: {error}; fix the cause, then `m3q reindex --resume {cp.job_id}`") from e


class _Pacer:
    """Producer-side pacing to at most ``rate`` documents/s (0: no limit)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.docs = 0

    def wait(self, docs: int) -> None:
        """Sleep until ``docs`` more documents keep the run at or under its rate."""
        if self.rate > 0:
            delay = self.start + self.docs / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.docs += docs


class _Rate:
    """Documents per second that this run has recorded (what `m3q status` shows, and its ETA uses)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.docs = 0

    def add(self, docs: int) -> float:
        """Count ``docs`` more recorded documents; the rate since the run started."""
        self.docs += docs
        return self.docs / max(time.monotonic() - self.started, 1e-6)


def _bar(total: int | None, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm  # only the driver needs it

    return tqdm(total=total, initial=initial, unit="doc", desc="re-indexing", disable=not enabled,
                dynamic_ncols=True)
