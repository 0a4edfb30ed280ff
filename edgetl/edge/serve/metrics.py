"""Prometheus metrics of one server instance, in a registry of its own (no process-global state).

Request counts by model, endpoint and status code; queue depth and admitted requests; batch size; time queued
and time computing; model reloads and whether the file on disk currently fails to load.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Every metric `edgetl serve` exports; `render()` is the /metrics body.

    The series written per request are looked up once and kept (`labels()` takes a lock and builds a key each call).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edgetl_requests", "Inference requests answered, by model, endpoint and HTTP status "
                                "code (model is empty for an unknown model name).", ["model", "endpoint", "code"], registry=r)
        self.queue_depth = Gauge("edgetl_queue_depth", "Jobs waiting for a worker.", ["model"], registry=r)
        self.admitted = Gauge("edgetl_admitted_requests", "Requests admitted and not yet answered (reading, queued or "
                              "computing); at --max-queue plus workers x max-batch the next one gets 503.", ["model"], registry=r)
        self.batch_size = Histogram("edgetl_batch_size", "Images per interpreter call.", ["model"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_seconds = Histogram("edgetl_queue_seconds", "Time a job waited in the queue before a worker took it.",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("edgetl_compute_seconds", "Time a worker spent on one batch: image decoding, "
                                         "inference and encoding the responses.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.reloads = Counter("edgetl_model_reloads", "Reloads after the model file was replaced, by result (ok, failed).",
                               ["model", "result"], registry=r)
        self.reload_failed = Gauge("edgetl_model_reload_failed", "1 while the file on disk failed to load and the "
                                   "previous model still serves, else 0.", ["model"], registry=r)
        self.generation = Gauge("edgetl_model_generation", "How many times the model has been loaded (1 = the file "
                                "served since start).", ["model"], registry=r)
        self._request_series: Dict[Tuple[str, str, int], Any] = {}
        self._batch_series: Dict[str, Tuple[Any, Any, Any]] = {}

    def add_model(self, name: str, queue_depth: Callable[[], float], admitted: Callable[[], float]) -> None:
        """Create a model's series up front (so they read 0 rather than being absent) with live gauges."""
        self.queue_depth.labels(name).set_function(queue_depth)
        self.admitted.labels(name).set_function(admitted)
        self.reload_failed.labels(name).set(0)
        for result in ("ok", "failed"):
            self.reloads.labels(name, result)
        self._batch_series[name] = (self.batch_size.labels(name), self.queue_seconds.labels(name),
                                    self.compute_seconds.labels(name))

    def count_request(self, model: str, endpoint: str, code: int) -> None:
        """One answered inference request (event loop thread only)."""
        series = self._request_series.get((model, endpoint, code))
        if series is None:
            series = self._request_series[model, endpoint, code] = self.requests.labels(model, endpoint, str(code))
        series.inc()

    def observe_batch(self, name: str, images: int, queue_waits: Sequence[float], compute_s: float) -> None:
        """One worker call: its size, how long each of its jobs queued, and how long it took."""
        batch_size, queue_seconds, compute_seconds = self._batch_series[name]
        batch_size.observe(images)
        for wait in queue_waits:
            queue_seconds.observe(wait)
        compute_seconds.observe(compute_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
