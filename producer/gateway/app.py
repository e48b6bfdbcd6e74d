"""The gateway's ASGI app: one producer :class:`~producer.client.Client` per process, shared by every request.

Requests never wait on a thread of their own: encoding goes through the client's native asyncio paths (the
process's reply reader for the query stream, the result backend's pub/sub connection). Only the blocking
calls that have no asyncio form (Milvus, a worker check, the submission of index jobs) run on the event loop's default
executor, a small fixed pool.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from producer.client import Client
from producer.contract.redis_conn import brief
from producer.contract.settings import Settings
from producer.contract.wire import model_identity
from producer.gateway import encode, jobs, rerank, tei
from producer.gateway.guard import Guard, Metrics
from producer.gateway.http import ApiError, api_error, error_response, json_response

log = logging.getLogger("m3q.gateway")


class Gateway:
    """What the routes share: settings, the client, the searcher, the job store, the metrics."""

    def __init__(self, settings: Settings) -> None:
        from producer.search import Searcher  # pymilvus (0.5 s): imported by the app, not by `import producer.gateway`

        self.settings = settings
        self.client = Client(settings)
        self.searcher = Searcher(settings, client=self.client)
        self.jobs = jobs.JobStore(settings, self.client.app.backend)
        self.metrics = Metrics()
        self.model = model_identity(settings.model)

    async def health(self, request: Request) -> Response:
        """200 with the live workers' count; 503 when none answers (or Redis does not)."""
        try:
            workers = await asyncio.to_thread(self.client.workers)
        except Exception as e:  # noqa: BLE001 - Redis down: unhealthy, said in one line
            error = f"Redis unreachable: {brief(e)}"
            return json_response({"status": "unavailable", "workers": 0, "error": error}, 503)
        if not workers:
            return json_response({"status": "no_worker", "workers": 0, "error": (
                f"no live worker serves queue prefix {self.settings.queue_prefix!r}: start one with `m3q worker` "
                "on the same M3Q_BROKER_URL and M3Q_QUEUE_PREFIX; `m3q status` shows them")}, 503)
        return json_response({"status": "ok", "workers": len(workers)})

    async def prometheus(self, request: Request) -> Response:
        """The gateway's own metrics, in Prometheus' text format."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def aclose(self) -> None:
        """Close the connections this process holds, once uvicorn has drained the requests in flight."""
        await self.jobs.aclose()
        close = getattr(self.searcher, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
        await self.client.aclose()  # this loop's reply reader and result listener, the Celery app's pools


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway as an ASGI app (settings from ``M3Q_*`` variables when not given)."""
    gw = Gateway(settings or Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        try:
            await gw.aclose()
        except Exception as e:  # noqa: BLE001 - on the way out: say it, do not fail the shutdown
            log.warning("closing the gateway's connections: %s", e)

    app = FastAPI(title="m3-queue gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw
    encode.add_routes(app, gw)
    tei.add_routes(app, gw)
    rerank.add_routes(app, gw)
    jobs.add_routes(app, gw)
    for path in ("/health", "/", "/ping"):  # TEI's health routes: "/" for its own clients, "/ping" for SageMaker
        app.add_route(path, gw.health, methods=["GET"])
    app.add_route("/metrics", gw.prometheus, methods=["GET"])
    _answer_errors(app)
    routes = [r for r in app.routes if getattr(r, "path_regex", None) is not None]
    app.add_middleware(Guard, settings=gw.settings, metrics=gw.metrics, routes=routes)
    return app


def _answer_errors(app: FastAPI) -> None:
    """The app's own failures (an ApiError, no route) become JSON answers in their route's shape."""

    async def on_error(request: Request, e: Exception) -> Response:
        return error_response(request.url.path, api_error(e))

    async def on_http(request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(request.url.path, ApiError(e.status_code, message, code="no_route",
                                                         headers=dict(e.headers or {})))

    app.add_exception_handler(ApiError, on_error)
    app.add_exception_handler(HTTPException, on_http)
    # Any other exception reaches the Guard, which answers it (Starlette's handler for Exception would log
    # m3-queue's expected errors with a traceback each).


def app_from_env() -> Any:
    """``uvicorn --factory producer.gateway.app:app_from_env``: the app with settings from the environment."""
    return create_app()
