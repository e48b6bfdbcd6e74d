"""Every error m3-queue raises on purpose, in one hierarchy under :class:`M3QError`.

A caller (or the CLI) that catches ``M3QError`` gets every expected failure, each with a message that names
the item, setting or command to fix it; anything else is a bug. Most classes also derive from the builtin
their meaning matches, so ``except ValueError`` and ``except ConnectionError`` keep working::

    M3QError
    ├── ConfigError (ValueError)          a setting or argument that cannot work here
    │   └── DeviceError                   a device or dtype this machine cannot provide
    ├── PayloadError (ValueError)         a job refused before anything is encoded (also on the wire)
    ├── SourceError (ValueError)          an input file that cannot be read as documents
    ├── ModelLoadError (RuntimeError)     a checkpoint that cannot be found or is not BGE-M3's shape
    ├── BrokerError (ConnectionError)     Redis refused the producer or stayed unreachable
    ├── MilvusError (RuntimeError)        Milvus unreachable or failing transiently: retry later
    ├── SchemaMismatch (ValueError)       a collection made for another model or dimension: fatal
    ├── MilvusRejected (ValueError)       Milvus refused the request itself (an invalid row): fatal
    ├── InfraError (RuntimeError)         a local service (Redis, Milvus Lite, a worker) could not start
    ├── Busy                              someone else holds it now
    │   ├── LeaseBusy                     a Redis lease held by another owner
    │   └── DriverBusy (ValueError)       a re-index job driven by another process
    └── JobFailed (RuntimeError)          a job the workers could not complete
        ├── JobTimeout                    no result within M3Q_JOB_TIMEOUT_S
        ├── NoWorker                      no live worker serves the queue; nothing was sent
        ├── PoisonJob                     a job whose deliveries keep killing workers
        └── ReindexFailed                 a re-index batch failed; the job can be resumed
            └── DriverLost                the re-index driver lost its lock

    Interrupted (KeyboardInterrupt)       Ctrl-C or SIGTERM stopped a long command; holds what was done
    ├── IndexInterrupted
    └── ReindexInterrupted

The classes are also importable from the modules that raise them (``producer.contract.wire.PayloadError``,
``producer.client.JobFailed``, ...). A worker's failure reaches a Celery-native caller through the result
backend as ``exc_module`` + ``exc_type`` (``producer.contract.errors.PayloadError``), so this module must stay
importable without torch.
"""
from __future__ import annotations

from typing import Any


class M3QError(Exception):
    """Root of every error m3-queue raises on purpose; its message says what to do."""


class ConfigError(M3QError, ValueError):
    """A setting or argument that cannot work here; the message names it."""


class DeviceError(ConfigError):
    """A device or dtype that this machine cannot provide."""


class PayloadError(M3QError, ValueError):
    """A job payload that cannot be processed at all (as opposed to one bad text in it)."""


class SourceError(M3QError, ValueError):
    """A file that cannot be read as documents at all (a directory, binary, compressed, no text column)."""


class ModelLoadError(M3QError, RuntimeError):
    """A checkpoint that cannot be found or does not have BGE-M3's shape."""


class BrokerError(M3QError, ConnectionError):
    """Redis refused the producer (password, certificate) or stayed unreachable for ``M3Q_JOB_TIMEOUT_S``."""


class MilvusError(M3QError, RuntimeError):
    """Milvus is unreachable or failed transiently: retry later."""


class SchemaMismatch(M3QError, ValueError):
    """The collection was made for another dense dimension or model (or not by m3-queue): fatal."""


class MilvusRejected(M3QError, ValueError):
    """Milvus (or the check before it) refused the request itself, e.g. an invalid row: fatal."""


class InfraError(M3QError, RuntimeError):
    """A local service (Redis, Milvus Lite, a worker) could not be started, with what to do about it."""


class Busy(M3QError):
    """Another owner holds what was asked for at this time."""


class LeaseBusy(Busy):
    """Another owner holds the lease: ``holder`` is its token, ``expires_in_s`` the most it may still last
    if that owner is gone (it is renewed while the owner lives)."""

    def __init__(self, key: str, holder: str, expires_in_s: float) -> None:
        super().__init__(f"{key} is held by {holder}; it expires in {expires_in_s:.1f} s unless renewed")
        self.key, self.holder, self.expires_in_s = key, holder, expires_in_s


class DriverBusy(Busy, ValueError):
    """Another process drives this re-index job now; the message names the job and the lock's holder."""


class JobFailed(M3QError, RuntimeError):
    """A job that the workers could not complete; the message names the job and the reason."""


class JobTimeout(JobFailed):
    """No result within ``M3Q_JOB_TIMEOUT_S``: no worker alive, or one that is far behind."""


class NoWorker(JobFailed):
    """No live worker serves the queue (no heartbeat within ``M3Q_NO_WORKER_GRACE_S``); raised before any job
    of the call is sent. The message names the queue, `m3q worker` and `m3q status`."""


class PoisonJob(JobFailed):
    """A job whose deliveries keep killing workers: given up on and recorded."""


class ReindexFailed(JobFailed):
    """A batch failed, or the driver lost its lock; the job is marked failed in Redis and can be resumed."""


class DriverLost(ReindexFailed):
    """The driver's lock expired or was taken while it drove the job, so it stopped sending batches. The
    job is marked failed unless another driver holds it by then: its checkpoint is that driver's."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a long command; the message says what was done and how to go on."""


class IndexInterrupted(Interrupted):
    """Ctrl-C (or SIGTERM) stopped an index run; ``report`` holds what was stored until then."""

    def __init__(self, report: Any, rows: int | None) -> None:
        super().__init__(f"interrupted: stored {report.stored} of {rows if rows is not None else '?'} documents "
                         f"so far ({report.total} read); jobs already sent may still be stored. The same "
                         "command again finishes it, skipping the documents already stored unchanged")
        self.report = report


class ReindexInterrupted(Interrupted):
    """Ctrl-C (or SIGTERM) stopped the re-index driver; the job stays resumable, and the message says how."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job_id, self.job = str(job["id"]), job
        super().__init__(f"re-index {self.job_id} interrupted: {job.get('done', 0)} of {job.get('total', '?')} "
                         f"documents done, {job.get('stored', 0)} stored in {job.get('target')}; "
                         f"`m3q reindex --resume {self.job_id}` goes on (stored batches are not encoded again)")
