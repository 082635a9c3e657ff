"""`e2v loadtest`: bounded Locust load tests against Triton, with a report folder.

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

from e2v.client.arguments import add_protocol_argument, add_url_argument

from e2v.contract import MODEL_NAME, SAMPLE_RATE
from e2v.serve import ServeError

DEFAULT_MODEL = "synthetic:base"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "loadtest",
        help="load-test Triton (and the FunASR baseline) with Locust; writes a report",
        description=__doc__.splitlines()[0],
    )
    target = parser.add_argument_group("target")
    add_url_argument(target, omitted="export --model and start a local tritonserver")
    add_protocol_argument(target)
    target.add_argument(
        "--stats-url",
        help="Triton HTTP HOST:PORT for statistics (default: "
        "--url for http, the port below --url for grpc, as 8000/8001)",
    )
    target.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model source to serve and compare with (default {DEFAULT_MODEL})",
    )
    target.add_argument("--repo", type=Path, help="serve this exported repository instead")
    target.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="export target; gpu repositories need NVIDIA's tritonserver "
        "container: serve them there and pass --url",
    )
    target.add_argument(
        "--configs",
        help="local server settings to sweep, INSTANCESxTHREADS "
        "comma separated, e.g. 1x2,2x1 (default: the repository's config)",
    )
    target.add_argument(
        "--gateway",
        action="store_true",
        help="load `e2v gateway` (started here in front of the Triton server) with file "
        "uploads, and compare it with `e2v classify` straight to Triton at --users files "
        "in flight on the same files",
    )
    target.add_argument(
        "--gateway-rounds",
        type=int,
        default=2,
        help="chunks of the comparison's file list, each run by both arms in ABBA order "
        "(default 2)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--profile",
        default="call-centre",
        help="workload profile name or JSON file (call-centre, fixed-3s, long)",
    )
    load.add_argument("--users", type=int, default=4, help="concurrent users (default 4)")
    load.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    load.add_argument("--ramp", help="step ramp START,STEP,MAX users instead of fixed users")
    load.add_argument(
        "--step-duration", type=float, default=20.0, help="seconds per ramp level (default 20)"
    )
    compare = parser.add_argument_group("comparison")
    compare.add_argument(
        "--compare",
        action="store_true",
        help="also run the FunASR baseline server and ONNX Runtime alone at --users",
    )
    compare.add_argument("--device", default="cpu", help="baseline and ORT-alone device: cpu/cuda")
    compare.add_argument(
        "--ort-budget",
        type=float,
        default=30.0,
        help="seconds per ONNX-Runtime-alone measurement (default 30)",
    )
    live = parser.add_argument_group("live calls (loadtest/live.py)")
    live.add_argument(
        "--live",
        action="store_true",
        help="N concurrent stereo calls at real time through the gateway's /v1/live "
        "(started here in front of Triton): event latency, coalesced windows, lost "
        "finals, gateway CPU per channel, Triton batch sizes; --duration per level",
    )
    live.add_argument(
        "--channels", default="8", help="concurrent calls; a comma list sweeps (e.g. 10,20,40)"
    )
    live.add_argument(
        "--frame-ms", type=float, default=100.0, help="audio per WebSocket frame (default 100)"
    )
    live.add_argument("--calls", type=int, default=4, help="distinct call recordings (default 4)")
    live.add_argument(
        "--call-s", type=float, default=60.0, help="length of each recording (default 60)"
    )
    live.add_argument(
        "--live-url", help="load this running gateway (ws://HOST:PORT) instead of a local one"
    )
    live.add_argument(
        "--gateway-pid", type=int, help="with --live-url on this machine: its CPU is measured"
    )
    output = parser.add_argument_group("report")
    output.add_argument("--report", type=Path, help="report folder (default runs/loadtest/...)")
    output.add_argument(
        "--price-per-hour",
        type=float,
        help="machine price in USD/hour, for the cost per 1,000 audio hours",
    )
    output.add_argument("--html", action="store_true", help="also save Locust's HTML reports")
    parser.set_defaults(func=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    from e2v.loadtest.profiles import ProfileError, load_profile

    if args.live:
        from e2v.loadtest.live_run import run_live

        return run_live(args)
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
        from e2v.loadtest.bench import local_gateway

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
        from e2v.loadtest.bench import Load, local_baseline, run_load

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

        onnx_path = self.repo() / MODEL_NAME / "1" / "model.onnx"
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
        from e2v.loadtest.bench import local_triton, triton_target

        if self.args.url:
            return nullcontext(
                triton_target(
                    f"triton-{self.args.protocol}",
                    self.args.protocol,
                    self.args.url,
                    stats_url(self.args),
                )
            )
        return local_triton(self.repo(), self.args.protocol, instances, threads)

    def repo(self) -> Path:
        """--repo, or --model exported once into the work folder."""
        if self.args.repo:
            return self.args.repo
        repo = self.workdir / "repository"
        if not (repo / MODEL_NAME).exists():
            from e2v.export.exporter import ExportError, export_model

            log(f"exporting {self.args.model} ({self.args.target})")
            try:
                export_model(self.args.model, repo, target=self.args.target, check_parity=False)
            except ExportError as exc:
                raise RuntimeError(f"cannot export {self.args.model}: {exc}") from exc
        return repo

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


def parse_configs(text: str | None) -> list[tuple[int, int]]:
    """'1x2,2x1' -> [(1, 2), (2, 1)] (instances, ONNX Runtime threads per instance)."""
    if not text:
        return []
    configs = []
    for item in text.split(","):
        try:
            instances, threads = (int(v) for v in item.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"--configs wants INSTANCESxTHREADS items, got '{item}'") from exc
        if instances < 1 or threads < 1:
            raise ValueError(f"--configs {item}: instances and threads must be >= 1")
        configs.append((instances, threads))
    return configs


def stats_url(args: argparse.Namespace) -> str:
    """Triton's HTTP endpoint for statistics: explicit, the HTTP url, or gRPC port - 1."""
    if args.stats_url or args.protocol == "http":
        return args.stats_url or args.url
    host, _, port = args.url.rpartition(":")
    return f"{host}:{int(port) - 1}"


