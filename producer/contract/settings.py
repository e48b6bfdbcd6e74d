"""Settings: one typed object, built from ``M3Q_*`` environment variables at start-up.

Nothing here is read at import time. Every field maps to ``M3Q_<FIELD NAME IN CAPITALS>`` and to a CLI
flag ``--<field-name>``; README's settings table lists them all. A field's ``min``, ``max`` or ``above``
(exclusive) bound is checked when the settings are built, and so is the form of the Redis URLs: a value outside
it is a one-line ConfigError naming the variable. :data:`COMMAND_SETTINGS` says which settings each ``m3q``
command reads (its ``--help`` lists those only).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping
from urllib.parse import urlsplit

from producer.contract.errors import ConfigError

ENV_PREFIX = "M3Q_"


@dataclass(frozen=True)
class Settings:
    """Every knob of m3-queue. Units are in the names."""

    broker_url: str = field(default="redis://localhost:6379/0", metadata={"doc": "Celery broker (Redis). Put the password here: redis://:PASSWORD@host:6379/0; rediss:// for TLS."})
    result_backend: str = field(default="", metadata={"doc": "Celery result backend; empty means the broker URL."})
    redis_tls_ca_file: str = field(default="", metadata={"doc": "CA bundle for rediss:// (certificates are always checked)."})
    milvus_uri: str = field(default="", metadata={"doc": "Milvus server URI, or a Milvus Lite .db path; empty means the embedded Milvus Lite server of `m3q demo`/`m3q milvus`."})
    milvus_token: str = field(default="", metadata={"doc": "Milvus token (user:password or API key)."})
    milvus_port: int = field(default=19530, metadata={"doc": "Port of the embedded Milvus Lite server when milvus_uri is empty.", "min": 1, "max": 65535})
    milvus_data_dir: str = field(default="~/.m3q/milvus", metadata={"doc": "Data folder of the embedded Milvus Lite server."})
    model: str = field(default="BAAI/bge-m3", metadata={"doc": "Hub id or local checkpoint directory."})
    device: str = field(default="cpu", metadata={"doc": "Worker device: cpu, cuda, cuda:N."})
    dtype: str = field(default="auto", metadata={"doc": "auto (float16 on cuda, float32 on cpu), float32, float16 or bfloat16."})
    max_batch_tokens: int = field(default=16384, metadata={"doc": "Token budget of one forward pass (padded tokens).", "min": 1})
    query_max_length: int = field(default=512, metadata={"doc": "Tokens kept of a query (longer ones are truncated and counted).", "min": 2})
    document_max_length: int = field(default=8192, metadata={"doc": "Tokens kept of a document (longer ones are truncated and counted).", "min": 2})
    max_text_chars: int = field(default=1_000_000, metadata={"doc": "A longer text is rejected with an error of its own.", "min": 1})
    max_job_texts: int = field(default=10_000, metadata={"doc": "Most texts in one job; the producer splits bigger inputs.", "min": 1})
    max_payload_bytes: int = field(default=64 * 1024 * 1024, metadata={"doc": "A job payload over this is refused before any encoding.", "min": 1})
    max_id_chars: int = field(default=512, metadata={"doc": "Longest document id accepted for Milvus.", "min": 1, "max": 512})
    job_texts: int = field(default=64, metadata={"doc": "Texts per job when the producer splits input.", "min": 1})
    max_in_flight: int = field(default=8, metadata={"doc": "Jobs a producer keeps in flight (backpressure).", "min": 1})
    job_timeout_s: float = field(default=600.0, metadata={"doc": "How long a producer waits for one job.", "above": 0})
    require_worker: bool = field(default=True, metadata={"doc": "encode, index, search and dims fail with NoWorker when no live worker serves their queue (false: jobs wait in the queue for workers that start later)."})
    no_worker_grace_s: float = field(default=10.0, metadata={"doc": "How long such a call waits for a worker's heartbeat before NoWorker (a worker is live once its model is loaded).", "min": 0})
    visibility_timeout_s: int = field(default=3600, metadata={"doc": "Last resort: Redis redelivers a job not acknowledged within this, even if its worker looks alive; longer than the longest batch.", "min": 1})
    dead_worker_s: float = field(default=30.0, metadata={"doc": "Jobs held by a worker that died (SIGKILL, out of memory, lost machine) are back on their queue within this; workers write a heartbeat every sixth of it.", "above": 0})
    result_expires_s: int = field(default=86400, metadata={"doc": "Results are deleted from the backend after this.", "min": 1})
    queue_prefix: str = field(default="m3q", metadata={"doc": "Prefix of every queue and key, to share one Redis."})
    worker_threads: int = field(default=2, metadata={"doc": "Document/index jobs one worker holds at once (threads: one encodes while the next is tokenized).", "min": 1})
    query_stream_max: int = field(default=100_000, metadata={"doc": "Most query jobs the query stream keeps while no worker reads it (approximate); older ones are dropped and their callers time out.", "min": 1})
    query_prefetch: int = field(default=64, metadata={"doc": "Query jobs a worker takes at once from the query stream (merged into few forward passes).", "min": 1})
    batch_wait_ms: float = field(default=2.0, metadata={"doc": "How long the device waits for more queries to batch together, when queries come concurrently (a lone query on an idle device runs at once).", "min": 0})
    cross_job_batching: bool = field(default=True, metadata={"doc": "Merge texts of concurrent jobs into one forward pass."})
    preempt_ms: float = field(default=25.0, metadata={"doc": "While queries arrive, document steps run in slices of about this much device work, and waiting queries run between slices (0: whole steps).", "min": 0})
    metrics_port: int = field(default=0, metadata={"doc": "Port of the worker's Prometheus endpoint; 0 turns it off.", "min": 0, "max": 65535})
    index_retries: int = field(default=5, metadata={"doc": "Retries of an index job when Milvus fails.", "min": 0})
    index_retry_backoff_s: float = field(default=2.0, metadata={"doc": "First retry delay of an index job; doubles each time.", "min": 0})
    task_max_retries: int = field(default=3, metadata={"doc": "Deliveries of a job that keeps crashing before it is recorded as failed.", "min": 0})
    # repr=False: the keys are secrets, and a settings object may end up in a log line.
    api_keys: str = field(default="", repr=False, metadata={"doc": "Bearer keys of the HTTP gateway (`m3q serve`), comma-separated: each request needs `Authorization: Bearer KEY` (/health and /metrics excepted); empty: no key needed."})
    gateway_max_in_flight: int = field(default=512, metadata={"doc": "Requests one gateway process serves at once; more are answered 429 with Retry-After (backpressure, not an unbounded queue).", "min": 1})
    gateway_max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"doc": "Largest request body the gateway reads; a bigger one is answered 413.", "min": 1})

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _out_of_range(f.metadata, getattr(self, f.name))
            if problem:
                raise ConfigError(f"{ENV_PREFIX}{f.name.upper()} (--{f.name.replace('_', '-')}) is "
                                  f"{getattr(self, f.name)!r}: {problem}")
        for name in ("broker_url", "result_backend"):
            _check_redis_url(name, getattr(self, name))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from ``M3Q_*`` variables, then apply non-None ``overrides`` (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def backend_url(self) -> str:
        """The result backend, defaulting to the broker."""
        return self.result_backend or self.broker_url


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool}.get(str(f.type), str)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a boolean (use true or false)")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None


def _out_of_range(meta: Mapping[str, Any], value: Any) -> str | None:
    """Why ``value`` is outside a field's ``min``, ``max`` or ``above`` (exclusive) bound, or None."""
    if "above" in meta and not value > meta["above"]:
        return f"it must be above {meta['above']}"
    if "min" in meta and value < meta["min"]:
        return f"it must be at least {meta['min']}"
    if "max" in meta and value > meta["max"]:
        return f"it must be at most {meta['max']}"
    return None


