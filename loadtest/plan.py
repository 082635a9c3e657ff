"""`e2v loadtest`'s default scenario: bounded Locust load tests against Triton (or the
gateway in front of it), with a report folder.

Without `--url` a local tritonserver is started on free loopback ports for each
`--configs` setting; `--compare` adds the FunASR baseline server and ONNX Runtime alone
at the same concurrency, so one command gives served-vs-baseline and served-vs-bare
numbers. Locust itself runs in a child process (see `loadtest.driver`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from e2v.loadtest.command import command_line, log
from e2v.loadtest.targets import (
    local_baseline,
    local_gateway,
    parse_configs,
    served_repo,
    triton_server,
)

from e2v.contract import MODEL_NAME, SAMPLE_RATE
from e2v.serve import ServeError


def run_plan(args: argparse.Namespace) -> int:
    """The Locust scenario (every `e2v loadtest` without a scenario flag); prints the
    report's path."""
    from e2v.loadtest.profiles import ProfileError, load_profile

    try:
        profile = load_profile(args.profile)
        plan = Plan.from_args(args)
    except (ProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report_dir = args.report or Path("runs/loadtest") / f"{profile.name}-{stamp}"
    try:
        path = plan.run(profile, report_dir)
    except (ServeError, RuntimeError, OSError) as exc:  # servers, export, driver: one message
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


class Plan:
    """What `e2v loadtest` runs, from its arguments."""

    def __init__(self, args: argparse.Namespace, configs: list[tuple[int, int]], ramp):
        self.args, self.configs, self.ramp = args, configs, ramp
        self.config_of: dict[str, tuple[int | None, int | None]] = {}  # run label -> setting
        self.baseline_in_process: dict | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        from e2v.loadtest.spec import Ramp

        if args.url and args.configs:
            raise ValueError("--configs needs the local server: drop --url")
        if args.target == "gpu" and not args.url:
            raise ValueError(
                "the local tritonserver (nvidia-pytriton wheel) has only the Python "
                "backend: serve a --target gpu repository in NVIDIA's container and "
                "pass --url"
            )
        if args.gateway and (args.compare or args.protocol != "grpc"):
            raise ValueError("--gateway: use the default --protocol grpc and no --compare")
        if args.gateway_rounds < 1:
            raise ValueError("--gateway-rounds must be >= 1")
        if args.users < 1 or args.duration <= 0:
            raise ValueError("--users must be >= 1 and --duration > 0")
        ramp = Ramp.parse(args.ramp, args.step_duration) if args.ramp else None
        return cls(args, parse_configs(args.configs), ramp)

    def run(self, profile, report_dir: Path) -> Path:
        from e2v.loadtest.report import Report, write_report
        from e2v.loadtest.workload import prepare_workload

        args = self.args
        with tempfile.TemporaryDirectory(prefix="e2v-loadtest-") as tmp:
            workdir = Path(tmp)
            log(f"preparing the '{profile.name}' workload ({profile.clips} clips)")
            workload = prepare_workload(profile, workdir)
            self.workload, self.workload_path = workload, workload.save(workdir / "workload.npz")
            self.files = None
            if args.gateway:
                from e2v.loadtest.workload import encode_clips

                self.files = workdir / "files"
                encode_clips(workload, self.files)
            self.report_dir, self.workdir = report_dir, workdir
            runs = self.sweep()
            report = Report(
                command_line(args),
                profile,
                workload,
                self.model_text(runs),
                self.synthetic(runs),
                runs,
                price_per_hour=args.price_per_hour,
            )
            if args.gateway:
                from e2v.loadtest.gateway_compare import preprocessing_per_core

                log("preprocessing alone: load_audio + segment_audio on one thread")
                report.gateway = self.gateway_results
                report.preprocessing = preprocessing_per_core(
                    sorted(self.files.iterdir()), budget_s=min(10.0, args.duration)
                )
            if args.compare:
                report.served = self.fixed_run(max(runs, key=lambda r: r.summary.audio_s_per_s))
                report.baseline = self.baseline_run()
                report.baseline_in_process = self.baseline_in_process
                report.memory = self.memory_run(report.served)
                report.ort = self.ort_runs(report.served)
            return write_report(report, report_dir)

    def load(self):
        from e2v.loadtest.bench import Load

        return Load(self.args.users, self.args.duration, self.ramp, self.args.html)

    def sweep(self) -> list:
        """One run per server setting (or the one --url server)."""
        from e2v.loadtest.bench import run_load

        runs = []
        self.gateway_results = []
        for instances, threads in self.configs or [(None, None)]:
            with self.server(instances, threads) as triton, self.front(triton) as target:
                self.config_of[target.label] = (instances, threads)
                log(f"{target.label}: {self.describe_load()}")
                runs.append(
                    run_load(
                        target,
                        self.workload,
                        self.workload_path,
                        self.load(),
                        self.report_dir / target.label,
                        self.files,
                    )
                )
                log_result(runs[-1])
                if self.args.gateway:
                    self.gateway_results.append(self.gateway_comparison(triton, target, runs[-1]))
        return runs

    def front(self, triton):
        """The gateway in front of `triton` with --gateway, else `triton` itself."""
        if not self.args.gateway:
            return nullcontext(triton)
        top = max(self.ramp.levels) if self.ramp else self.args.users
        return local_gateway(triton, max(2, top))

    def gateway_comparison(self, triton, gateway, run) -> dict:
        """Direct classify vs the gateway on the same files, each arm about --duration."""
        import math

        from e2v.loadtest.gateway_compare import chunks, compare, totals

        files = sorted(self.files.iterdir())
        pass_s = float(self.workload.lengths.sum()) / SAMPLE_RATE
        rate = max(run.summary.audio_s_per_s, 1e-3)
        passes = max(1, math.ceil(self.args.duration * rate / pass_s))
        log(
            f"direct e2v classify vs gateway: {self.args.users} files in flight, "
            f"{passes} pass(es) over {len(files)} files in "
            f"{chunks(len(files) * passes, self.args.users, self.args.gateway_rounds)} round(s)"
        )
        runs = compare(
            triton.url,
            "http://" + gateway.url,
            files * passes,
            self.args.users,
            self.args.gateway_rounds,
        )
        for arm in runs:
            log(
                f"  {arm.arm} round {arm.round}: {arm.audio_s_per_s:.2f} audio s/s, "
                f"{arm.audio_s_per_cpu_s:.1f} audio s per CPU s, {arm.errors} errors"
            )
        result = {
            "label": gateway.label,
            "users": self.args.users,
            "passes": passes,
            "runs": [r.as_dict() for r in runs],
            "totals": totals(runs),
        }
        log(f"  gateway / direct: {result['totals']['ratio']:.3f}")
        return result

    def fixed_run(self, best):
        """The best setting at fixed --users (reused when the sweep was already fixed)."""
        from e2v.loadtest.bench import Load, run_load

        if best.load.ramp is None:
            return best
        with self.server(*self.config_of[best.target.label]) as target:
            log(f"{target.label}: {self.args.users} users for {self.args.duration:g} s")
            load = Load(self.args.users, self.args.duration, None, self.args.html)
            run = run_load(
                target,
                self.workload,
                self.workload_path,
                load,
                self.report_dir / f"{target.label}-fixed",
            )
        log_result(run)
        return run

    def memory_run(self, served) -> dict | None:
        """The served model's memory around a maximum-size batch, on a fresh local server
        in the served run's setting (a remote --url server's processes are not visible)."""
        from e2v.loadtest.memory import max_batch_memory

        if self.args.url:
            return None
        with self.server(*self.config_of[served.target.label]) as target:
            log("memory: the model's stubs around a maximum-size batch")
            memory = max_batch_memory(target.settings["grpc_url"], target.settings["shm_prefix"])
        log(
            f"  steady {memory['steady_mib']} MiB, peak {memory['peak_mib']} MiB, after "
            f"{memory['after_mib']} MiB"
        )
        return memory

    def baseline_run(self):
        from e2v.loadtest.baseline_server import measure_in_process, resolve_model_dir
        from e2v.loadtest.bench import Load, run_load

        load = Load(self.args.users, self.args.duration, None, self.args.html)
        model_dir = resolve_model_dir(self.args.model)
        with local_baseline(model_dir, self.args.device) as target:
            log(f"{target.label}: {self.args.users} users for {self.args.duration:g} s")
            run = run_load(
                target, self.workload, self.workload_path, load, self.report_dir / target.label
            )
        log_result(run)
        threads = int(target.settings["torch_threads"])
        log(f"FunASR in-process, {threads} torch threads, {self.args.ort_budget:g} s")
        clips = [self.workload.clip(i) for i in range(len(self.workload))]
        self.baseline_in_process = measure_in_process(
            model_dir, clips, threads, self.args.ort_budget, self.args.device
        )
        log(f"  {self.baseline_in_process['audio_s_per_s']:.2f} audio s/s")
        return run

    def ort_runs(self, served) -> list[dict]:
        """ORT alone in the served run's layout (instances x threads), batch 1 and --users."""
        from e2v.loadtest.bare_ort import measure

        onnx_path = served_repo(self.args, self.workdir) / MODEL_NAME / "1" / "model.onnx"
        settings = served.target.settings
        sessions = int(settings.get("instances") or 1)
        threads = int(settings.get("intra_op_threads") or 0) or max(
            1, (os.cpu_count() or 1) // sessions
        )
        max_batch = int(settings.get("max_batch_size") or self.args.users)
        results = []
        for batch in sorted({1, max(1, min(self.args.users, max_batch))}):
            log(
                f"onnxruntime alone: {sessions} x {threads} threads, batch {batch}, "
                f"{self.args.ort_budget:g} s"
            )
            results.append(
                measure(
                    onnx_path,
                    self.workload,
                    batch,
                    threads,
                    sessions,
                    self.args.ort_budget,
                    self.args.device,
                )
            )
            log(f"  {results[-1]['audio_s_per_s']:.2f} audio s/s")
        return results

    def server(self, instances: int | None, threads: int | None):
        return triton_server(self.args, self.workdir, self.args.protocol, instances, threads)

    def describe_load(self) -> str:
        if self.ramp:
            return (
                f"ramp {self.ramp.levels[0]}..{self.ramp.levels[-1]} users, "
                f"{self.ramp.step_s:g} s per level"
            )
        return f"{self.args.users} users for {self.args.duration:g} s"

    def model_text(self, runs: list) -> str:
        source = runs[0].target.settings.get("source") if runs else ""
        return f"model `{source or self.args.model}`"

    def synthetic(self, runs: list) -> bool:
        served = runs[0].target.settings.get("synthetic") if runs else None
        return bool(served) or (served is None and self.args.model.startswith("synthetic:"))


def log_result(run) -> None:
    s = run.summary
    log(
        f"  {s.requests} ok, {s.failures} failed, {s.requests_per_s:.2f} req/s, "
        f"{s.audio_s_per_s:.2f} audio s/s, p50 {s.p50_ms:.0f} ms, p95 {s.p95_ms:.0f} ms"
    )
