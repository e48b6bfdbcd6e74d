"""The driver lock: one process at a time drives a job.

A lease (:mod:`producer.lease`) on the job's ``:driver`` key, with a TTL of DRIVER_LOCK_TTL_S renewed by a
heartbeat thread. A second driver fails at once with DriverBusy naming the holder. A driver that dies
leaves its lock to expire, so a resume works at most DRIVER_LOCK_TTL_S later. A driver whose lock is lost
(not renewed in time, or taken) sends no further batch and fails with DriverLost.
"""
from __future__ import annotations

import contextlib

import redis

from producer.contract.errors import DriverBusy, DriverLost, LeaseBusy
from producer.lease import Lease
from producer.reindex.checkpoint import Checkpoint

DRIVER_LOCK_TTL_S = 30.0
"""A driver's lock lives this long unless its heartbeat renews it (every third of it): short, because a
dead driver's job can be resumed only once its lock has expired."""


class DriverLock(Lease):
    """The right to drive one job: a lease on its checkpoint's ``:driver`` key, so two processes never send
    a job's batches at once. What it adds is the job: a refusal or a loss names it and says how to resume
    it, and a lost driver marks it failed.

    Re-entrant: ``start_in_background`` takes it before its thread starts (a second driver fails at once,
    in the caller) and the thread's ``start_reindex`` holds it once more; the last release frees it."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint.redis, checkpoint.driver_key, DRIVER_LOCK_TTL_S,
                         thread_name=f"m3q-reindex-lock-{checkpoint.job_id}")
        self.checkpoint = checkpoint
        self.job_id = checkpoint.job_id

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
        return self.checkpoint.fail_unless_driven(self.token, error)
