"""One load run against one target: warm-up, statistics snapshot, driver, results.

Targets are a Triton endpoint (gRPC or HTTP; local servers are started here on free
ports) or the FunASR baseline server. The Locust driver runs as a subprocess
(`python -m e2v.loadtest.driver`), so this process never imports gevent-patched Locust.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from e2v.loadtest import triton_stats
from e2v.loadtest.baseline_server import BaselineServer
from e2v.loadtest.metrics import Requests, Summary, ramp_steps, saturation, summarize
from e2v.loadtest.spec import DriveSpec, Ramp
from e2v.loadtest.triton_stats import ModelStats
from e2v.loadtest.workload import Workload

from e2v.contract import GATEWAY_PREDICT_PATH, INPUT_WAV, INPUT_WAV_LENS, MODEL_NAME
from e2v.serve import free_ports

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """Something to load: `user` is the driver's user kind (grpc, http or baseline)."""

    label: str
    user: str
    url: str
    stats_url: str | None = None  # Triton HTTP endpoint for statistics; None: no server stats
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Load:
    """Fixed `users` for `duration_s`, or a step `ramp` (then users/duration are unused)."""

    users: int
    duration_s: float
    ramp: Ramp | None = None
    html: bool = False


@dataclass
class RunResult:
    target: Target
    load: Load
    summary: Summary  # fixed: the load window; ramp: the saturation level
    overall: Summary  # every request of the run, drain included (matches Triton's counters)
    steps: list[Summary]  # ramp levels (empty for fixed runs)
    server: ModelStats | None  # Triton's counters for this run (after - before)
    locust: dict
    out_dir: Path
    load_average: tuple[float, float]  # 1-min load average before and after the run
    cpu: dict | None = None  # CPU seconds by process during the run (process_cpu)

    def as_dict(self) -> dict:
        return {
            "label": self.target.label,
            "protocol": self.target.user,
            "url": self.target.url,
            "settings": self.target.settings,
            "users": self.load.users if self.load.ramp is None else None,
            "duration_s": self.load.duration_s if self.load.ramp is None else None,
            "ramp": self.load.ramp.__dict__ if self.load.ramp else None,
            "summary": self.summary.as_dict(),
            "overall": self.overall.as_dict(),
            "steps": [s.as_dict() for s in self.steps],
            "server": self.server.as_dict() if self.server else None,
            "cpu_s": self.cpu,
            "locust": self.locust,
            "load_average": self.load_average,
        }


def run_load(
    target: Target,
    workload: Workload,
    workload_path: Path,
    load: Load,
    out_dir: Path,
    files: Path | None = None,
) -> RunResult:
    """Warm up, snapshot Triton's counters, drive the load, snapshot again, summarise.

    `files`: the encoded clips (`workload.encode_clips`) that gateway users upload."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = target.stats_url
    initial = triton_stats.snapshot(stats) if stats else None
    warmups = warm_up(target, workload, files)
    before = triton_stats.settled(stats, initial.handled + warmups) if stats else None
    load_before = os.getloadavg()[0]
    cpu_before = process_cpu(target)
    locust = drive(target, workload_path, load, out_dir, files)
    cpu = {k: round(v - cpu_before[k], 2) for k, v in process_cpu(target).items()}
    load_after = os.getloadavg()[0]
    server = None
    if stats:
        server = triton_stats.settled(stats, before.handled + locust["num_requests"]) - before
    requests = Requests.read(out_dir / "requests.csv")
    if load.ramp:
        steps = ramp_steps(requests, load.ramp)
        summary = saturation(steps)
    else:
        steps, summary = [], summarize(requests, load.users, load.duration_s)
    overall = summarize(requests, load.users, float(requests.end_s.max(initial=0.0)) + 1e-6)
    loadavg = (round(load_before, 2), round(load_after, 2))
    if server:
        cpu["triton_compute_infer"] = round(server.ns["compute_infer"] / 1e9, 2)
    result = RunResult(target, load, summary, overall, steps, server, locust, out_dir, loadavg, cpu)
    (out_dir / "summary.json").write_text(json.dumps(result.as_dict(), indent=2))
    return result


def process_cpu(target: Target) -> dict[str, float]:
    """CPU seconds so far of the load driver (this process's waited-for children: the
    driver runs as one) and, for a local server, of tritonserver and its model stubs.

    Triton's compute_infer time of the same run, next to the stubs' CPU, shows what the
    Python backend costs beyond ONNX Runtime's run; the driver's share shows how much of
    the machine the load generator itself took from the server."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"driver": children.ru_utime + children.ru_stime}
    pid, prefix = target.settings.get("server_pid"), target.settings.get("shm_prefix")
    if pid and prefix:
        from e2v import leftovers

        cpu["tritonserver"] = _pid_cpu_s(pid)
        cpu["stubs"] = sum(_pid_cpu_s(p) for p in leftovers.stub_processes(prefix))
    return cpu


