"""What every request passes first: the API key, the in-flight bound, and the gateway's own metrics.

A plain ASGI middleware (no per-request task or thread): it answers 401 and 429 itself, before the request
reaches a route, and times every request, rejected ones included. The health probes and ``/metrics`` need
no key and are never refused for load, so that load balancers and Prometheus see a busy gateway as it is.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from producer.contract.settings import Settings
from producer.gateway.http import ApiError, api_error, error_response, log

OPEN_ROUTES = frozenset({("GET", "/health"), ("GET", "/"), ("GET", "/ping"), ("GET", "/metrics")})
"""Reachable without a key and never refused for load: the health probes (TEI's ``GET /`` and ``/ping``
among them) and the metrics."""
RETRY_AFTER_S = 1
"""What a 429 tells the client to wait: in-flight requests of this gateway finish in milliseconds."""
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def api_keys(s: Settings) -> list[str]:
    """The keys of ``M3Q_API_KEYS`` (comma-separated, blanks dropped)."""
    return [k.strip() for k in s.api_keys.split(",") if k.strip()]


class Metrics:
    """The gateway's own Prometheus registry (not the process-wide default one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("m3q_gateway_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.errors = Counter("m3q_gateway_errors", "HTTP answers with status >= 400, by route and status",
                              ["route", "status"], registry=self.registry)
        self.latency = Histogram("m3q_gateway_request_seconds", "Time from request to the end of its answer",
                                 ["route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.in_flight = Gauge("m3q_gateway_in_flight", "Requests being served now", registry=self.registry)
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request (label lookups cached: this runs for every request)."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            error = self.errors.labels(route, str(status)) if status >= 400 else None
            children = self._children[key] = (self.requests.labels(route, method, str(status)),
                                              self.latency.labels(route), error)
        children[0].inc()
        children[1].observe(seconds)
        if children[2] is not None:
            children[2].inc()


class Guard:
    """ASGI middleware: API key (401), in-flight bound (429), metrics for every request."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, routes: list[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.max_in_flight = settings.gateway_max_in_flight
        # Keys are compared as SHA-256 digests with hmac.compare_digest: constant time, and the same length
        # whatever the key, so the comparison tells nothing about a key's length either.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in api_keys(settings)]
        # Route templates for the metrics' labels, matched here: which scope keys a router sets varies
        # between FastAPI versions.
        self._static = {r.path for r in routes if "{" not in r.path}
        self._templated = [(r.path, r.path_regex) for r in routes if "{" in r.path]
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        status = 0  # not answered yet

        async def send_counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # The bound counts guarded requests only: probes never take a request's place.
        guarded = (scope["method"], path) not in OPEN_ROUTES
        refusal = self._refusal(scope) if guarded else None
        self.in_flight += guarded
        self.metrics.in_flight.inc()
        try:
            if refusal is not None:
                await error_response(path, refusal)(scope, receive, send_counted)
            else:
                await self._answered(scope, receive, send_counted, lambda: status)
        finally:
            self.in_flight -= guarded
            self.metrics.in_flight.dec()
            self.metrics.record(self._route(scope), scope["method"], status or 500, time.perf_counter() - started)

    async def _answered(self, scope: Scope, receive: Callable, send: Callable, status: Callable[[], int]) -> None:
        """Run the app; a failure it did not answer becomes an error answer here, in one place: m3-queue's
        expected errors (no worker, a job timeout, Milvus) as one log line, anything else with its traceback
        in the log and a reference in the answer (:func:`~producer.gateway.http.api_error`)."""
        try:
            await self.app(scope, receive, send)
        except Exception as e:  # noqa: BLE001 - every failure gets an HTTP answer, none a traceback
            if status():
                raise  # the answer has started: nothing else can be sent
            error = api_error(e)  # logs an unexpected error with its traceback
            if error.code != "internal":
                log.log(logging.WARNING if error.status >= 500 else logging.INFO, "%s %s: %d %s", scope["method"],
                        scope["path"], error.status, error.message)
            await error_response(scope["path"], error)(scope, receive, send)

    def _refusal(self, scope: Scope) -> ApiError | None:
        if self._digests and not self._authorized(scope):
            return ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with one of the "
                                 "keys in the gateway's M3Q_API_KEYS", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        if self.in_flight >= self.max_in_flight:
            return ApiError(429, f"the gateway is serving {self.in_flight} requests, its limit "
                                 f"(M3Q_GATEWAY_MAX_IN_FLIGHT={self.max_in_flight}); retry after "
                                 f"{RETRY_AFTER_S} s or send to another gateway", code="overloaded",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        return None

    def _authorized(self, scope: Scope) -> bool:
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                break
        if token is None:
            return False
        digest = hashlib.sha256(token.strip()).digest()
        found = False
        for known in self._digests:  # every key is compared, so the time does not tell which one matched
            found |= hmac.compare_digest(digest, known)
        return found

    def _route(self, scope: Scope) -> str:
        """The route's template (``/v1/jobs/{job_id}``), not the path: a bounded set of label values."""
        path = scope["path"]
        if path in self._static:
            return path
        return next((template for template, regex in self._templated if regex.match(path)), "other")
