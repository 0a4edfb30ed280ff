"""The ASGI app and server of `edgetl serve`: Open Inference Protocol V2 routes on Starlette, run by uvicorn.

Requests are admitted (or refused with 503) before their body is read, bodies are read against the size limit as
they arrive, and decoding and inference happen on the model's worker threads; the event loop only moves bytes.
SIGTERM stops accepting connections, answers every admitted request, then drains the workers and exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import signal
import socket
import time
import zlib
from dataclasses import dataclass
from typing import Awaitable, Callable, List, Optional, Sequence

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

import edgetl
from edgetl.edge.serve.batcher import RETRY_AFTER_S, BatchOptions
from edgetl.edge.serve.metrics import ServeMetrics
from edgetl.edge.serve.models import VERSION, LoadedModel, ModelOptions, ModelRegistry, ModelSpec, ServedModel
from edgetl.edge.serve.protocol import (
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    InferRequest,
    RequestedOutput,
    RequestError,
    classification,
    encode_infer_response,
    parse_infer_request,
)

log = logging.getLogger("edgetl.serve")
access_log = logging.getLogger("edgetl.serve.access")
INLINE_PARSE_BYTES = 64 * 1024  # bigger JSON (pixel tensors as JSON numbers) is parsed on a thread, off the loop
DEFAULT_TOP_K = 5
PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready")  # probes work without the API key


@dataclass(frozen=True)
class ServeOptions:
    """Everything `edgetl serve` takes besides the models."""

    host: str = "127.0.0.1"
    port: int = 8000
    threads: Optional[int] = None
    runtime: str = "auto"
    batch: BatchOptions = BatchOptions()
    max_body_bytes: int = 8 * 1024 * 1024
    timeout_s: float = 10.0
    api_key: Optional[str] = None
    reload_interval_s: float = 2.0

    def model_options(self) -> ModelOptions:
        return ModelOptions(threads=self.threads, runtime=self.runtime, batch=self.batch,
                            reload_interval_s=self.reload_interval_s)


@dataclass
class ServerState:
    """`draining` is set once SIGTERM/SIGINT arrives: ready turns 503 while admitted requests finish."""

    draining: bool = False


def json_response(doc, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), status_code=status, headers=headers,
                    media_type=JSON_CONTENT_TYPE)


def error_response(exc: RequestError) -> Response:
    return json_response({"error": str(exc)}, exc.status, exc.headers)


class Service:
    """The route handlers of one server instance (its registry, limits, metrics and drain state)."""

    def __init__(self, registry: ModelRegistry, options: ServeOptions, metrics: ServeMetrics, state: ServerState):
        self.registry, self.options, self.metrics, self.state = registry, options, metrics, state
        self._key = options.api_key.encode("utf-8") if options.api_key else None

    def routes(self) -> List[Route]:
        model, version = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        table = [  # inference first: Starlette tries the routes in order
            (model + "/infer", self.infer, "POST", "infer"),
            (model + "/classify", self.classify, "POST", "classify"),
            (version + "/infer", self.infer, "POST", "infer"),
            ("/v2", self.server_metadata, "GET", None),
            ("/v2/health/live", self.live, "GET", None),
            ("/v2/health/ready", self.ready, "GET", None),
            ("/metrics", self.render_metrics, "GET", None),
        ]
        for prefix in (model, version):
            table += [(prefix, self.model_metadata, "GET", None), (prefix + "/ready", self.model_ready, "GET", None)]
        return [Route(path, self._endpoint(handler, endpoint), methods=[method]) for path, handler, method, endpoint in table]

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]], endpoint: Optional[str]):
        """Wrap a handler: API key check, RequestError -> its JSON error, anything else -> 500; count inference."""

        @functools.wraps(handler)
        async def wrapped(request: Request) -> Response:
            try:
                self._authorize(request)
                response = await handler(request)
            except RequestError as exc:
                response = error_response(exc)
            except Exception:  # a bug: log it with its traceback and say so
                log.exception("%s %s failed", request.method, request.url.path)
                response = json_response({"error": "internal server error (see the server log)"}, 500)
            if endpoint:
                name = request.path_params.get("model", "")
                self.metrics.requests.labels(name if self.registry.get(name) else "", endpoint,
                                             str(response.status_code)).inc()
            return response

        return wrapped

    def _authorize(self, request: Request) -> None:
        if self._key is None or request.url.path in PUBLIC_PATHS:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self._key):
            raise RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401,
                               headers={"WWW-Authenticate": "Bearer"})

    def _model(self, request: Request) -> ServedModel:
        name = request.path_params["model"]
        served = self.registry.get(name)
        if served is None:
            raise RequestError(f"unknown model {name!r}; serving: {', '.join(self.registry.models)}", status=404)
        version = request.path_params.get("version", VERSION)
        if version != VERSION:
            raise RequestError(f"model {name!r} has only version {VERSION}, not {version!r}", status=404)
        return served

    def _not_draining(self) -> None:
        if self.state.draining:
            raise RequestError("server is shutting down", status=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def server_metadata(self, request: Request) -> Response:
        return json_response({"name": "edgetl", "version": edgetl.__version__,
                              "extensions": ["binary_tensor_data", "classification"]})

    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        self._not_draining()
        return json_response({"ready": True})

    async def render_metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def model_metadata(self, request: Request) -> Response:
        return json_response(self._model(request).current.metadata())

    async def model_ready(self, request: Request) -> Response:
        served = self._model(request)
        self._not_draining()
        return json_response({"name": served.spec.name, "ready": True})

    async def infer(self, request: Request) -> Response:
        arrived = time.monotonic()
        served = self._model(request)
        with served.batcher.admit():
            body = await self._read_body(request, arrived + self.options.timeout_s)
            header_length = request.headers.get(HEADER_LENGTH)
            json_size = int(header_length) if header_length and header_length.isdigit() else len(body)
            if json_size > INLINE_PARSE_BYTES:
                parsed = await run_in_threadpool(parse_infer_request, body, header_length)
            else:
                parsed = parse_infer_request(body, header_length)
            model = served.current
            if len(parsed.inputs) != 1:
                raise RequestError(f"model {served.spec.name!r} takes one input, got {len(parsed.inputs)}")
            payload, count = model.payload(parsed.inputs[0])
            outputs = model.outputs(parsed.outputs, parsed.binary_output)
            finish = functools.partial(_infer_answer, parsed, outputs)
            content, headers = await served.batcher.run(payload, count, finish, self._deadline(arrived, parsed))
        return Response(content, headers=headers)

    async def classify(self, request: Request) -> Response:
        arrived = time.monotonic()
        served = self._model(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("image/"):
            raise RequestError(f"classify takes an image body (Content-Type image/jpeg, image/png, ...), got {content_type!r}")
        top_k = request.query_params.get("top_k", str(DEFAULT_TOP_K))
        if not top_k.isdigit() or int(top_k) < 1:
            raise RequestError(f"top_k must be a whole number >= 1, got {top_k!r}")
        with served.batcher.admit():
            body = await self._read_body(request, arrived + self.options.timeout_s)
            if not body:
                raise RequestError("empty body: send the image file's bytes")
            content = await served.batcher.run([body], 1, functools.partial(_classify_answer, int(top_k)),
                                               self._deadline(arrived, None))
        return Response(content, media_type=JSON_CONTENT_TYPE)

    def _deadline(self, arrived: float, parsed: Optional[InferRequest]) -> float:
        """Arrival plus --timeout-ms, or plus the request's own parameters.timeout when that is shorter."""
        timeout = self.options.timeout_s
        if parsed is not None and parsed.timeout_us:
            timeout = min(timeout, parsed.timeout_us / 1e6)
        return arrived + timeout

    async def _read_body(self, request: Request, deadline: float) -> bytes:
        """The request body, refused with 413 as soon as it passes --max-body-mb (decompressed for gzip/deflate)
        and with 408 when it has not fully arrived by the deadline (a slow sender must not hold a slot)."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)

        async def receive() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            body = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestError("the body did not arrive before the request's deadline (--timeout-ms)", status=408) from None
        except ClientDisconnect:
            raise RequestError("client disconnected before sending the whole body") from None
        return _decompress(body, request.headers.get("content-encoding", "identity"), limit)


def _too_large(limit: int) -> RequestError:
    return RequestError(f"request body is larger than the {limit / 2 ** 20:g} MB limit (--max-body-mb)", status=413)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo gzip/deflate Content-Encoding (tritonclient's request compression) without ever exceeding `limit`."""
    encoding = encoding.strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"body is not valid {encoding} data ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise _too_large(limit)
    return out