def _pid_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(
    target: Target, workload_path: Path, load: Load, out_dir: Path, files: Path | None = None
) -> dict:
    """Run `python -m e2v.loadtest.driver` on a spec; returns its Locust totals."""
    spec = DriveSpec(
        url=target.url,
        user=target.user,
        workload=str(workload_path),
        out_dir=str(out_dir),
        users=load.users,
        duration_s=load.duration_s,
        ramp=load.ramp,
        html=load.html,
        files=str(files) if files else None,
    )
    spec_path = spec.save(out_dir / "spec.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    limit_s = spec.load_s + spec.stop_timeout_s + 180
    with open(out_dir / "driver.log", "wb") as log:
        try:
            code = subprocess.run(
                [sys.executable, "-m", "e2v.loadtest.driver", str(spec_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=limit_s,
            ).returncode
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"load driver still running after {limit_s:.0f} s") from exc
    if code != 0:
        tail = (out_dir / "driver.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"load driver failed (exit {code}):\n  " + "\n  ".join(tail))
    (out_dir / "spec.json").unlink()
    if not (out_dir / "driver.log").stat().st_size:
        (out_dir / "driver.log").unlink()
    return json.loads((out_dir / "locust.json").read_text())


def warm_up(target: Target, workload: Workload, files: Path | None = None) -> int:
    """One request per length bucket, outside the measurement (first runs are slow);
    returns the number of requests sent."""
    by_bucket = {workload.padded(i)[0].shape[1]: i for i in range(len(workload))}
    uploads = sorted(files.iterdir()) if files else []
    for index in by_bucket.values():
        if target.user == "gateway":
            _upload(target.url, uploads[index])
        elif target.user == "baseline":
            from e2v.loadtest.baseline_server import infer

            infer(target.url, workload.clip(index))
        else:
            _triton_infer(target, *workload.padded(index))
    return len(by_bucket)


def _upload(url: str, path: Path) -> dict:
    """POST one file to the gateway at `url` (HOST:PORT); its JSON answer."""
    import urllib.request

    from e2v.loadtest.workload import multipart_upload

    content_type, body = multipart_upload(path)
    request = urllib.request.Request(
        f"http://{url}{GATEWAY_PREDICT_PATH}", body, {"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _triton_infer(target: Target, wav, lens) -> None:
    if target.user == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    client = client_module.InferenceServerClient(target.url)
    try:
        inputs = [
            client_module.InferInput(INPUT_WAV, list(wav.shape), "FP32"),
            client_module.InferInput(INPUT_WAV_LENS, list(lens.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(wav)
        inputs[1].set_data_from_numpy(lens)
        client.infer(MODEL_NAME, inputs)
    finally:
        client.close()


def triton_target(label: str, protocol: str, url: str, stats_url: str | None) -> Target:
    """A running Triton (local or remote) and its model settings."""
    settings = {}
    if stats_url:
        try:
            settings = triton_stats.config_summary(triton_stats.model_config(stats_url))
        except Exception as exc:  # noqa: BLE001 - socket errors and InferenceServerException
            raise RuntimeError(
                f"cannot read model '{MODEL_NAME}' from Triton at {stats_url} (HTTP): {exc}"
            ) from exc
    return Target(label, protocol, url, stats_url, settings)


@contextmanager
def local_triton(
    repo: Path, protocol: str, instances: int | None = None, threads: int | None = None
) -> Iterator[Target]:
    """`tritonserver` on `repo` with free loopback ports; yields its Target."""
    from e2v.serve import ServerConfig, TritonServer

    config = ServerConfig.on_free_ports(repo, instances=instances, threads=threads)
    with TritonServer(config) as server:
        url = config.grpc_url if protocol == "grpc" else config.http_url
        label = f"triton-{protocol}" + (f"-{instances}x{threads}" if instances else "")
        target = triton_target(label, protocol, url, config.http_url)
        target.settings["grpc_url"] = config.grpc_url
        target.settings["shm_prefix"] = server.shm_prefix  # finds its stubs (memory, CPU)
        target.settings["server_pid"] = server.process.pid
        yield target


@contextmanager
def local_gateway(triton: Target, concurrency: int) -> Iterator[Target]:
    """`e2v gateway` on a free loopback port in front of the gRPC Triton `triton`."""
    from e2v.loadtest.gateway_process import GatewayProcess

    if triton.user != "grpc":
        raise ValueError("the gateway load test talks to Triton over gRPC: use --protocol grpc")
    # Every Locust user connects from 127.0.0.1: no per-address connection cap here.
    flags = ("--concurrency", str(concurrency), "--max-connections-per-client", "0")
    with GatewayProcess(triton.url, *flags).start(ready=True) as gw:
        settings = {**triton.settings, "gateway_concurrency": concurrency, "gateway_pid": gw.pid}
        label = triton.label.replace("triton-grpc", "gateway")
        yield Target(label, "gateway", gw.url.removeprefix("http://"), triton.stats_url, settings)


@contextmanager
def local_baseline(
    model_dir: Path, device: str = "cpu", threads: int | None = None
) -> Iterator[Target]:
    """The FunASR baseline server on a free loopback port; yields its Target."""
    threads = threads or os.cpu_count() or 1
    with BaselineServer(model_dir, free_ports(1)[0], device=device, threads=threads) as server:
        settings = {
            "server": "FunASR AutoModel.generate, one request at a time",
            "device": device,
            "torch_threads": threads,
            "torch_threads_running": server.torch_threads,
        }
        yield Target("baseline-funasr", "baseline", server.url, None, settings)
