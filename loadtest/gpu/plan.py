"""What the GPU benchmark measures (its plans, with each phase's hard time budget) and
where a phase writes: one JSON line per measurement in `<work>/results/<phase>.jsonl`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

PHASES = ("models", "alone", "served", "live")
GRACE_S = 15.0  # after the budget: SIGTERM, this long to clean up, then SIGKILL


@dataclass(frozen=True)
class Plan:
    """What one run measures, and each phase's hard time budget in seconds."""

    mode: str  # gpu | cpu
    device: str
    models: tuple[str, ...]  # synthetic sizes
    served_model: str
    precisions: tuple[str, ...]  # fp32 first: the others are compared with it
    buckets_s: tuple[float, ...]
    batches: tuple[int, ...]
    layouts: tuple[tuple[int, str], ...]  # served (instances, precision)
    users: tuple[int, ...]  # closed-loop concurrency levels
    warm_s: float  # per level, before the measured window
    measure_s: float
    profile: str = "call-centre"
    live_layout: tuple[int, str] = (1, "fp32")  # served layout of the live phase
    live_channels: tuple[int, ...] = ()  # concurrent calls, stepped up until p95 > target
    budgets: dict[str, float] = field(default_factory=dict)
    alone_share: dict[str, float] = field(default_factory=dict)  # of the alone budget

    @property
    def total_budget_s(self) -> float:
        return sum(self.budgets.values()) + GRACE_S


GPU_PLAN = Plan(
    mode="gpu",
    device="cuda",
    models=("base", "large"),
    served_model="base",
    precisions=("fp32", "fp16", "bf16"),
    buckets_s=(3.0, 10.0, 30.0),
    batches=(1, 2, 4, 8, 16, 32, 64),
    layouts=((1, "fp32"), (1, "fp16"), (2, "fp16")),
    users=(1, 8, 32, 64),
    warm_s=1.0,
    measure_s=5.0,
    live_layout=(1, "fp16"),
    live_channels=(500, 1000, 2000, 3000, 4000, 6000, 8000),
    budgets={"models": 90, "alone": 125, "served": 130, "live": 55, "report": 20},
    alone_share={"base": 0.35, "large": 0.55},  # the rest: CUDA-graph probe
)
CPU_PLAN = Plan(
    mode="cpu",
    device="cpu",
    models=("tiny",),
    served_model="tiny",
    precisions=("fp32", "fp16", "bf16"),
    buckets_s=(1.0, 3.0),
    batches=(1, 2),
    layouts=((1, "fp32"),),
    users=(1, 2),
    warm_s=0.5,
    measure_s=2.0,
    live_channels=(2, 4),
    budgets={"models": 90, "alone": 90, "served": 120, "live": 60, "report": 30},  # busy CI
    alone_share={"tiny": 0.9},
)


def plan_for(mode: str) -> Plan:
    return GPU_PLAN if mode == "gpu" else CPU_PLAN


class Phase:
    """One phase's results file and progress printing (used inside the phase process)."""

    def __init__(self, name: str, work: Path, budget_s: float):
        self.name = name
        self.work = work
        self.started = time.monotonic()
        self.deadline = self.started + budget_s - 5.0  # leave time to stop cleanly
        self.results = results_path(work, name)
        self.results.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, row: dict) -> None:
        with open(self.results, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")

    def say(self, message: str) -> None:
        print(f"[{self.name} {time.monotonic() - self.started:5.1f}s] {message}", flush=True)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def read_results(work: Path, name: str) -> list[dict]:
    """The rows phase `name` wrote (none if it wrote nothing)."""
    path = results_path(work, name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results_path(work: Path, name: str) -> Path:
    """Phase `name`'s results: one JSON line per measurement."""
    return work / "results" / f"{name}.jsonl"
