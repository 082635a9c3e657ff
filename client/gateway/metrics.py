"""Prometheus metrics of one gateway process (`GET /metrics`).

Requests by endpoint and status, latency, audio seconds, files and errors by kind, and
where the time goes: per-file decoding and VAD, per-call inference. `process_*` (CPU
seconds, memory) come with it, so audio seconds per CPU second is one PromQL division.
"""

from __future__ import annotations

from collections.abc import Callable

# Request latency: from a short clip (~50 ms) to an hour-long call.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 600)
# Per-stage time: decoding a short clip takes milliseconds.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


class GatewayMetrics:
    def __init__(self, in_flight: Callable[[], float], queued: Callable[[], float]):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = Counter(
            "e2v_gateway_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "e2v_gateway_request_duration_seconds",
            "Time from request start to response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage = Histogram(
            "e2v_gateway_stage_duration_seconds",
            "decode and vad: per file, in the worker thread; inference: per Triton call",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.audio = Counter(
            "e2v_gateway_audio_seconds", "Seconds of audio classified", registry=registry
        )
        self.upload_bytes = Counter(
            "e2v_gateway_upload_bytes", "Request body bytes received", registry=registry
        )
        self.files = Counter(
            "e2v_gateway_files", "Files by outcome (ok or error)", ["outcome"], registry=registry
        )
        self.errors = Counter(
            "e2v_gateway_errors",
            "Refused requests and failed files by error_kind",
            ["kind"],
            registry=registry,
        )
        in_flight_gauge = Gauge(
            "e2v_gateway_in_flight_requests",
            "Requests holding a slot (uploading, decoding or waiting for Triton)",
            registry=registry,
        )
        in_flight_gauge.set_function(in_flight)
        queued_gauge = Gauge(
            "e2v_gateway_queued_requests", "Requests waiting for a slot", registry=registry
        )
        queued_gauge.set_function(queued)
        self.triton_ready = Gauge(
            "e2v_gateway_triton_ready",
            "1 when Triton's model answered ready at the last check, else 0",
            registry=registry,
        )

    def observe_file(self, kind: str | None, audio_s: float | None, times) -> None:
        """One file's outcome and its stage times (a client.classify.StageTimes)."""
        self.files.labels("ok" if kind is None else "error").inc()
        if kind is not None:
            self.errors.labels(kind).inc()
        if audio_s:
            self.audio.inc(audio_s)
        if times.decode_s or audio_s:
            self.stage.labels("decode").observe(times.decode_s)
            self.stage.labels("vad").observe(times.vad_s)
        for seconds in times.inference_s:
            self.stage.labels("inference").observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
