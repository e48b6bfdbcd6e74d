"""The query lane: the query queue has its own consumer, so a query never waits behind document jobs.

Celery's own consumer reserves at most ``worker_threads`` jobs across all its queues; if those were all
document jobs, a query could not even be received. This consumer step reads the query queue on a channel
of its own, with its own prefetch (``M3Q_QUERY_PREFETCH``), and hands each job straight to the device loop,
which serves waiting queries before the next document step and merges concurrent queries into one forward
pass. Results go to the result backend exactly as a Celery task's would, and the message is acknowledged
only after that (at least once, like every other job).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from celery import bootsteps, states
from kombu import Consumer

from producer.contract import wire
from worker import runtime
from worker.jobs import Job
from worker.tasks import INSTANT_TASKS, encode_options, encode_result

log = logging.getLogger(__name__)


class QueryLane(bootsteps.ConsumerStep):
    """Consumes the query queue and feeds the device loop directly."""

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.app = parent.app
        # Serializing results and writing them to Redis happens here, off the device thread.
        self.finisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="m3q-query-results")

    def get_consumers(self, channel) -> list[Consumer]:
        s = runtime.current().settings
        consumer = Consumer(channel, queues=[wire.kombu_queue(wire.query_queue(s))], callbacks=[self.on_message],
                            accept=wire.ACCEPT, prefetch_count=s.query_prefetch, on_decode_error=self.on_decode_error)
        log.info("query lane consuming %s (prefetch %d)", wire.query_queue(s), s.query_prefetch)
        return [consumer]

    def on_decode_error(self, message, exc: Exception) -> None:
        # A pickled (or otherwise refused) body is never decoded; drop it with a log line that says why.
        log.error("refused a message on the query lane: %s: %s", type(exc).__name__, exc)
        message.ack()

    def on_message(self, body, message) -> None:
        """Runs in the consumer's event loop: validate, tokenize, queue for the device; never block."""
        task_id = message.headers.get("id") or "?"
        name = message.headers.get("task")
        rt = runtime.current()
        instant = INSTANT_TASKS.get(name)  # answered at once (no device), and not counted as a job
        job = Job.start(rt, name if instant else wire.TASK_ENCODE_QUERIES, task_id,
                        None if instant else message.headers.get("m3q_sent"))
        try:
            if instant:
                self._finish_now(task_id, message, instant(rt, body[0][0] if body and body[0] else None))
                return
            if name != wire.TASK_ENCODE_QUERIES:
                raise wire.PayloadError(f"task {name!r} does not belong on the query lane")
            if message.headers.get("redelivered"):
                # Only redeliveries are counted: no Redis round trip on the common path.
                job.check_deliveries(rt.settings.task_max_retries + 1, uncounted=1)
            payload, options = encode_options(rt, body[0][0] if body and body[0] else None)
            job.run_test_hook(payload)
            future = rt.engine.submit(payload["texts"], "queries", **options)
        except Exception as e:  # noqa: BLE001 - a bad job is answered, never dropped
            self._fail(job, message, e)
            return
        future.add_done_callback(lambda f: self.finisher.submit(self._finish, job, message, f))

    def _finish(self, job: Job, message, future: Future) -> None:
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001 - the step failed: this job fails, the lane goes on
            self._fail(job, message, e)
            return
        self._finish_now(job.job_id, message, encode_result(job.rt, result))
        job.ok()

    def _finish_now(self, task_id: str, message, result: dict) -> None:
        self.app.backend.store_result(task_id, result, states.SUCCESS)
        message.ack()

    def _fail(self, job: Job, message, error: Exception) -> None:
        log.warning("query job %s failed: %s: %s", job.job_id, type(error).__name__, error)
        job.failed(error)
        try:
            self.app.backend.mark_as_failure(job.job_id, error)
        except Exception as why:  # noqa: BLE001 - best effort, like the document lane's record
            log.warning("could not record the failure of query job %s: %s", job.job_id, why)
        finally:
            message.ack()

    def shutdown(self, c) -> None:
        self.finisher.shutdown(wait=True)
        super().shutdown(c)

