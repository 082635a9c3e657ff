"""What one load-driver run does: target, user kind, load shape, where results go.

Plain data, free of Locust, so the `e2v` process can build it without importing gevent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ramp:
    """Users start, start+step, ... up to max_users, each level held for step_s seconds."""

    start: int
    step: int
    max_users: int
    step_s: float

    @property
    def levels(self) -> list[int]:
        return list(range(self.start, self.max_users + 1, self.step))

    @property
    def duration_s(self) -> float:
        return len(self.levels) * self.step_s

    @classmethod
    def parse(cls, text: str, step_s: float) -> Ramp:
        """'START,STEP,MAX' (users), each level lasting `step_s` seconds."""
        try:
            start, step, top = (int(v) for v in text.split(","))
        except ValueError as exc:
            raise ValueError(f"--ramp wants START,STEP,MAX users, got '{text}'") from exc
        if not 1 <= start <= top or step < 1 or step_s <= 0:
            raise ValueError(f"--ramp {text}: need 1 <= START <= MAX, STEP >= 1, step time > 0")
        return cls(start, step, top, step_s)


@dataclass(frozen=True)
class DriveSpec:
    """One bounded Locust run: `users` for `duration_s`, or a step `ramp`."""

    url: str  # HOST:PORT
    user: str  # "grpc" | "http" | "baseline" | "gateway"
    workload: str  # .npz written by Workload.save
    out_dir: str
    users: int = 1
    duration_s: float = 30.0
    ramp: Ramp | None = None
    html: bool = False
    stop_timeout_s: float = 120.0  # in-flight requests may finish after the end
    files: str | None = None  # encoded clips (workload.encode_clips), for gateway users

    @property
    def load_s(self) -> float:
        """Seconds of load, excluding the drain of in-flight requests."""
        return self.ramp.duration_s if self.ramp else self.duration_s

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> DriveSpec:
        data = json.loads(Path(path).read_text())
        ramp = data.pop("ramp")
        return cls(**data, ramp=Ramp(**ramp) if ramp else None)
