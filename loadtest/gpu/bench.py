"""The one-shot GPU benchmark (`scripts/gpu-bench.sh`): models, model alone, served, live,
report.

Each phase runs in its own process under a hard time budget (`python -m e2v.loadtest.gpu.bench
--phase NAME`), appending one JSON line per measurement to `<work>/results/<phase>.jsonl`,
so a phase cut short by its budget keeps what it measured. The parent prints progress,
stops what a killed phase left running, and always writes the report.

    python -m e2v.loadtest.gpu.bench [--cpu] [--work DIR] [--report DIR]

`--cpu` is the dry run CI uses: synthetic:tiny on the CPU, a small sweep, same code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from e2v.loadtest.gpu import report
from e2v.loadtest.gpu.plan import GRACE_S, PHASES, Phase, Plan, plan_for, read_results


def run_phase(name: str, plan: Plan, phase: Phase) -> int:
    """Run phase `name` in this process; SIGTERM (budget spent) unwinds, so servers stop."""
    from e2v.loadtest.gpu import live, phases

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    run = {
        "models": phases.models,
        "alone": phases.alone,
        "served": phases.served,
        "live": live.phase,
    }
    return run[name](plan, phase)


def run_phase_process(name: str, plan: Plan, work: Path, log) -> dict:
    """Run one phase in a child process under its budget; returns its status row."""
    budget = plan.budgets[name]
    command = [sys.executable, "-m", "e2v.loadtest.gpu.bench", "--phase", name, "--work", str(work)]
    command += ["--mode", plan.mode]
    start = time.monotonic()
    child = subprocess.Popen(  # PYTHONPATH and the rest as this process has them
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
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
    from e2v.loadtest.gpu.phases import torchscript_path

    return torchscript_path(work, plan.served_model).exists()


def _echo(log, line: str) -> None:
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def orchestrate(plan: Plan, work: Path, report_dir: Path, price_per_hour: float) -> int:
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
        written = report.write(
            report_dir, asdict(plan), statuses, results, price_per_hour, time.monotonic() - started
        )
        _echo(log, f"report: {', '.join(str(p) for p in written)}")
    return 0 if all(s["status"] == "ok" for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2v.loadtest.gpu.bench", description=__doc__)
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
        return run_phase(args.phase, plan, Phase(args.phase, args.work, plan.budgets[args.phase]))
    price = (
        args.price_per_hour if args.price_per_hour is not None else (2.5 if mode == "gpu" else 0.1)
    )
    return orchestrate(plan, args.work, args.report, price)


if __name__ == "__main__":
    sys.exit(main())
