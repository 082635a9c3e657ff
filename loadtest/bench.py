"""One Locust load run against one target (`loadtest.targets`): warm-up, statistics
snapshot, driver, results.

The Locust driver runs as a subprocess (`python -m e2v.loadtest.driver`), so this process
never imports gevent-patched Locust.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from e2v.loadtest import triton_stats
from e2v.loadtest.machine import load_average, process_cpu_s
from e2v.loadtest.metrics import Requests, Summary, ramp_steps, saturation, summarize
from e2v.loadtest.spec import DriveSpec, Ramp
from e2v.loadtest.targets import Target
from e2v.loadtest.triton_stats import ModelStats
from e2v.loadtest.workload import Workload, triton_inputs

from e2v.contract import GATEWAY_PREDICT_PATH, MODEL_NAME


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
    load_before = load_average()
    cpu_before = process_cpu(target)
    locust = drive(target, workload_path, load, out_dir, files)
    cpu = {k: round(v - cpu_before[k], 2) for k, v in process_cpu(target).items()}
    load_after = load_average()
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
    loadavg = (load_before, load_after)
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

        cpu["tritonserver"] = process_cpu_s(pid) or 0.0  # 0 once it is gone
        cpu["stubs"] = sum(process_cpu_s(p) or 0.0 for p in leftovers.stub_processes(prefix))
    return cpu


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
    limit_s = spec.load_s + spec.stop_timeout_s + 180
    with open(out_dir / "driver.log", "wb") as log:
        try:
            code = subprocess.run(
                [sys.executable, "-m", "e2v.loadtest.driver", str(spec_path)],
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
    indices = workload.one_per_bucket()
    uploads = sorted(files.iterdir()) if files else []
    for index in indices:
        if target.user == "gateway":
            _upload(target.url, uploads[index])
        elif target.user == "baseline":
            from e2v.loadtest.baseline_server import infer

            infer(target.url, workload.clip(index))
        else:
            _triton_infer(target, *workload.padded(index))
    return len(indices)


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
        from e2v.client.triton import grpc_channel_args

        client = client_module.InferenceServerClient(target.url, channel_args=grpc_channel_args())
    else:
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(target.url)
    try:
        client.infer(MODEL_NAME, triton_inputs(client_module, wav, lens))
    finally:
        client.close()