REDIS_URL_FORM = "redis://[:PASSWORD@]HOST[:PORT][/DB], or rediss://... for TLS"
"""The form of M3Q_BROKER_URL and M3Q_RESULT_BACKEND, as an error names it."""


def _check_redis_url(name: str, url: str) -> None:
    """A ConfigError naming the variable unless ``url`` is a Redis URL with a host (the result backend may be
    empty): m3-queue's heartbeats, query stream and sweep live in Redis, so no other broker can serve."""
    if name == "result_backend" and not url:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        problem = "its port is not a number" if "Port" in str(e) else f"it does not parse ({e})"
    else:
        problem = ("not a Redis URL" if parts.scheme not in ("redis", "rediss") else
                   "no host after the scheme" if not parts.hostname else None)
    if problem:
        masked = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1**@", url)  # as kombu masks it, which fails on a bad port
        raise ConfigError(f"{ENV_PREFIX}{name.upper()} (--{name.replace('_', '-')}) is {masked!r}: {problem}; "
                          f"expected {REDIS_URL_FORM}")


SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "redis": ("broker_url", "result_backend", "redis_tls_ca_file", "queue_prefix", "visibility_timeout_s",
              "dead_worker_s", "result_expires_s"),
    "producer": ("job_texts", "max_in_flight", "job_timeout_s", "require_worker", "no_worker_grace_s",
                 "query_stream_max", "max_payload_bytes"),
    "milvus": ("milvus_uri", "milvus_token", "milvus_port", "milvus_data_dir"),
    "model": ("model", "device", "dtype"),
    "limits": ("max_batch_tokens", "query_max_length", "document_max_length", "max_text_chars", "max_job_texts",
               "max_id_chars"),
    "worker": ("worker_threads", "query_prefetch", "batch_wait_ms", "cross_job_batching", "preempt_ms",
               "metrics_port", "index_retries", "index_retry_backoff_s", "task_max_retries", "max_payload_bytes"),
    "gateway": ("api_keys", "gateway_max_in_flight", "gateway_max_body_bytes"),
}
"""Settings by the part of m3-queue that reads them."""

COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "worker": ("redis", "model", "limits", "worker", "milvus"),
    "encode": ("redis", "producer", "model", "limits"),  # the model and limits for --local
    "index": ("redis", "producer", "model", "milvus"),
    "search": ("redis", "producer", "model", "milvus"),
    "status": ("redis",),
    "reindex": ("redis", "producer", "model", "milvus"),
    "replica": (),
    "milvus": ("milvus",),
    "serve": ("redis", "producer", "model", "limits", "milvus", "gateway"),
    "demo": ("redis", "producer", "model", "limits", "worker", "milvus"),
}
"""The setting groups each ``m3q`` command reads: its ``--help`` lists those settings, no others."""


def command_settings(command: str) -> list[str]:
    """The settings ``command`` reads, in :class:`Settings`' order."""
    names = {name for group in COMMAND_SETTINGS.get(command, ()) for name in SETTING_GROUPS[group]}
    return [f.name for f in fields(Settings) if f.name in names]


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, doc) for every setting: the source of README's table."""
    return [(ENV_PREFIX + f.name.upper(), repr(f.default), f.metadata["doc"]) for f in fields(Settings)]
