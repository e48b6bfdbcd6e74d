"""The gateway's HTTP plumbing: error answers, request bodies, field checks and response encoders.

Errors come in two shapes, by API family, and both carry the message flat as ``message`` too, so a client
that reads either family's field finds it:

- TEI's routes (:data:`TEI_PATHS`) answer ``{"error": message, "error_type": ..., "message": message}``:
  TEI's own body, which ``huggingface_hub`` (and so Haystack) reads;
- every other route answers OpenAI's ``{"error": {"message", "type", "param", "code"}, "message": message}``:
  the ``openai`` client (and LangChain, LlamaIndex) read the object, pymilvus' ``TEIEmbeddingFunction``
  reads the flat ``message`` (TEI's own OpenAI route answers a flat body).

Either may add ``items``: the inputs rejected one by one, each with its ``index`` and ``reason``.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Awaitable, Callable, Iterable

import msgpack
import orjson
import redis
from starlette.requests import Request
from starlette.responses import Response

from producer.contract import errors, wire
from producer.contract.redis_conn import brief

log = logging.getLogger("m3q.gateway")

Endpoint = Callable[[Request], Awaitable[Response]]

JSON = "application/json"
MSGPACK = "application/msgpack"
TEI_PATHS = frozenset({"/", "/invocations", "/ping", "/embed", "/embed_sparse", "/embed_all", "/tokenize", "/decode",
                       "/info", "/rerank"})
"""Routes that answer errors in TEI's shape."""

_OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error", 500: "internal_error", 502: "worker_error", 503: "service_unavailable",
                 504: "timeout_error"}
_TEI_TYPES = {401: "Unauthorized", 404: "Validation", 405: "Validation", 409: "Validation", 413: "Validation",
              422: "Validation", 429: "Overloaded", 500: "Backend", 502: "Backend", 503: "Unhealthy", 504: "Backend"}


class ApiError(Exception):
    """A request that cannot be answered with a result: its status, a message naming what to fix, the
    field at fault (``param``), the items rejected one by one, and extra headers (Retry-After, ...)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 items: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.items, self.headers = items, headers or {}


def error_response(path: str, err: ApiError) -> Response:
    """The answer to ``err`` in the shape of ``path``'s API family."""
    if path in TEI_PATHS:
        body: dict[str, Any] = {"error": err.message, "error_type": _TEI_TYPES.get(err.status, "Backend"),
                                "message": err.message}
        if err.items is not None:
            body["items"] = err.items
    else:
        detail: dict[str, Any] = {"message": err.message, "type": _OPENAI_TYPES.get(err.status, "error"),
                                  "param": err.param, "code": err.code}
        if err.items is not None:
            detail["items"] = err.items
        body = {"error": detail, "message": err.message}
    return Response(orjson.dumps(body), err.status, err.headers, media_type=JSON)


# m3-queue's own errors (producer/contract/errors.py), most specific first: (class, status, code).
_STATUS = ((errors.NoWorker, 503, "no_worker"), (errors.JobTimeout, 504, "job_timeout"),
           (errors.BrokerError, 503, "broker"), (errors.PayloadError, 422, "payload"),
           (errors.SchemaMismatch, 409, "schema_mismatch"), (errors.MilvusRejected, 422, "milvus_rejected"),
           (errors.MilvusError, 503, "milvus_unavailable"), (errors.JobFailed, 502, "job_failed"),
           (errors.ConfigError, 422, "invalid_value"))


def api_error(e: BaseException) -> ApiError:
    """The HTTP answer to an exception raised while serving a request. Expected failures keep their message
    (m3-queue's messages name the fix and mask passwords); anything else is logged with its traceback
    under a reference that the client gets instead: no traceback ever reaches a client."""
    if isinstance(e, ApiError):
        return e
    for kind, status, code in _STATUS:
        if isinstance(e, kind):
            message = str(e)
            if kind is errors.PayloadError and "over the limit" in message:
                status, code = 413, "too_large"
            elif kind is errors.MilvusRejected and "does not exist" in message:
                status, code = 404, "no_collection"
            return ApiError(status, message, code=code)
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        return ApiError(503, f"Redis unreachable: {brief(e)}", code="broker")
    reference = uuid.uuid4().hex[:12]
    log.error("internal error %s", reference, exc_info=e)
    return ApiError(500, f"internal error (logged by the gateway as {reference})", code="internal")


# ---- request bodies -----------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"request body is {size:,} bytes or more, over the limit of {limit:,} "
                         "(M3Q_GATEWAY_MAX_BODY_BYTES); send fewer or shorter texts per request",
                    param="body", code="too_large")


