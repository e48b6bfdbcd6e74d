"""What a re-index did and where a job stands: the CLI's report, and get_job / list_jobs for pollers."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from producer.contract import milvus
from producer.contract.redis_conn import redis_client
from producer.contract.settings import Settings
from producer.reindex import checkpoint
from producer.reindex.checkpoint import Checkpoint, State


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
        elif self.state == State.DONE and self.rejected:
            lines.append("alias NOT switched: there were rejected rows (use --allow-rejects, then --resume)")
        elif self.state == State.DONE:
            lines.append("alias NOT switched: nothing was stored")
        lines += [f"dropped {name}" for name in self.dropped]
        return "\n".join(lines)


def report_of(mc: Any, job: dict[str, Any]) -> ReindexReport:
    """The report of a job as its checkpoint has it, with the rows its target holds now."""
    target = str(job["target"])
    return ReindexReport(job_id=str(job["id"]), target=target, state=str(job["state"]), total=int(job["total"]),
                         stored=int(job["stored"]), count=_count(mc, target), rejected=job["rejects"],
                         switched=job["state"] == State.SWITCHED, previous=job.get("previous") or None,
                         dropped=[str(job["dropped"])] if job.get("dropped") else [])


def get_job(settings: Settings, job_id: str, rejects: int = 20) -> dict[str, Any]:
    """A job's checkpoint: done/total, stored, rejected, rate (docs/s), eta_s, state, interrupted, error,
    target, ... plus the first ``rejects`` rejected rows. Raises ConfigError (a ValueError) for an unknown job."""
    with Checkpoint(settings, job_id) as cp:
        return _described(cp.read(rejects))


def list_jobs(settings: Settings) -> list[dict[str, Any]]:
    """Every re-index job of this queue prefix (as :func:`get_job` without rejects), oldest first."""
    with contextlib.closing(redis_client(settings)) as r:
        jobs = [_described(job) for job in checkpoint.read_all(settings, r)]
    return sorted(jobs, key=lambda j: float(j.get("started", 0) or 0))


def _described(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with what a poller reads off it: whether it is interrupted, and its ETA."""
    # A running job without a driver lock is interrupted: its driver released the lock on Ctrl-C, or died
    # and left it to expire (DRIVER_LOCK_TTL_S); nothing goes on until `m3q reindex --resume`.
    job["interrupted"] = job.get("state") == State.RUNNING and job["driver"] is None
    left = max(0, int(job.get("total", 0)) - int(job.get("done", 0)))
    rate = float(job.get("rate", 0) or 0)
    live = job.get("state") == State.RUNNING and not job["interrupted"]
    job["eta_s"] = 0.0 if left == 0 else (left / rate if rate > 0 and live else None)
    return job


def _count(mc: Any, name: str) -> int:
    # A job that stored nothing never made its collection.
    return milvus.count(mc, name) if milvus.has_collection(mc, name) else 0
