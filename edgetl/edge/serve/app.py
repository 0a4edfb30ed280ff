"""The ASGI app and server of `edgetl serve`: Open Inference Protocol V2 routes, run by uvicorn.

The inference routes (POST .../infer and .../classify) are a plain ASGI app in front of Starlette, which serves the
rest (metadata, health, metrics): the event loop's CPU per request adds to every latency at concurrency 1 and is taken
from the workers at full load, and Starlette's middleware, routing, request and response objects were about a quarter
of it (py-spy). Requests are admitted (or refused with 503) before their body is read, bodies are read against the size
limit as they arrive, and decoding and inference happen on the model's worker threads; the event loop only moves
bytes. SIGTERM stops accepting connections, answers every admitted request, then drains the workers and exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
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
ACCESS_FLUSH_S = 0.5  # the access log is written in blocks, at most this late
INLINE_PARSE_BYTES = 64 * 1024  # bigger JSON (pixel tensors as JSON numbers) is parsed on a thread, off the loop
DEFAULT_TOP_K = 5
PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready")  # probes work without the API key
JSON_HEADERS = {"content-type": JSON_CONTENT_TYPE}
Answer = Tuple[bytes, Dict[str, str]]  # a handler's 200 response: body and headers


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
    proxy_headers: bool = False  # trust X-Forwarded-For/-Proto from 127.0.0.1 (behind a reverse proxy)
    cpu_policy: str = "batch"  # "batch" | "normal": the Linux scheduling policy of the server's threads

    def model_options(self) -> ModelOptions:
        return ModelOptions(threads=self.threads, runtime=self.runtime, batch=self.batch,
                            reload_interval_s=self.reload_interval_s)


@dataclass
class ServerState:
    """`draining` is set once SIGTERM/SIGINT arrives: ready turns 503 while admitted requests finish."""

    draining: bool = False


def _json(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


class Call:
    """One request as the handlers see it: ASGI scope and receive, route parameters, lower-case headers, arrival."""

    __slots__ = ("scope", "receive", "model", "version", "endpoint", "headers", "arrived")

    def __init__(self, scope, receive, model: str = "", version: str = VERSION, endpoint: Optional[str] = None):
        self.arrived = time.monotonic()
        self.scope, self.receive, self.model, self.version, self.endpoint = scope, receive, model, version, endpoint
        self.headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


Handler = Callable[[Call], Awaitable[Answer]]


class Service:
    """The request handlers of one server instance (its registry, limits, metrics and drain state)."""

    def __init__(self, registry: ModelRegistry, options: ServeOptions, metrics: ServeMetrics, state: ServerState):
        self.registry, self.options, self.metrics, self.state = registry, options, metrics, state
        self._key = options.api_key.encode("utf-8") if options.api_key else None

    def routes(self) -> List[Route]:
        """The Starlette routes: everything but inference (see InferenceRoutes)."""
        model, version = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        table = [("/v2", self.server_metadata), ("/v2/health/live", self.live), ("/v2/health/ready", self.ready),
                 ("/metrics", self.render_metrics)]
        for prefix in (model, version):
            table += [(prefix, self.model_metadata), (prefix + "/ready", self.model_ready)]
        return [Route(path, self._endpoint(handler), methods=["GET"]) for path, handler in table]

    def _endpoint(self, handler: Handler):
        """A Starlette endpoint answering through `respond`."""

        async def endpoint(request: Request) -> Response:
            params = request.path_params
            call = Call(request.scope, request.receive, params.get("model", ""), params.get("version", VERSION))
            status, headers, body = await self.respond(handler, call)
            return Response(body, status, headers)

        return endpoint

    async def respond(self, handler: Handler, call: Call) -> Tuple[int, Dict[str, str], bytes]:
        """(status, headers, body): API key check, RequestError -> its JSON error, anything else -> 500; inference
        requests are counted by model, endpoint and status."""
        try:
            self._authorize(call)
            body, headers = await handler(call)
            status = 200
        except RequestError as exc:
            status, headers, body = exc.status, {**JSON_HEADERS, **exc.headers}, _json({"error": str(exc)})
        except Exception:  # a bug: log it with its traceback and say so
            log.exception("%s %s failed", call.scope["method"], call.scope["path"])
            status, headers, body = 500, JSON_HEADERS, _json({"error": "internal server error (see the server log)"})
        if call.endpoint:
            self.metrics.count_request(call.model if call.model in self.registry.models else "", call.endpoint, status)
        return status, headers, body

    def _authorize(self, call: Call) -> None:
        if self._key is None or call.scope["path"] in PUBLIC_PATHS:
            return
        scheme, _, token = call.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self._key):
            raise RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401,
                               headers={"WWW-Authenticate": "Bearer"})

    def _model(self, call: Call) -> ServedModel:
        served = self.registry.get(call.model)
        if served is None:
            raise RequestError(f"unknown model {call.model!r}; serving: {', '.join(self.registry.models)}", status=404)
        if call.version != VERSION:
            raise RequestError(f"model {call.model!r} has only version {VERSION}, not {call.version!r}", status=404)
        return served

    def _not_draining(self) -> None:
        if self.state.draining:
            raise RequestError("server is shutting down", status=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def server_metadata(self, call: Call) -> Answer:
        return _json({"name": "edgetl", "version": edgetl.__version__,
                      "extensions": ["binary_tensor_data", "classification"]}), JSON_HEADERS

    async def live(self, call: Call) -> Answer:
        return _json({"live": True}), JSON_HEADERS

    async def ready(self, call: Call) -> Answer:
        self._not_draining()
        return _json({"ready": True}), JSON_HEADERS

    async def render_metrics(self, call: Call) -> Answer:
        return self.metrics.render(), {"content-type": self.metrics.content_type}

    async def model_metadata(self, call: Call) -> Answer:
        return _json(self._model(call).current.metadata()), JSON_HEADERS

    async def model_ready(self, call: Call) -> Answer:
        served = self._model(call)
        self._not_draining()
        return _json({"name": served.spec.name, "ready": True}), JSON_HEADERS

    async def infer(self, call: Call) -> Answer:
        served = self._model(call)
        with served.batcher.admit():
            body = await self._read_body(call)
            header_length = call.headers.get(HEADER_LENGTH.lower())
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
            return await served.batcher.run(payload, count, finish, self._deadline(call, parsed))

    async def classify(self, call: Call) -> Answer:
        served = self._model(call)
        content_type = call.headers.get("content-type", "")
        if not content_type.startswith("image/"):
            raise RequestError(f"classify takes an image body (Content-Type image/jpeg, image/png, ...), got {content_type!r}")
        query = dict(parse_qsl(call.scope["query_string"].decode("latin-1"), keep_blank_values=True))
        top_k = query.get("top_k", str(DEFAULT_TOP_K))
        if not top_k.isdigit() or int(top_k) < 1:
            raise RequestError(f"top_k must be a whole number >= 1, got {top_k!r}")
        with served.batcher.admit():
            body = await self._read_body(call)
            if not body:
                raise RequestError("empty body: send the image file's bytes")
            content = await served.batcher.run([body], 1, functools.partial(_classify_answer, int(top_k)),
                                               self._deadline(call, None))
        return content, JSON_HEADERS

    def _deadline(self, call: Call, parsed: Optional[InferRequest]) -> float:
        """Arrival plus --timeout-ms, or plus the request's own parameters.timeout when that is shorter."""
        timeout = self.options.timeout_s
        if parsed is not None and parsed.timeout_us:
            timeout = min(timeout, parsed.timeout_us / 1e6)
        return call.arrived + timeout

    async def _read_body(self, call: Call) -> bytes:
        """The request body, refused with 413 as soon as it passes --max-body-mb (decompressed for gzip/deflate)
        and with 408 when it has not fully arrived by the deadline (a slow sender must not hold a slot).

        The deadline cancels this task from a timer rather than through asyncio.wait_for, which would run the
        reading in a task of its own for every request."""
        limit = self.options.max_body_bytes
        declared = call.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        task, expired = asyncio.current_task(), []

        def expire():
            expired.append(True)
            task.cancel()

        timer = asyncio.get_running_loop().call_later(max(0.0, call.arrived + self.options.timeout_s - time.monotonic()),
                                                      expire)
        chunks, size, more = [], 0, True
        try:
            while more:
                message = await call.receive()
                if message["type"] == "http.disconnect":
                    raise RequestError("client disconnected before sending the whole body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
                more = message.get("more_body", False)
        except asyncio.CancelledError:
            if not expired:  # cancelled by the server (shutdown), not by the deadline
                raise
            if sys.version_info >= (3, 11):
                task.uncancel()
            raise RequestError("the body did not arrive before the request's deadline (--timeout-ms)", status=408) from None
        finally:
            timer.cancel()
        return _decompress(b"".join(chunks), call.headers.get("content-encoding", "identity"), limit)


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
    return Response(_json({"error": f"{request.method} {request.url.path}: {exc.detail}"}), exc.status_code,
                    {**JSON_HEADERS, **(exc.headers or {})})


def _log_access(scope, status: int, sent: int, start: float) -> None:
    """The access-log line of one HTTP request: client, method, path, status, bytes sent, milliseconds."""
    client = scope.get("client") or ("-", 0)
    query = scope.get("query_string", b"").decode("latin-1")
    access_log.info('%s "%s %s%s" %d %d %.1fms', client[0], scope["method"], scope["path"],
                    f"?{query}" if query else "", status, sent, (time.perf_counter() - start) * 1000)


def _inference_route(path: str) -> Optional[Tuple[str, str, str]]:
    """(model, version, endpoint) of /v2/models/M/infer, /v2/models/M/versions/V/infer or /v2/models/M/classify."""
    if not path.startswith("/v2/models/"):
        return None
    parts = path[len("/v2/models/"):].split("/")
    if len(parts) == 2 and parts[1] in ("infer", "classify"):
        return parts[0], VERSION, parts[1]
    if len(parts) == 4 and parts[1] == "versions" and parts[3] == "infer":
        return parts[0], parts[2], "infer"
    return None


async def _post_only(call: Call) -> Answer:
    raise RequestError(f"{call.scope['method']} {call.scope['path']}: Method Not Allowed", status=405,
                       headers={"Allow": "POST"})


class InferenceRoutes:
    """ASGI: the inference routes answered here in one pass (route, handler, two sends, one log line); every other
    request and the lifespan go to `app`."""

    def __init__(self, service: Service, app):
        self.service, self.app = service, app

    async def __call__(self, scope, receive, send):
        route = _inference_route(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            return await self.app(scope, receive, send)
        start, status, sent = time.perf_counter(), 500, 0
        call = Call(scope, receive, *route)
        if scope["method"] != "POST":
            handler = _post_only
        else:
            handler = self.service.infer if call.endpoint == "infer" else self.service.classify
        try:
            status, headers, body = await self.service.respond(handler, call)
            raw = [(b"content-length", str(len(body)).encode("latin-1"))]
            raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": body})
            sent = len(body)
        finally:
            _log_access(scope, status, sent, start)


class AccessLog:
    """ASGI middleware: the access-log line of every request that InferenceRoutes passes on."""

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
            _log_access(scope, status[0], sent[0], start)


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
    return InferenceRoutes(service, AccessLog(app))


class _BlockAccessLog(logging.StreamHandler):
    """The access log's handler: lines go to a block-buffered stream written out every ACCESS_FLUSH_S and at exit,
    not with a write(2) per request as a StreamHandler on line-buffered stderr does (a line per request is the one
    log write on the hot path)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise into the request
            self.handleError(record)


@contextlib.contextmanager
def _access_log_in_blocks():
    """Route edgetl.serve.access through a _BlockAccessLog on stderr (with the root handler's format) and flush it
    every ACCESS_FLUSH_S from a thread until the server exits, then once more."""
    stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", errors="replace", closefd=False)
    handler = _BlockAccessLog(stream)
    root = logging.getLogger().handlers
    handler.setFormatter(root[0].formatter if root else logging.Formatter("%(asctime)s %(message)s"))
    access_log.addHandler(handler)
    access_log.propagate = False
    done = threading.Event()

    def flush_until_done():
        while not done.wait(ACCESS_FLUSH_S):
            handler.flush()

    flusher = threading.Thread(target=flush_until_done, name="edgetl-access-log", daemon=True)
    flusher.start()
    try:
        yield
    finally:
        done.set()
        flusher.join()
        access_log.removeHandler(handler)
        access_log.propagate = True
        stream.close()  # flushes; stderr's descriptor stays open (closefd=False)


def _set_cpu_policy(policy: str) -> None:
    """Put the process's threads, and so every thread they start (workers, thread pool), under SCHED_BATCH on Linux:
    a thread that wakes (the event loop on a new request, a worker given a job) then does not preempt a running
    inference, which keeps its caches warm; an idle core still takes a waking thread at once, so an unloaded
    request waits no longer. Measured on 2 cores at concurrency 8 (wrk -c8, 8 s): 387 and 426 requests per s against
    366 and 370 under the normal policy, the workers' CPU per request 4.3-4.7 ms against 4.7-4.9. "normal" leaves it."""
    if policy != "batch" or not hasattr(os, "SCHED_BATCH"):
        return
    threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in threads:  # this one, and those already started by imports (BLAS, runtimes)
        with contextlib.suppress(ProcessLookupError):  # a thread that ended since the listing
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))


def _lighten_logging() -> None:
    """Skip the per-record work no log line here shows (caller's file and line, thread, process), as the logging
    HOWTO's "Optimization" section describes: the access log writes a record per request."""
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


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
    _set_cpu_policy(options.cpu_policy)
    _lighten_logging()
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
                            lifespan="on", server_header=False, proxy_headers=options.proxy_headers,
                            timeout_graceful_shutdown=int(options.timeout_s) + 5)
    server = _Server(config, state)
    announce(f"edgetl serve: listening on http://{f'[{host}]' if ':' in host else host}:{port} "
             f"({len(specs)} model(s): {', '.join(s.name for s in specs)})")
    try:
        with _access_log_in_blocks():
            server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
