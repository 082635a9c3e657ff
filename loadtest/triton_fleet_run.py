"""`e2v loadtest --replicas-triton N`: one client over N Triton replicas, against one replica.

N tritonservers of the same repository start on this machine, each pinned to its own core
(one model instance, one ONNX Runtime thread). One load driver (Locust; its gRPC users'
channels balance with round_robin, as every e2v client does) runs the profile at --users,
in rounds within the same run: replica 0 alone, then the `ipv4:` list of all N
(--fleet-rounds, default 2: one, N, one, N). Who served what comes from each Triton's own
statistics, never from the client. The report gives both throughputs, their ratio per
round and its median, and the requests per replica.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from e2v.loadtest import triton_stats
from e2v.loadtest.command import command_line, log
from e2v.loadtest.machine import machine_description, software
from e2v.loadtest.targets import Target, served_repo, triton_target

from e2v.serve import ServeError


def run_fleet(args: argparse.Namespace) -> int:
    """The fleet scenario; prints the report's path (0), one error line (1), or 2 for
    arguments that cannot work."""
    from e2v.loadtest.profiles import ProfileError, load_profile

    try:
        check_arguments(args)
        profile = load_profile(args.profile)
    except (ProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report_dir = args.report or Path("runs/loadtest") / f"fleet-{args.replicas_triton}-{stamp}"
    try:
        path = Fleet(args, profile).run(report_dir)
    except (ServeError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    if not 2 <= args.replicas_triton <= 16:
        raise ValueError("--replicas-triton must be in 2..16")
    if args.url or args.configs or args.gateway or args.compare or args.ramp:
        raise ValueError(
            "--replicas-triton starts its own servers at fixed --users: "
            "drop --url, --configs, --gateway, --compare and --ramp"
        )
    if args.protocol != "grpc":
        raise ValueError("--replicas-triton balances with gRPC: use --protocol grpc")
    if args.fleet_rounds < 1 or args.users < 1 or args.duration <= 0:
        raise ValueError("--fleet-rounds and --users must be >= 1, --duration > 0")


class Fleet:
    def __init__(self, args: argparse.Namespace, profile):
        self.args, self.profile = args, profile
        self.n = args.replicas_triton

    def run(self, report_dir: Path) -> Path:
        from e2v.loadtest.bench import Load, run_load
        from e2v.loadtest.workload import prepare_workload

        args = self.args
        with tempfile.TemporaryDirectory(prefix="e2v-loadtest-") as tmp, ExitStack() as stack:
            workdir = Path(tmp)
            log(f"preparing the '{self.profile.name}' workload ({self.profile.clips} clips)")
            workload = prepare_workload(self.profile, workdir)
            workload_path = workload.save(workdir / "workload.npz")
            repo = served_repo(args, workdir)
            cores = sorted(os.sched_getaffinity(0))
            configs = []
            for index in range(self.n):
                core = cores[index % len(cores)]
                log(f"replica {index}: tritonserver, 1 instance x 1 thread, pinned to core {core}")
                configs.append(stack.enter_context(pinned_server(repo, core)))
            one = triton_target("one-replica", "grpc", configs[0].grpc_url, configs[0].http_url)
            fleet_url = "ipv4:" + ",".join(c.grpc_url for c in configs)
            fleet = Target(f"{self.n}-replicas", "grpc", fleet_url, None, dict(one.settings))
            load = Load(args.users, args.duration, None, args.html)
            runs = []
            for round_index in range(1, args.fleet_rounds + 1):
                for target in (one, fleet):
                    label = f"{target.label}-round{round_index}"
                    log(f"{label}: {args.users} users for {args.duration:g} s on {target.url}")
                    before = [triton_stats.snapshot(c.http_url) for c in configs]
                    run = run_load(target, workload, workload_path, load, report_dir / label)
                    served = served_per_replica(configs, before, run.locust["num_requests"])
                    runs.append(fleet_run(label, target, run, configs, served))
                    log_run(runs[-1])
        return write_fleet_report(self, runs, report_dir)


@contextmanager
def pinned_server(repo: Path, core: int):
    """A tritonserver (1 instance, 1 thread) whose processes run on `core` only: it is
    started from this thread with that affinity, which its children inherit."""
    from e2v.serve import ServerConfig, TritonServer

    config = ServerConfig.on_free_ports(repo, instances=1, threads=1)
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        server = TritonServer(config).start()
    finally:
        os.sched_setaffinity(0, previous)
    try:
        yield config
    finally:
        server.stop()


def served_per_replica(configs, before, sent: int, timeout_s: float = 10.0) -> list[int]:
    """Requests each replica answered during the run (its statistics, after - before),
    once they add up to what the driver sent (Triton counts just after it answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        served = [(triton_stats.snapshot(c.http_url) - b).handled for c, b in zip(configs, before)]
        if sum(served) >= sent or time.monotonic() > deadline:
            return served


def fleet_run(label: str, target: Target, run, configs, served: list[int]) -> dict:
    summary = run.summary
    return {
        "label": label,
        "url": target.url,
        "replicas_loaded": len(target.url.split(",")),
        "requests": run.locust["num_requests"],
        "failures": run.locust["num_failures"],
        "requests_per_s": round(summary.requests_per_s, 3),
        "audio_s_per_s": round(summary.audio_s_per_s, 3),
        "p50_ms": round(summary.p50_ms, 1),
        "p95_ms": round(summary.p95_ms, 1),
        "per_replica": {c.grpc_url: n for c, n in zip(configs, served)},
        "load_average": run.load_average,
        "driver_cpu_s": (run.cpu or {}).get("driver"),
    }


def log_run(run: dict) -> None:
    per = ", ".join(f"{k} {v}" for k, v in run["per_replica"].items())
    log(
        f"  {run['requests']} ok, {run['failures']} failed, {run['audio_s_per_s']:.2f} audio "
        f"s/s, p50 {run['p50_ms']:.0f} ms; per replica (Triton): {per}"
    )


def ratios(runs: list[dict]) -> list[float]:
    """Fleet / one-replica audio throughput, per round (the pair run back to back)."""
    return [
        fleet["audio_s_per_s"] / one["audio_s_per_s"]
        for one, fleet in zip(runs[::2], runs[1::2])
        if one["audio_s_per_s"] > 0
    ]


def write_fleet_report(fleet: Fleet, runs: list[dict], directory: Path) -> Path:
    """README.md and summary.json in `directory`; returns the markdown path."""
    args, n = fleet.args, fleet.n
    directory.mkdir(parents=True, exist_ok=True)
    per_round = ratios(runs)
    median = statistics.median(per_round) if per_round else None
    lines = [
        f"# Triton fleet: one client over {n} replicas, against one replica",
        "",
        f"`{command_line(args)} --replicas-triton {n} --fleet-rounds {args.fleet_rounds}`",
        "",
        f"- Machine: {machine_description()}",
        f"- Software: {software(['tritonclient', 'grpcio', 'locust', 'onnxruntime'])}",
        f"- Model: `{args.repo or args.model}`; profile `{fleet.profile.name}`; "
        f"{args.users} users (closed loop), {args.duration:g} s per run.",
        f"- {n} tritonservers on this machine, each pinned to one core (1 instance x 1 ONNX "
        "Runtime thread). The load driver (Locust, gRPC, each user's channel balancing with "
        "round_robin like every e2v client) is not pinned: it shares the cores with them.",
        "- Rounds alternate in the same run: replica 0 alone, then the list of all of them.",
        "- Requests per replica are each Triton's own statistics (success + failure), "
        "including the run's warm-up (one request per length bucket).",
        "",
    ]
    if str(args.model).startswith("synthetic:") and not args.repo:
        lines += [
            "> **SYNTHETIC MODEL**: seeded random weights in the published architecture. "
            "Speed is representative of the real model of that size; labels are meaningless.",
            "",
        ]
    lines += [
        "| run | loaded | requests | failed | req/s | audio s/s | p50 ms | p95 ms | "
        "per replica (Triton's statistics) | load avg before, after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        total = sum(run["per_replica"].values()) or 1
        per = ", ".join(f"{v} ({v / total:.0%})" for v in run["per_replica"].values())
        lines.append(
            f"| {run['label']} | {run['replicas_loaded']} | {run['requests']} | "
            f"{run['failures']} | {run['requests_per_s']:.2f} | {run['audio_s_per_s']:.2f} | "
            f"{run['p50_ms']:.0f} | {run['p95_ms']:.0f} | {per} | "
            f"{run['load_average'][0]:.2f}, {run['load_average'][1]:.2f} |"
        )
    lines += [
        "",
        f"Throughput, {n} replicas / one replica (audio s/s), per round: "
        + ", ".join(f"{r:.2f}" for r in per_round)
        + (f"; median **{median:.2f}x**." if median else "."),
        "",
        f"Per-replica share of the {n}-replica runs: "
        + "; ".join(
            ", ".join(
                f"{v / max(1, sum(r['per_replica'].values())):.0%}"
                for v in r["per_replica"].values()
            )
            for r in runs[1::2]
        )
        + ".",
        "",
        "Each run's folder holds Locust's CSVs, `requests.csv` and `summary.json`.",
        "",
    ]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    summary = {"replicas": n, "runs": runs, "ratios": per_round, "median_ratio": median}
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    return path
