"""The one-shot GPU benchmark (`scripts/gpu-bench.sh`): models, model alone, served, report.

Each phase runs in its own process under a hard time budget (`python -m e2v.loadtest.gpu_bench
--phase NAME`), appending one JSON line per measurement to `<work>/results/<phase>.jsonl`,
so a phase cut short by its budget keeps what it measured. The parent prints progress,
stops what a killed phase left running, and always writes the report.

    python -m e2v.loadtest.gpu_bench [--cpu] [--work DIR] [--report DIR]

`--cpu` is the dry run CI uses: synthetic:tiny on the CPU, a small sweep, same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PHASES = ("models", "alone", "served", "live")
GRACE_S = 15.0  # after the budget: SIGTERM, this long to clean up, then SIGKILL
PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
        self.results = work / "results" / f"{name}.jsonl"
        self.results.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, row: dict) -> None:
        with open(self.results, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")

    def say(self, message: str) -> None:
        print(f"[{self.name} {time.monotonic() - self.started:5.1f}s] {message}", flush=True)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def read_results(work: Path, name: str) -> list[dict]:
    path = work / "results" / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_phase_process(name: str, plan: Plan, work: Path, log) -> dict:
    """Run one phase in a child process under its budget; returns its status row."""
    budget = plan.budgets[name]
    command = [sys.executable, "-m", "e2v.loadtest.gpu_bench", "--phase", name, "--work", str(work)]
    command += ["--mode", plan.mode]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    start = time.monotonic()
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        text=True,
        bufsize=1,
    )
    status = _follow(child, start + budget, log)
    _stop_leftovers(work)
    return {"phase": name, "status": status, "seconds": round(time.monotonic() - start, 1)}


def _follow(child: subprocess.Popen, deadline: float, log) -> str:
    """Relay the child's output until it exits or its deadline passes (then stop it)."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    timed_out = False
    while True:
        if not timed_out and time.monotonic() > deadline:
            timed_out = True
            _echo(log, f"budget spent: stopping phase (pid {child.pid})")
            _signal_group(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
        elif timed_out and time.monotonic() > deadline:
            _signal_group(child.pid, signal.SIGKILL)
        if selector.select(timeout=0.5):
            line = child.stdout.readline()
            if line:
                _echo(log, line.rstrip("\n"))
                continue
        if child.poll() is not None:
            for line in child.stdout:
                _echo(log, line.rstrip("\n"))
            break
    selector.close()
    child.stdout.close()
    if timed_out:
        return "stopped at its time budget"
    return "ok" if child.returncode == 0 else f"failed (exit {child.returncode})"


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _stop_leftovers(work: Path) -> None:
    """Kill a tritonserver that a stopped phase could not shut down (its pid file remains)."""
    pid_file = work / "tritonserver.pid"
    if not pid_file.exists():
        return
    with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def _served_model_exported(plan: Plan, work: Path) -> bool:
    from e2v.loadtest.gpu_phases import torchscript_path

    return torchscript_path(work, plan.served_model).exists()


def _echo(log, line: str) -> None:
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def orchestrate(plan: Plan, work: Path, report_dir: Path, price_per_hour: float) -> int:
    from e2v.loadtest import gpu_report

    work.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    for stale in (work / "results").glob("*.jsonl"):
        stale.unlink()
    started = time.monotonic()
    statuses = []
    with open(report_dir / "log.txt", "w", encoding="utf-8") as log:
        _echo(log, f"gpu-bench ({plan.mode}): phases {', '.join(PHASES)}; budgets {plan.budgets}")
        for name in PHASES:
            if name != "models" and not _served_model_exported(plan, work):
                statuses.append({"phase": name, "status": "skipped: no model", "seconds": 0})
                continue
            _echo(log, f"== {name} (budget {plan.budgets[name]:.0f} s)")
            statuses.append(run_phase_process(name, plan, work, log))
            _echo(log, f"== {name}: {statuses[-1]['status']} in {statuses[-1]['seconds']} s")
        results = {name: read_results(work, name) for name in PHASES}
        written = gpu_report.write(
            report_dir, asdict(plan), statuses, results, price_per_hour, time.monotonic() - started
        )
        _echo(log, f"report: {', '.join(str(p) for p in written)}")
    return 0 if all(s["status"] == "ok" for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2v.loadtest.gpu_bench", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="dry run: synthetic:tiny on the CPU")
    parser.add_argument("--mode", choices=("gpu", "cpu"), help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/e2v-gpu"), help="scratch dir")
    parser.add_argument(
        "--report",
        type=Path,
        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("build/gpu-bench"),
        help="report folder (default: $OUT, else build/gpu-bench)",
    )
    parser.add_argument(
        "--price-per-hour",
        type=float,
        default=None,
        help="USD per machine hour for the cost column (default: 2.50 GPU, 0.10 CPU)",
    )
    args = parser.parse_args(argv)
    mode = args.mode or ("cpu" if args.cpu else "gpu")
    plan = plan_for(mode)
    if args.phase:
        from e2v.loadtest import gpu_phases

        return gpu_phases.run(
            args.phase, plan, Phase(args.phase, args.work, plan.budgets[args.phase])
        )
    price = (
        args.price_per_hour if args.price_per_hour is not None else (2.5 if mode == "gpu" else 0.1)
    )
    return orchestrate(plan, args.work, args.report, price)


if __name__ == "__main__":
    sys.exit(main())