def _infer_answer(parsed: InferRequest, requested: Sequence[RequestedOutput], result):
    """(body, headers) of an infer response, built on the worker thread from (model, {output: rows})."""
    model, values = result
    outputs = []
    for out in requested:
        if out.name not in values:  # the model was reloaded with other outputs while this request queued
            raise RequestError(f"model {model.spec.name!r} was reloaded without output {out.name!r}", status=503,
                               headers={"Retry-After": str(RETRY_AFTER_S)})
        value = values[out.name]
        if out.classification:
            value = classification(value, out.classification, model.labels.get(out.name))
        outputs.append((out.name, value, out.binary))
    return encode_infer_response(model.spec.name, VERSION, parsed.id, outputs)


def _top_k(model: LoadedModel, name: str, scores: np.ndarray, k: int) -> List[dict]:
    labels = model.labels.get(name)
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"index": int(i), "label": labels[i] if labels and i < len(labels) else None, "score": float(scores[i])}
            for i in order]


def _classify_answer(k: int, result) -> bytes:
    """The /classify JSON: top-k of the first output, and of every other output (multi-task heads) under "heads"."""
    model, values = result
    first, *others = model.output_names
    doc = {"model_name": model.spec.name, "model_version": VERSION, "predictions": _top_k(model, first, values[first][0], k)}
    if others:
        doc["heads"] = {name: _top_k(model, name, values[name][0], k) for name in others}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 (no such route) and 405 (wrong method) in the protocol's error format."""
    return json_response({"error": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code, exc.headers)


class AccessLog:
    """ASGI middleware: one log line per HTTP request (client, method, path, status, bytes sent, milliseconds)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, sent = time.perf_counter(), [0], [0]

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            query = scope.get("query_string", b"").decode("latin-1")
            access_log.info('%s "%s %s%s" %d %d %.1fms', client[0], scope["method"], scope["path"],
                            f"?{query}" if query else "", status[0], sent[0], (time.perf_counter() - start) * 1000)


def create_app(registry: ModelRegistry, options: ServeOptions, metrics: ServeMetrics, state: ServerState):
    """The ASGI application; its lifespan starts the model workers and the reload watcher, and drains them."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        registry.start()
        try:
            yield
        finally:
            await run_in_threadpool(registry.stop)

    service = Service(registry, options, metrics, state)
    app = Starlette(routes=service.routes(), lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    return AccessLog(app)


class _Server(uvicorn.Server):
    """uvicorn's server, marking the app as draining the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.state.draining:
            log.info("signal %d: draining (new connections refused, admitted requests finish)", sig)
        self.state.draining = True
        super().handle_exit(sig, frame)


def _exit_cleanly(signum, frame):
    """SIGTERM outside uvicorn's handling (while loading, or re-raised by uvicorn after the drain): exit 0."""
    raise SystemExit(0)


def serve(specs: Sequence[ModelSpec], options: ServeOptions, announce: Callable[[str], None] = print) -> int:
    """Load and warm up every model, bind, announce the URL, and serve until SIGTERM/SIGINT; returns 0.

    Raises ModelError when a model cannot be loaded and OSError when the address cannot be bound.
    """
    signal.signal(signal.SIGTERM, _exit_cleanly)
    metrics = ServeMetrics()
    registry = ModelRegistry(specs, options.model_options(), metrics)
    registry.load()
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # every response (headers, then body) waits ~40 ms for the client's delayed ACK.
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    host, port = sock.getsockname()[:2]
    state = ServerState()
    config = uvicorn.Config(create_app(registry, options, metrics, state), log_config=None, access_log=False,
                            lifespan="on", server_header=False, timeout_graceful_shutdown=int(options.timeout_s) + 5)
    server = _Server(config, state)
    announce(f"edgetl serve: listening on http://{f'[{host}]' if ':' in host else host}:{port} "
             f"({len(specs)} model(s): {', '.join(s.name for s in specs)})")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
