"""The bus's Prometheus metrics (`GET /metrics` of the gateway; Grafana's "Live bus" row).

Without a registry (tests, tools) every call is a no-op. With one, the gateway's registry:
- `e2v_bus_publish_seconds`: from an event's publish by the session to the bus's ack
  (the in-process bus: the fan-out), so an outage shows as the time events waited;
- `e2v_bus_delivery_seconds`: from the bus's store to a subscriber here (another replica's
  events included: the latency the bus adds across replicas);
- `e2v_bus_buffered_events` / `_bytes`: waiting in the local buffer; `e2v_bus_dropped_events`
  by type: dropped by its overflow (interims first);
- `e2v_bus_webhook_pending`: the durable webhook consumer's lag (events not yet delivered);
- `e2v_bus_connected`, `e2v_bus_reconnects`, `e2v_bus_claims_lost`, `e2v_bus_replicas_lost`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from e2v.client.live.bus import Bus

# From sub-millisecond (loopback) to an outage ridden out in the buffer.
BUS_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30)


class BusMetrics:
    def __init__(self, registry=None):
        self.registry = registry
        self.webhook_pending = 0
        self.connected = 1
        self.reconnects = 0
        self._bus: Bus | None = None
        if registry is None:
            return
        self._gauges(registry)
        from prometheus_client import Counter, Histogram

        self._publish = Histogram(
            "e2v_bus_publish_seconds",
            "From an event's publish by its session to the bus's ack, by event type",
            ["type"],
            buckets=BUS_LATENCY_BUCKETS,
            registry=registry,
        )
        self._delivery = Histogram(
            "e2v_bus_delivery_seconds",
            "From an event's store on the bus to its delivery to a subscriber on this replica",
            buckets=BUS_LATENCY_BUCKETS,
            registry=registry,
        )
        self._reconnects = Counter(
            "e2v_bus_reconnects", "Reconnections to the bus", registry=registry
        )
        self._claims_lost = Counter(
            "e2v_bus_claims_lost",
            "Calls whose claim this replica lost while it held them (expired, taken)",
            registry=registry,
        )
        self._replicas_lost = Counter(
            "e2v_bus_replicas_lost",
            "Followed calls whose replica died (their subscribers got replica_lost)",
            registry=registry,
        )

    def bind_bus(self, bus: Bus) -> None:
        """Read the gauges from `bus` (served as 0 until one is bound)."""
        self._bus = bus

    def _gauges(self, registry) -> None:
        from prometheus_client import Gauge
        from prometheus_client.core import CounterMetricFamily

        def buffer():
            return None if self._bus is None else self._bus.buffer

        for name, doc, read in (
            ("e2v_bus_buffered_events", "Events waiting for the bus", lambda: len(buffer() or ())),
            (
                "e2v_bus_buffered_bytes",
                "Bytes of events waiting",
                lambda: getattr(buffer(), "bytes", 0),
            ),
            ("e2v_bus_connected", "1 while connected to the bus", lambda: self.connected),
            (
                "e2v_bus_webhook_pending",
                "Events the durable webhook consumer has not delivered yet (its lag)",
                lambda: self.webhook_pending,
            ),
        ):
            Gauge(name, doc, registry=registry).set_function(read)

        class Dropped:
            def collect(self):
                family = CounterMetricFamily(
                    "e2v_bus_dropped_events",
                    "Events dropped by the local buffer's overflow (interims first), by type",
                    labels=["type"],
                )
                for kind, count in sorted(getattr(buffer(), "dropped", {}).items()):
                    family.add_metric([kind], count)
                yield family

        registry.register(Dropped())

    def published(self, kind: str, seconds: float) -> None:
        if self.registry is not None:
            self._publish.labels(kind).observe(seconds)

    def delivered(self, seconds: float) -> None:
        if self.registry is not None and seconds >= 0:
            self._delivery.observe(seconds)

    def reconnected(self) -> None:
        self.reconnects += 1
        if self.registry is not None:
            self._reconnects.inc()

    def claim_lost(self) -> None:
        if self.registry is not None:
            self._claims_lost.inc()

    def replica_lost(self) -> None:
        if self.registry is not None:
            self._replicas_lost.inc()
