"""Background re-indexing: resumable, throttled, with a zero-downtime alias switch.

    report = start_reindex(settings, "docs.jsonl", "docs")        # into docs_v{N}, then alias docs -> it
    report = start_reindex(settings, "milvus:docs_v1", "docs")     # re-encode what a collection stores
    job_id = start_in_background(settings, "docs.jsonl", "docs")   # from a web app; poll get_job(...)
    report = resume_reindex(settings, job_id)                      # after a crash or a failed batch

The source is read in a deterministic order and cut into fixed batches of ``M3Q_JOB_TEXTS`` rows; each
batch is one index job sent through ``Client.submit``, and its result is checkpointed in Redis. A job
that reaches a final state (done or switched) gives all its keys, and its target's reservation, a TTL of
FINISHED_KEPT_S (7 days): they expire then, and ``list_jobs`` forgets the job. A failed job keeps its keys
without a TTL, since it can be resumed.

Guarantee about double encoding: a batch that a worker stored is never sent again. The only batch that
may be encoded twice is one whose send was cut by the crash itself (its task id is recorded, the end of
its send is not): sends are sequential, so that is at most one batch (``M3Q_JOB_TEXTS`` documents) per
interrupted run, counted in the job's ``unconfirmed_resends``. A batch whose job failed is sent again.

The modules, in the order a job meets them:

- :mod:`~producer.reindex.driver`: the entry points, creating a job, the driving loop (pacing, a bounded
  number of batches in flight);
- :mod:`~producer.reindex.lock`: the driver lock, one process at a time per job;
- :mod:`~producer.reindex.checkpoint`: the job's state and keys in Redis, and the Lua steps that change
  them, on one Redis client per job;
- :mod:`~producer.reindex.batches`: the source, read in fixed batches;
- :mod:`~producer.reindex.versions`: versioned collections behind an alias (reserve, adopt, switch, drop);
- :mod:`~producer.reindex.report`: the run's report, and ``get_job`` / ``list_jobs`` for pollers.
"""
from __future__ import annotations

from producer.contract.errors import DriverBusy, DriverLost, ReindexFailed, ReindexInterrupted
from producer.reindex.checkpoint import FINISHED_KEPT_S, State, job_key
from producer.reindex.driver import resume_reindex, start_in_background, start_reindex
from producer.reindex.report import ReindexReport, get_job, list_jobs
from producer.reindex.versions import adopt_alias, drop_unaliased

__all__ = [
    "DriverBusy", "DriverLost", "FINISHED_KEPT_S", "ReindexFailed", "ReindexInterrupted", "ReindexReport",
    "State", "adopt_alias", "drop_unaliased", "get_job", "job_key", "list_jobs", "resume_reindex",
    "start_in_background", "start_reindex",
]