async def read_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object (or msgpack, with ``Content-Type: application/msgpack``); 422 otherwise."""
    raw = await read_body(request, limit)
    if not raw:
        raise ApiError(422, "the request has no body: send a JSON object", param="body", code="invalid_body")
    if "msgpack" in request.headers.get("content-type", ""):
        try:
            body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the client's
            raise ApiError(422, f"body is not valid msgpack: {type(e).__name__}", param="body",
                           code="invalid_body") from None
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ApiError(422, f"body is not valid JSON: {e}", param="body", code="invalid_body") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"body must be a JSON object, got {describe(body)}", param="body", code="invalid_body")
    return body


def describe(value: object) -> str:
    """How an error names the JSON type of ``value``."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def invalid(param: str, message: str) -> ApiError:
    """422 for one field of the body, named in the message and in ``param``."""
    return ApiError(422, f"{param}: {message}", param=param, code="invalid_field")


def required(body: dict[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise invalid(name, "is required")
    return body[name]


def get_str(body: dict[str, Any], name: str, default: str | None = None, *, need: bool = False) -> str | None:
    """A string field (``need``: present and not blank)."""
    value = required(body, name) if need else body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {describe(value)}")
    if need and not value.strip():
        raise invalid(name, "must not be empty")
    return value


def truncation_side(body: dict[str, Any]) -> str:
    """TEI's ``truncation_direction`` ("Right", the default, or "Left") as a job's ``truncation_side``."""
    side = get_str(body, "truncation_direction", "right").lower()
    if side not in wire.TRUNCATION_SIDES:
        raise invalid("truncation_direction", f"must be 'Right' or 'Left', got {body['truncation_direction']!r}")
    return side


def get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {describe(value)}")
    return value


def get_int(body: dict[str, Any], name: str, default: int | None, low: int, high: int | None) -> int | None:
    """An integer field from ``low`` to ``high`` (None: no upper bound here; the workers check theirs)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise invalid(name, f"must be an integer {bound}, got {value!r}")
    return value


def get_choice(body: dict[str, Any], name: str, choices: Iterable[str], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    choices = tuple(choices)
    if value not in choices:
        raise invalid(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def refuse_items(status: int, field: str, rejected: list[dict[str, Any]], total: int, what: str) -> ApiError:
    """One answer for inputs rejected one by one: the first few named in the message, all in ``items``."""
    named = "; ".join(f"{field}[{r['index']}]: {r['reason']}" for r in rejected[:3])
    more = f"; and {len(rejected) - 3} more (see items)" if len(rejected) > 3 else ""
    return ApiError(status, f"{len(rejected)} of {total} {what}: {named}{more}", param=field,
                    code="too_large" if status == 413 else "invalid_input", items=rejected)


# ---- responses ----------------------------------------------------------------------------------------------

def json_response(content: Any, status: int = 200) -> Response:
    """JSON via orjson: numpy float32 arrays are written as the shortest decimals that read back to the
    same float32 values, so vectors survive the trip bit for bit."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type=JSON)


def msgpack_response(content: Any, status: int = 200) -> Response:
    return Response(msgpack.packb(content, use_bin_type=True), status, media_type=MSGPACK)


def route(app: Any, method: str, path: str) -> Callable[[Endpoint], Endpoint]:
    """Register ``endpoint(request) -> Response`` on ``app`` as a plain Starlette route: FastAPI's per-request
    dependency solving would cost about a sixth of the gateway's CPU for endpoints that take only the request."""
    def register(endpoint: Endpoint) -> Endpoint:
        app.add_route(path, endpoint, methods=[method])
        return endpoint
    return register


def endpoint(method: str, *paths: str) -> Callable[[Endpoint], Endpoint]:
    """Mark a method of a :class:`Routes` family as the endpoint of ``method`` on ``paths``."""
    def mark(function: Endpoint) -> Endpoint:
        function.m3q_routes = [(method, path) for path in paths]  # type: ignore[attr-defined]
        return function
    return mark


class Routes:
    """A family of routes, one method each, marked with :func:`endpoint`."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw  # the gateway (``producer.gateway.app.Gateway``): its client, settings, model name
        self.s = gw.settings
        self.limit = gw.settings.gateway_max_body_bytes

    def add_to(self, app: Any) -> None:
        """Register each marked method on ``app``."""
        for name in dir(type(self)):
            for method, path in getattr(getattr(type(self), name), "m3q_routes", ()):
                route(app, method, path)(getattr(self, name))


def wants_msgpack(request: Request) -> bool:
    """Whether the client asked for the compact binary form (``Accept: application/msgpack``)."""
    return "msgpack" in request.headers.get("accept", "")
