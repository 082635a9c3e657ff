"""What the live tier takes from the application that serves it, passed in when the app
is built: the live tier reaches for nothing else (docs/live.md).

    services = LiveServices(client=lambda: gateway.client, model=lambda: gateway.info,
                            metrics=gateway.metrics, slots=config.slots,
                            key_problem=partial(key_problem, config.api_key),
                            bus=make_bus(config.bus, webhook=sender, metrics=...))
    hub = LiveHub(services, config.live)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from e2v.client.live.errors import LiveError

from e2v.contract import CLOSE_POLICY

if TYPE_CHECKING:
    from e2v.client.live.bus import Bus
    from e2v.client.triton import ModelInfo, TritonEmotionClient

# Why a request's API key is refused: none came, or another one.
KeyProblem = Literal["missing", "wrong"]


class LiveMetrics(Protocol):
    """The metric families live sessions count into (prometheus_client's Counter and
    Histogram: `.labels(...).inc()`, `.observe(seconds)`)."""

    live_events: Any  # counter, by event type
    live_ended: Any  # counter, by protocol and close code
    live_refused: Any  # counter, by reason: busy, draining
    live_latency: Any  # histogram, by kind: interim, final
    live_duration: Any  # histogram of session lengths


@dataclass(frozen=True)
class LiveServices:
    """The live tier's dependencies, each a small named thing.

    - `client`: the one Triton client of the application (made at its start; live windows
      share it, and its retries, with uploads);
    - `model`: Triton's model once it is ready, else None (it may come, and change, after
      start: sessions opened before are refused with CLOSE_TRY_AGAIN);
    - `metrics`: where live sessions are counted;
    - `slots`: the application's request slots (live requests in flight scale with them);
    - `key_problem(headers, fallback)`: the one API key check, None when the key passes
      (or none is configured): `X-API-Key`, else `Authorization: Bearer`, else `fallback`
      (a browser's `?key=`, Twilio's customParameters);
    - `audiohook_secret`: AudioHook upgrades must be signed with it (None: not checked);
    - `bus`: where calls are claimed, their events published and followed, and alerts
      and summaries sent to the webhook (client/live/bus.py; None: in process, no
      webhooks). The hub starts and stops it.
    """

    client: Callable[[], TritonEmotionClient]
    model: Callable[[], ModelInfo | None]
    metrics: LiveMetrics
    slots: int
    key_problem: Callable[[Mapping[str, str], str | None], KeyProblem | None]
    audiohook_secret: bytes | None = None
    bus: Bus | None = None


def authorize(
    services: LiveServices,
    headers: Mapping[str, str],
    fallback: str | None = None,
    *,
    missing: str,
    wrong: str = "wrong API key",
) -> None:
    """LiveError(CLOSE_POLICY, "unauthorized", `missing` or `wrong`) unless the key passes."""
    problem = services.key_problem(headers, fallback)
    if problem is not None:
        raise LiveError(CLOSE_POLICY, "unauthorized", missing if problem == "missing" else wrong)