def command_line(args: argparse.Namespace) -> str:
    """The command, reconstructed from the arguments that matter (for the report)."""
    parts = ["e2v loadtest"]
    for name in (
        "url",
        "protocol",
        "model",
        "repo",
        "configs",
        "profile",
        "users",
        "duration",
        "ramp",
        "step_duration",
        "price_per_hour",
        "device",
    ):
        value = getattr(args, name)
        skip = (name == "device" and value == "cpu") or (name == "step_duration" and not args.ramp)
        if value is not None and not skip:
            parts.append(
                f"--{name.replace('_', '-')} {value:g}"
                if isinstance(value, float)
                else f"--{name.replace('_', '-')} {value}"
            )
    if args.url:
        parts = [p for p in parts if not p.startswith("--model") or args.compare]
    if getattr(args, "live", False):
        parts = [p for p in parts if not p.startswith(("--users", "--profile"))]
        parts += ["--live", f"--channels {args.channels}", f"--frame-ms {args.frame_ms:g}"]
    if args.gateway:
        parts.append("--gateway")
        if args.gateway_rounds != 2:
            parts.append(f"--gateway-rounds {args.gateway_rounds}")
    return " ".join(parts + (["--compare"] if args.compare else []))


def log(message: str) -> None:
    print(f"[loadtest] {message}", flush=True)


def log_result(run) -> None:
    s = run.summary
    log(
        f"  {s.requests} ok, {s.failures} failed, {s.requests_per_s:.2f} req/s, "
        f"{s.audio_s_per_s:.2f} audio s/s, p50 {s.p50_ms:.0f} ms, p95 {s.p95_ms:.0f} ms"
    )
