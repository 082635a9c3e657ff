"""Numbers of a run from its per-request log: throughput, real-time factor, latency, cost."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from e2v.loadtest.spec import Ramp

P95_TARGET_MS = 150.0  # the latency goal of live events (issue 17): interims and finals


@dataclass(frozen=True)
class Requests:
    """The driver's `requests.csv` as arrays (one entry per request)."""

    end_s: np.ndarray  # completion time since the load started
    latency_ms: np.ndarray
    audio_s: np.ndarray
    ok: np.ndarray  # bool
    users: np.ndarray

    @classmethod
    def read(cls, path: Path) -> Requests:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        column = lambda name, kind: np.array([kind(r[name]) for r in rows], dtype=kind)  # noqa: E731
        return cls(
            end_s=column("end_s", float),
            latency_ms=column("latency_ms", float),
            audio_s=column("audio_s", float),
            ok=column("ok", int).astype(bool),
            users=column("users", int),
        )

    def window(self, start_s: float, end_s: float) -> Requests:
        keep = (self.end_s > start_s) & (self.end_s <= end_s)
        return Requests(*(getattr(self, f)[keep] for f in Requests.__dataclass_fields__))


@dataclass(frozen=True)
class Summary:
    """Throughput over the load window; latency of successful requests."""

    users: int
    requests: int  # successful
    failures: int
    window_s: float
    requests_per_s: float
    audio_s_per_s: float  # real-time factor: audio seconds processed per wall second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarize(requests: Requests, users: int, end_s: float, start_s: float = 0.0) -> Summary:
    """Requests completed in (start_s, end_s]; throughput counts successes only."""
    window_s = end_s - start_s
    done = requests.window(start_s, end_s)
    ok = done.latency_ms[done.ok]
    percentile = lambda q: float(np.percentile(ok, q)) if ok.size else float("nan")  # noqa: E731
    return Summary(
        users=users,
        requests=int(done.ok.sum()),
        failures=int((~done.ok).sum()),
        window_s=window_s,
        requests_per_s=ok.size / window_s,
        audio_s_per_s=float(done.audio_s[done.ok].sum()) / window_s,
        p50_ms=percentile(50),
        p95_ms=percentile(95),
        p99_ms=percentile(99),
        max_ms=float(ok.max()) if ok.size else float("nan"),
        mean_ms=float(ok.mean()) if ok.size else float("nan"),
    )


def ramp_steps(requests: Requests, ramp: Ramp, settle_s: float | None = None) -> list[Summary]:
    """One summary per ramp level, skipping each level's first `settle_s` (default 1/4)."""
    settle = ramp.step_s / 4 if settle_s is None else settle_s
    steps = []
    for k, users in enumerate(ramp.levels):
        start = k * ramp.step_s
        steps.append(summarize(requests, users, start + ramp.step_s, start_s=start + settle))
    return steps


def saturation(steps: list[Summary], tolerance: float = 0.05) -> Summary:
    """The first level within `tolerance` of the best throughput: more users only add latency."""
    best = max(s.audio_s_per_s for s in steps)
    return next(s for s in steps if s.audio_s_per_s >= (1 - tolerance) * best)


def cost_per_1000_audio_hours(price_per_hour: float, audio_s_per_s: float) -> float:
    """USD to process 1,000 hours of audio on one machine billed `price_per_hour`.

    One machine-hour processes `audio_s_per_s` hours of audio at saturation, so 1,000
    audio hours need 1000 / audio_s_per_s machine-hours.
    """
    if audio_s_per_s <= 0:
        raise ValueError("throughput must be positive to price it")
    return price_per_hour / audio_s_per_s * 1000.0


def percentiles(ms) -> dict:
    """count, p50/p95/p99 and max of latencies in milliseconds, to 0.1 ms; {"count": 0}
    for none."""
    ms = np.asarray(ms, dtype=np.float64)
    if not ms.size:
        return {"count": 0}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "count": int(ms.size),
        "p50": round(float(p50), 1),
        "p95": round(float(p95), 1),
        "p99": round(float(p99), 1),
        "max": round(float(ms.max()), 1),
    }
