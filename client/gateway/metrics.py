"""Prometheus metrics of one gateway process (`GET /metrics`).

Requests by endpoint and status, latency, audio seconds, files and errors by kind, and
where the time goes: per-file decoding and VAD, per-call inference. `process_*` (CPU
seconds, memory) come with it, so audio seconds per CPU second is one PromQL division.
"""

from __future__ import annotations

from collections.abc import Callable

# Request latency: from a short clip (~50 ms) to an hour-long call.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 600)
# Live event latency (audio seconds behind the stream) and session lengths.
LIVE_LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30)
LIVE_DURATION_BUCKETS = (1, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400)
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
            "Requests holding a slot (decoding or waiting for Triton; bodies arrive before)",
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

        self._live_metrics(registry)

    def _live_metrics(self, registry) -> None:
        """Live sessions (client/live/hub.py): counters kept here, gauges and the
        scheduler's and webhook sender's counters read from the hub (`bind_live`)."""
        from e2v.client.live.bus_metrics import BusMetrics
        from prometheus_client import Counter, Histogram

        self.bus = BusMetrics(registry)  # the live bus's (bound when the hub makes its bus)
        self.live_events = Counter(
            "e2v_live_events", "Live events published, by type", ["type"], registry=registry
        )
        self.live_ended = Counter(
            "e2v_live_sessions_ended",
            "Live sessions ended, by protocol and close code (1000: stop, 1001: drain)",
            ["protocol", "code"],
            registry=registry,
        )
        self.live_refused = Counter(
            "e2v_live_refused",
            "Live sockets and subscriptions refused: busy (the session limit), draining",
            ["reason"],
            registry=registry,
        )
        self.live_latency = Histogram(
            "e2v_live_event_latency_seconds",
            "Audio seconds received after a window's (interim) or utterance's (final) end "
            "when its event was published: the wall-clock latency for a real-time stream",
            ["kind"],
            buckets=LIVE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.live_duration = Histogram(
            "e2v_live_session_duration_seconds",
            "Wall-clock length of ended live sessions",
            buckets=LIVE_DURATION_BUCKETS,
            registry=registry,
        )

    def bind_live(self, hub) -> None:
        """Gauges and counters read from the live hub at each scrape."""
        from prometheus_client import Gauge

        for name, doc, read in (
            (
                "e2v_live_sessions",
                "Live sockets holding a session slot (handshakes too)",
                lambda: hub.sessions,
            ),
            ("e2v_live_calls", "Live sessions started and not ended", lambda: hub.live_calls),
            (
                "e2v_live_subscriptions",
                "Open event subscriptions (SSE and WebSocket)",
                lambda: hub.subscriptions,
            ),
            (
                "e2v_live_draining",
                "1 while the gateway drains live sessions (SIGTERM)",
                lambda: int(hub.draining),
            ),
        ):
            Gauge(name, doc, registry=self.registry).set_function(read)
        self.registry.register(_LiveCounters(hub))

    def bind_connections(self, guard, uploads) -> None:
        """The connection guard's (server.py) and the upload pool's state at each scrape."""
        from prometheus_client import Gauge

        Gauge(
            "e2v_gateway_connections",
            "Open client connections, WebSockets included",
            registry=self.registry,
        ).set_function(lambda: guard.count)
        Gauge(
            "e2v_gateway_uploads_arriving",
            "Request bodies being received (--max-uploads places)",
            registry=self.registry,
        ).set_function(lambda: uploads.count)
        self.registry.register(_GuardCounters(guard, uploads))

    def bind_triton(self, gateway) -> None:
        """Requests per Triton replica and each one's readiness, read at each scrape."""
        self.registry.register(_TritonReplicas(gateway))

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


class _LiveCounters:
    """Counters the live scheduler and the webhook sender keep themselves."""

    SCHEDULER = {
        "e2v_live_coalesced_windows": ("coalesced", "Interim windows replaced by a newer one"),
        "e2v_live_final_retries": ("final_retries", "Final requests that failed and were retried"),
        "e2v_live_interim_failures": ("interim_failures", "Interim requests that failed"),
        "e2v_live_stale_interims": (
            "stale",
            "Interim results not sent: their utterance's final was cut meanwhile",
        ),
        "e2v_live_finals": ("finals", "Utterance finals scored"),
        "e2v_live_interims": ("interims", "Interim windows scored"),
    }
    WEBHOOK = {
        "e2v_webhook_delivered": ("delivered", "Webhook deliveries accepted by the receiver"),
        "e2v_webhook_failed": ("failed", "Webhook deliveries that failed after their retries"),
        "e2v_webhook_dropped": ("dropped", "Webhook deliveries dropped (queue full or invalid)"),
    }

    def __init__(self, hub):
        self.hub = hub

    def describe(self):
        return []  # values appear once the hub has started: no fixed description

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        hub = self.hub
        for source, fields in ((hub.scheduler, self.SCHEDULER), (hub.webhook, self.WEBHOOK)):
            stats = getattr(source, "stats", source)
            for name, (field, doc) in fields.items():
                value = getattr(stats, field, None) if source is not None else 0
                yield CounterMetricFamily(name, doc, value=float(value or 0))


class _GuardCounters:
    """Connections the guard closed, by reason, and uploads pushed out of a full pool."""

    REASONS = {  # label: (the guard's count, what it means)
        "evicted": ("evicted", "to make room for a new connection"),
        "refused": ("refused", "over a cap full of requests at work, not a probe (503)"),
        "header_timeout": ("header_timeouts", "headers too slow (408)"),
        "drained": ("drained", "after an early answer (the rest of the body drained first)"),
        "slow_reader": ("slow_readers", "its answer not read for 30 s"),
        "pushed_out": (
            "pushed_out",
            "a request at work of the address holding the most, for a newcomer from one "
            "holding at least two fewer (total cap)",
        ),
    }

    def __init__(self, guard, uploads):
        self.guard, self.uploads = guard, uploads

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        meanings = "; ".join(f"{label}: {doc}" for label, (_, doc) in self.REASONS.items())
        closed = CounterMetricFamily(
            "e2v_gateway_connections_closed",
            f"Connections the gateway closed itself ({meanings})",
            labels=["reason"],
        )
        for label, (field, _) in self.REASONS.items():
            closed.add_metric([label], float(getattr(self.guard, field)))
        yield closed
        yield CounterMetricFamily(
            "e2v_gateway_uploads_pushed_out",
            "Uploads that gave their place in a full pool to another client's (408 or 429)",
            value=float(self.uploads.evicted),
        )


class _TritonReplicas:
    """What the gateway's Triton client knows per replica (IP:PORT, or the URL as given)."""

    def __init__(self, gateway):
        self.gateway = gateway

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        requests = CounterMetricFamily(
            "e2v_gateway_triton_requests",
            "Requests sent to each Triton replica (gRPC: counted per subchannel of the "
            "round_robin channel)",
            labels=["replica"],
        )
        client = self.gateway.client
        for replica, count in sorted((client.replica_requests() if client else {}).items()):
            requests.add_metric([replica], float(count))
        yield requests
        ready = GaugeMetricFamily(
            "e2v_gateway_triton_replica_ready",
            "1 when the replica's model answered ready at the last /ready check, else 0",
            labels=["replica"],
        )
        for replica, why in sorted(self.gateway.replicas.items()):
            ready.add_metric([replica], float(why is None))
        yield ready
