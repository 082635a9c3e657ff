"""The gateway's HTTP surface: `create_app(config)` returns the ASGI app (FastAPI).

    POST /predict   multipart field `file` (one or several) or a raw audio body
    GET  /          the web page (package data, no external resources)
    GET  /health    live: the process answers
    GET  /ready     200 only while Triton's model is ready, else 503
    GET  /metrics   Prometheus
    GET  /docs, /openapi.json

Every refusal is JSON `{"error", "error_kind"}` with its status (see errors.py); the body
is read only after the cheap checks (key, media type, declared length, room for a slot),
in one of the upload places, and a slot is taken once it is in. A client that disconnects
then cancels its classification. Connection-level bounds (header deadline, connection
caps, lingering close after an early answer) are in server.py.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures, whose
# types (Request) are imported inside create_app, at definition time.

import asyncio
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

from e2v.client.gateway import parameters
from e2v.client.gateway.auth import check_key
from e2v.client.gateway.config import GatewayConfig
from e2v.client.gateway.docs import add_docs_routes
from e2v.client.gateway.errors import (
    BAD_PARAMETER,
    BAD_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    TOO_LARGE,
    UNAVAILABLE,
    GatewayError,
    file_status,
)
from e2v.client.gateway.schemas import (
    BatchOut,
    CallsOut,
    ErrorOut,
    FileOut,
    HealthOut,
    ReadyOut,
)
from e2v.client.gateway.server import client_key
from e2v.client.gateway.service import Gateway
from e2v.client.gateway.uploads import (
    FIELD,
    MAX_PART_HEADER_BYTES,
    MAX_PART_HEADERS,
    RAW_MEDIA_PREFIXES,
    RAW_MEDIA_TYPES,
    BodyReader,
    UploadPool,
    Uploads,
    check_media,
    read_multipart,
    read_raw,
    too_large_message,
)
from e2v.client.results import model_labels

from e2v.contract import (
    CALL_EVENTS_PATH,
    CALL_ID_PATTERN,
    CALLS_PATH,
    GATEWAY_LIVE_PATH,
    GATEWAY_METRICS_PATH,
    GATEWAY_PREDICT_PATH,
    GATEWAY_READY_PATH,
)

# The page and its assets, served from memory: a fixed set, no path ever comes from a request.
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
STATIC["live-worklet.js"] = "text/javascript"  # the page's live mode (an AudioWorklet module)
PAGE_HEADERS = {
    # Everything comes from this origin; the page runs no inline code.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
ENDPOINTS = {
    "/",
    GATEWAY_LIVE_PATH,
    GATEWAY_READY_PATH,
    GATEWAY_METRICS_PATH,
    GATEWAY_PREDICT_PATH,
    CALLS_PATH,
}
SSE_HEADERS = {"X-Accel-Buffering": "no"}  # nginx: do not buffer the event stream

ERROR_RESPONSES = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "malformed request or a query value out of range (`bad_request`, `bad_parameter`)",
        401: "API key missing or wrong (`unauthorized`)",
        408: "the body arrived too slowly (`read_timeout`)",
        413: "body over --max-upload-mb (`too_large`), checked while it streams in",
        415: "a Content-Type that cannot hold audio (`unsupported_media`)",
        422: "undecodable, empty, too short or too long audio, or no audio stream",
        429: "every slot and the queue are taken (`busy`); see Retry-After",
        502: "Triton failed on the request (`server`, `inference`)",
        503: "Triton unreachable or its model not ready (`unavailable`); see Retry-After",
    }.items()
}


def predict_body(config: GatewayConfig) -> dict:
    """The request body of POST /predict for the OpenAPI document (what FastAPI cannot
    infer: the body is read by the handler itself, as it streams in)."""
    raw = {"type": "string", "format": "binary"}
    limit = f"at most {config.max_upload_bytes / 2**20:g} MiB (--max-upload-mb)"
    files = {
        "type": "array",
        "items": raw,
        "minItems": 1,
        "maxItems": config.max_files,
        "description": f"one to {config.max_files} files (--max-files), each part with at "
        f"most {MAX_PART_HEADERS} headers of {MAX_PART_HEADER_BYTES} bytes",
    }
    multipart = {
        "type": "object",
        "properties": {FIELD: files},
        "required": [FIELD],
        "additionalProperties": False,
    }
    raw_types = [f"{prefix}*" for prefix in RAW_MEDIA_PREFIXES] + list(RAW_MEDIA_TYPES)
    # What a part holds (the gateway reads its bytes whatever its own Content-Type says).
    encoding = {FIELD: {"contentType": ", ".join(raw_types)}}
    return {
        "requestBody": {
            "required": True,
            "description": f"the recording(s), {limit} in all; any container FFmpeg reads",
            "content": {
                "multipart/form-data": {"schema": multipart, "encoding": encoding},
                **{media: {"schema": raw} for media in raw_types},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}, {}],  # a key only with --api-key-file
    }


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def create_app(config: GatewayConfig):
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    gateway = Gateway(config)
    upload_pool = UploadPool(config.max_uploads)
    assets = {name: _asset(name) for name in ("index.html", *STATIC)}

    @asynccontextmanager
    async def lifespan(_app):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="emotion2vec gateway",
        summary="Speech emotion recognition: upload a recording, get emotions over time.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served from this process below (air-gapped sites: no CDN)
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.state.uploads = upload_pool

    def openapi() -> dict:
        """Made again once the model's labels are known (they are in the alert pattern)."""
        labels = tuple(gateway.info.labels) if gateway.info else None
        if app.openapi_schema is None or app.state.openapi_labels != labels:
            app.openapi_schema = None
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            predict = schema["paths"][GATEWAY_PREDICT_PATH]["post"]
            parameters.publish(predict["parameters"], labels)
            _drop_validation_errors(schema)
            app.state.openapi_labels = labels
        return app.openapi_schema

    app.openapi = openapi

    def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
        gateway.metrics.errors.labels(exc.kind).inc()
        return JSONResponse(exc.body(), exc.status, headers={**exc.headers(), **(headers or {})})

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request, exc: GatewayError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
        )
        return error_response(GatewayError(400, BAD_PARAMETER, problems or "invalid request"))

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        kinds = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}
        error = GatewayError(exc.status_code, kinds.get(exc.status_code, "http"), str(exc.detail))
        return error_response(error, allow_header(exc.headers))

    @app.exception_handler(Exception)
    async def _bug(_request, exc: Exception):  # a bug: JSON like every other answer
        message = f"internal error: {type(exc).__name__} (a bug; the gateway log has details)"
        return error_response(GatewayError(500, "internal", message))

    app.add_middleware(_Observe, gateway=gateway)
    add_docs_routes(app, app.title)

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(assets["index.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise GatewayError(404, NOT_FOUND, "no such file")
        return Response(assets[name], media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get(GATEWAY_LIVE_PATH, response_model=HealthOut, tags=["probes"])
    async def health():
        """Liveness: the process answers (Triton is not asked)."""
        return {"status": "ok"}

    @app.get(
        GATEWAY_READY_PATH,
        response_model=ReadyOut,
        responses={503: ERROR_RESPONSES[503]},
        tags=["probes"],
    )
    async def ready():
        """Readiness: 200 only while Triton's model is ready."""
        if gateway.live.draining:
            raise GatewayError(503, UNAVAILABLE, "draining: the gateway is shutting down")
        if not await gateway.ready():
            raise GatewayError(503, UNAVAILABLE, gateway.not_ready())
        info = gateway.info
        return {
            "status": "ready",
            "model": info.name,
            "synthetic": info.synthetic,
            "labels": model_labels(info),
        }

    @app.get(GATEWAY_METRICS_PATH, include_in_schema=False)
    async def metrics():
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    @app.post(
        GATEWAY_PREDICT_PATH,
        response_model=FileOut | BatchOut,
        responses=ERROR_RESPONSES,
        openapi_extra=predict_body(config),
        tags=["predict"],
    )
    async def predict(
        request: Request,
        # Patterns and descriptions of segment, alert and parties: client/gateway/parameters.py
        segment: str = Query("vad", max_length=parameters.MAX_SEGMENT_CHARS),
        alert: str | None = Query(None, max_length=parameters.MAX_QUERY_CHARS),
        embeddings: bool = Query(False, description="add each segment's embedding vector"),
        channels: Literal["mix", "split"] = Query(
            "mix", description="`split`: each channel its own party (`parties` list)"
        ),
        parties: str | None = Query(None, max_length=parameters.MAX_QUERY_CHARS),
        filename: str | None = Query(
            None,
            max_length=parameters.MAX_QUERY_CHARS,
            description="the name of a raw-body upload (any text; shown escaped to one line)",
        ),
    ):
        """Classify recordings: multipart field `file` (one or several files), or the raw
        file as the body (`Content-Type: audio/*`, `video/*` or `application/octet-stream`).

        One file: its result (or its error, with a 4xx/5xx status). Several: `results`,
        one entry per file in upload order, each a result or an error row (status 200).
        Any container FFmpeg reads works; audio is resampled to 16 kHz mono.
        """
        check_key(request, config.api_key)
        kind, params = check_media(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_upload_bytes:
            raise GatewayError(413, TOO_LARGE, too_large_message(config.max_upload_bytes))
        options = gateway.options(segment, alert, channels, parties)
        gateway.admission.check_room()
        uploads = Uploads()
        try:
            reader = BodyReader(
                request.receive, config.max_upload_bytes, config.read_timeout_s, uploads
            )
            with upload_pool.place(reader, client_key(request.client)):
                if kind == "multipart/form-data":
                    await read_multipart(
                        reader, params.get("boundary"), config.max_files, config.spool_dir
                    )
                else:
                    await read_raw(reader, _raw_name(filename), config.spool_dir)
            async with gateway.admission.slot():
                work = gateway.classify(uploads.files, options, embeddings)
                results = await unless_disconnected(request.receive, work)
        finally:
            uploads.close()
            gateway.metrics.upload_bytes.inc(uploads.received)
        if len(results) > 1:
            return JSONResponse({"results": results})
        return JSONResponse(results[0], file_status(results[0].get("error_kind")))

    _add_live_routes(app, gateway)
    return app


def _add_live_routes(app, gateway: Gateway) -> None:
    """The live tier's WebSockets, and its Server-Sent Events route: an HTTP route, with
    the gateway's key check and errors."""
    from e2v.client.live.routes import add_live_routes, after_seq, event_stream, valid_call_id
    from fastapi import Path, Query, Request
    from fastapi.responses import StreamingResponse

    add_live_routes(app, gateway.live)

    @app.get(
        CALLS_PATH,
        tags=["live"],
        response_model=CallsOut,
        responses={
            400: {"model": ErrorOut, "description": "`alerting` is not a boolean"},
            401: ERROR_RESPONSES[401],
            503: {"model": ErrorOut, "description": "the bus is unreachable (`unavailable`)"},
        },
    )
    async def calls(
        request: Request,
        alerting: bool = Query(False, description="only calls that fired an alert"),
    ):
        """The live calls: with `--bus`, every replica's; else this gateway's. Each with
        its protocol, parties, start, replica, each party's latest emotion and confidence,
        and the alerts fired. Alerting calls come first, then the newest."""
        check_key(request, gateway.config.api_key)
        try:
            rows = await gateway.live.calls(alerting)
        except Exception as exc:  # noqa: BLE001 - the bus is down: a 503 that says so
            raise GatewayError(503, UNAVAILABLE, f"the bus is unreachable: {exc!r}"[:300]) from None
        return {"calls": rows, "fleet": gateway.live.bus.shared}

    @app.get(
        CALL_EVENTS_PATH,
        tags=["live"],
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "events of the call"},
            400: {"model": ErrorOut, "description": f"call_id is not {CALL_ID_PATTERN}"},
            401: {"model": ErrorOut, "description": "API key missing or wrong"},
        },
    )
    async def call_events(
        request: Request,
        # Published, and checked below (a 400 that names the rule): not validated twice.
        call_id: str = Path(json_schema_extra={"pattern": f"^{CALL_ID_PATTERN}$"}),
    ):
        """Server-Sent Events: every event of the live call `call_id` (`event:` is its
        type, `id:` its seq, `data:` its JSON), until its summary, wherever it runs (with
        `--bus`); waits up to --live-subscribe-wait-s (30 s) for a call that has not
        started. `Last-Event-ID: SEQ` resumes after that event. A refusal or an overflow
        comes as an `error` event."""
        check_key(request, gateway.config.api_key)
        if not valid_call_id(call_id):
            raise GatewayError(400, BAD_PARAMETER, f"call_id must match {CALL_ID_PATTERN}")
        after = after_seq(request.headers.get("last-event-id"))
        return StreamingResponse(
            event_stream(gateway.live, call_id, after),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )


async def unless_disconnected(receive, work: Awaitable):
    """`work`'s result; if the client disconnects first, `work` is cancelled (decoding
    stops at its next chunk, queued segments and unsent Triton requests are dropped)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise GatewayError(400, BAD_REQUEST, "the client closed the connection")
        return task.result()
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _disconnect(receive) -> None:
    """Returns when the client goes away (the body is fully read before this runs)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _drop_validation_errors(schema: dict) -> None:
    """Remove FastAPI's default 422 (its validation errors are answered 400 here, as
    `bad_parameter`) and the components only it used."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            default = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in str(default):
                del operation["responses"]["422"]
    components = schema.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in str(schema["paths"]):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def allow_header(headers: dict[str, str] | None) -> dict[str, str]:
    """The router's headers (a 405's `Allow`, which RFC 9110 requires), methods in order."""
    headers = dict(headers or {})
    if "Allow" in headers:
        headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
    return headers


def _raw_name(filename: str | None) -> str:
    from e2v.client.names import display_name

    return display_name(filename) if filename else "upload"


def _asset(name: str) -> bytes:
    return (resources.files("e2v.client.gateway") / "static" / name).read_bytes()


class _Observe:
    """Pure ASGI middleware: requests by endpoint and status, latency, and headers that
    keep responses out of caches and content sniffing."""

    def __init__(self, app, gateway: Gateway):
        self.app, self.metrics = app, gateway.metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = (
            path if path in ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        )
        status = {"code": 500}

        async def send_observed(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                if endpoint != "/static":
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_observed)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
