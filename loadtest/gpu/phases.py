"""The GPU benchmark's phases, each run in its own process by `loadtest.gpu.bench`.

- models: synthetic checkpoints (FunASR's own class, seeded weights) exported with
  `e2v export --target torch`, FunASR parity in each model card;
- alone:  the torch target's runner without Triton: audio s/s and peak memory per bucket,
  batch size and precision; fp16/bf16 against fp32; the served workload; a CUDA-graph probe;
- served: tritonserver with dynamic batching, per instance/precision layout and closed-loop
  concurrency on the call-centre profile; Triton's statistics give the batch sizes;
- live:   the live gateway's request stream replayed open loop (`loadtest.gpu.live`):
  concurrent calls per GPU at p95 <= 150 ms.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from e2v.loadtest.gpu.plan import Phase, Plan

from e2v.contract import MODEL_NAME, SAMPLE_RATE

PARITY_RESERVE_S = 45.0  # FunASR parity of a further model only with this much time left


def repo_dir(work: Path, size: str) -> Path:
    return work / "repos" / size


def torchscript_path(work: Path, size: str) -> Path:
    return repo_dir(work, size) / MODEL_NAME / "1" / "model.pt"


# -- models -----------------------------------------------------------------------------


def models(plan: Plan, phase: Phase) -> int:
    """The served model first (the later phases need it), then the others; FunASR parity
    while time allows (the served model's always)."""
    import torch
    from e2v.export.exporter import export_model

    phase.emit({"kind": "environment", **environment(plan.device)})
    if plan.device == "cuda" and not torch.cuda.is_available():
        phase.say("error: torch sees no CUDA device; for a CPU dry run use --cpu")
        return 2
    cache = Path(os.environ.get("E2V_CACHE") or phase.work / "cache")
    order = [plan.served_model] + [m for m in plan.models if m != plan.served_model]
    for size in order:
        parity = size == plan.served_model or phase.left_s() > PARITY_RESERVE_S
        phase.say(f"synthetic:{size}: checkpoint + export --target torch (parity: {parity})")
        start = time.monotonic()
        model_dir = export_model(
            f"synthetic:{size}",
            repo_dir(phase.work, size),
            target="torch",
            cache_dir=cache,
            check_parity=parity,
        )
        card = _read_card(model_dir)
        checks = {k: v for k, v in card["parity"].items() if isinstance(v, float)}
        phase.emit(
            {
                "kind": "model",
                "size": size,
                "seconds": round(time.monotonic() - start, 1),
                "embed_dim": card["embed_dim"],
                "parameters": _parameter_count(torchscript_path(phase.work, size)),
                "parity": checks,
            }
        )
        phase.say(f"synthetic:{size}: done in {time.monotonic() - start:.0f} s, parity {checks}")
    return 0


def environment(device: str) -> dict:
    import torch

    import e2v

    info = {
        "e2v": os.path.dirname(e2v.__file__),  # the package the phases ran (links kept)
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        # Triton's Python backend moves tensors through POSIX shared memory: a small
        # /dev/shm (containers default to 64 MiB) limits batch x length.
        "dev_shm_free_gib": round(shutil.disk_usage("/dev/shm").free / 2**30, 2),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(),
            "driver": _nvidia_smi("driver_version"),
        }
    return info


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return ""


def _read_card(model_dir: Path) -> dict:
    import json

    return json.loads((model_dir / "model_card.json").read_text())


def _parameter_count(path: Path) -> int:
    import torch

    module = torch.jit.load(str(path), map_location="cpu")
    return sum(p.numel() for p in module.parameters())


# -- model alone ------------------------------------------------------------------------


def alone(plan: Plan, phase: Phase) -> int:
    import torch
    from e2v.loadtest import model_alone

    workload = served_workload(plan.profile)
    total = phase.left_s()
    for size in plan.models:
        deadline = time.monotonic() + total * plan.alone_share.get(size, 0.5)
        path = torchscript_path(phase.work, size)
        if not path.exists():
            phase.emit({"kind": "note", "text": f"{size}: not exported (models phase)"})
            continue
        cpu_fp32 = model_alone.parity_outputs(model_alone.load(path, "cpu", "fp32"))
        reference: dict = {}
        for precision in plan.precisions:
            try:
                _alone_precision(
                    plan, phase, size, precision, deadline, workload, cpu_fp32, reference
                )
            except Exception as exc:  # noqa: BLE001 - one precision failing must not end the phase
                reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
                phase.emit({"kind": "note", "text": f"{size} {precision}: failed: {reason}"})
                phase.say(f"{size} {precision}: failed: {reason}")
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    if plan.device == "cuda":
        try:
            _probes(plan, phase)
        except Exception as exc:  # noqa: BLE001 - a probe is optional
            phase.emit({"kind": "note", "text": f"probes: failed: {str(exc)[:300]}"})
    return 0


def _alone_precision(plan, phase, size, precision, deadline, workload, cpu_fp32, reference):
    """Accuracy, the bucket x batch sweep and (served model) the workload for one precision.
    `reference` receives fp32's outputs on the device (fp32 runs first)."""
    from e2v.loadtest import model_alone

    phase.say(f"{size} {precision}: sweep {plan.buckets_s} s x batch {plan.batches}")
    runner = model_alone.load(torchscript_path(phase.work, size), plan.device, precision)
    outputs = model_alone.parity_outputs(runner)
    if not reference:
        reference.update(outputs)
    phase.emit(
        {
            "kind": "accuracy",
            "model": size,
            "precision": precision,
            "vs_fp32_same_device": model_alone.max_differences(outputs, reference),
            "vs_fp32_cpu": model_alone.max_differences(outputs, cpu_fp32),
        }
    )
    labels = {"kind": "sweep", "model": size, "precision": precision}
    model_alone.sweep(runner, plan.buckets_s, plan.batches, deadline, _printing(phase), labels)
    if size == plan.served_model and time.monotonic() < deadline:
        seconds = 3.0 if plan.device == "cuda" else 1.0
        row = model_alone.workload_alone(runner, workload, min(max(plan.users), 32), seconds)
        phase.emit({"kind": "workload", "model": size, "precision": precision} | row)
        phase.say(f"{size} {precision}: served workload alone {row['audio_s_per_s']} audio s/s")


def _printing(phase: Phase):
    def emit(row: dict) -> None:
        phase.emit(row)
        figures = (
            f"{row['audio_s_per_s']:>9.1f} audio s/s  {row['ms_per_batch']:>8.1f} ms"
            + (f"  peak {row['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in row else "")
            if row["status"] == "ok"
            else row["status"]
        )
        phase.say(
            f"{row['model']} {row['precision']} {row['bucket_s']:g} s x {row['batch']:<3} {figures}"
        )

    return emit


def _probes(plan: Plan, phase: Phase) -> None:
    """Would CUDA graphs or TorchScript's optimising executor pay? (the served model)"""
    from e2v.loadtest import model_alone

    path = torchscript_path(phase.work, plan.served_model)
    for precision in ("fp32", "fp16"):
        if phase.left_s() < 10:
            return
        runner = model_alone.load(path, "cuda", precision)
        for batch in (1, 8):
            row = model_alone.cuda_graph_probe(runner, batch, 3.0)
            phase.emit({"kind": "probe", "model": plan.served_model} | row)
            phase.say(f"CUDA graph probe {precision} 3 s x {batch}: {row}")
        del runner
    if phase.left_s() > 10:
        row = model_alone.executor_probe(path, "cuda", "fp16", 8, 3.0)
        phase.emit({"kind": "probe", "model": plan.served_model} | row)
        phase.say(f"TorchScript executor probe fp16 3 s x 8: {row}")


def served_workload(profile_name: str):
    """The profile's clips cut from speech-like signals. (`loadtest.workload.prepare_workload`
    encodes and decodes real files with PyAV, which bare GPU machines do not have.)"""
    from e2v.loadtest.profiles import load_profile
    from e2v.loadtest.workload import RECORDING_S, cut_clips, speech_like

    sources = [speech_like(RECORDING_S, SAMPLE_RATE, seed=i) for i in range(3)]
    return cut_clips(load_profile(profile_name), sources)


# -- served -----------------------------------------------------------------------------


def served(plan: Plan, phase: Phase) -> int:
    workload = served_workload(plan.profile)
    phase.emit(
        {
            "kind": "workload",
            "profile": plan.profile,
            "clips": len(workload),
            "audio_s": round(float(workload.lengths.sum()) / SAMPLE_RATE, 1),
        }
    )
    failures = 0
    for instances, precision in plan.layouts:
        if phase.left_s() < 20:
            label = layout_label(instances, precision)
            phase.emit({"kind": "layout", "layout": label, "status": "skipped (budget)"})
            continue
        failures += _serve_layout(plan, phase, workload, instances, precision)
    return 1 if failures else 0


def layout_label(instances: int, precision: str) -> str:
    """'2 instances, fp16': a served layout as the report names it."""
    return f"{instances} instance{'s' * (instances > 1)}, {precision}"


def layout_repo(work: Path, size: str, instances: int, precision: str) -> Path:
    """A repository whose config is what `e2v export --target torch --instances N
    --precision P` writes; the version directory is a symlink to the exported one."""
    from e2v.export.repository import ServingOptions, render_config

    source = repo_dir(work, size) / MODEL_NAME
    card = _read_card(source)
    options = ServingOptions(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in card["options"].items()}
    )
    options = replace(options, instance_count=instances, precision=precision)
    metadata = {
        "synthetic": "true" if card["synthetic"] else "false",
        "source": card["source"],
        "checkpoint_sha256": card["checkpoint_sha256"],
    }
    labels = len(card["labels"]) or None
    target = work / "layouts" / f"{size}-{instances}x-{precision}" / MODEL_NAME
    shutil.rmtree(target.parent, ignore_errors=True)
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "config.pbtxt":
            (target / entry.name).symlink_to(entry.resolve())
    config = render_config(MODEL_NAME, "torch", options, labels, card["embed_dim"], metadata)
    (target / "config.pbtxt").write_text(config)
    return target.parent


def _serve_layout(plan, phase, workload, instances: int, precision: str) -> int:
    from e2v.loadtest import closed_loop, triton_stats
    from e2v.loadtest.metrics import summarize

    from e2v.serve import ServeError, ServerConfig, TritonServer

    label = layout_label(instances, precision)
    repo = layout_repo(phase.work, plan.served_model, instances, precision)
    log_path = phase.work / f"tritonserver-{instances}x-{precision}.log"
    phase.say(f"{label}: starting tritonserver (log {log_path})")
    config = ServerConfig.on_free_ports(repo)
    server = TritonServer(config, log_path=log_path)
    pid_file = phase.work / "tritonserver.pid"
    start = time.monotonic()
    try:
        server.start(timeout_s=max(10.0, min(180.0, phase.left_s() - 10)))
        pid_file.write_text(str(server.process.pid))
        model_config = triton_stats.model_config(config.http_url)
        settings = triton_stats.config_summary(model_config)
        outputs = closed_loop.output_names(model_config)
        phase.say(
            f"{label}: ready in {time.monotonic() - start:.0f} s ({settings['instance_kind']})"
        )
        if plan.device == "cuda" and settings["instance_kind"] != "KIND_GPU":
            raise ValueError(
                f"Triton resolved KIND_AUTO to {settings['instance_kind']}: it sees no GPU"
            )
        warm_up(config.http_url, workload, outputs)
        for users in plan.users:
            if phase.left_s() < plan.warm_s + plan.measure_s + 5:
                phase.emit(
                    {"kind": "level", "layout": label, "users": users, "status": "skipped (budget)"}
                )
                continue
            before = triton_stats.snapshot(config.http_url)
            requests, errors = closed_loop.run_users(
                config.http_url,
                workload,
                users,
                plan.warm_s + plan.measure_s,
                outputs,
                processes=client_processes(),
            )
            server_stats = triton_stats.settled(config.http_url, before.handled + len(requests.ok))
            summary = summarize(requests, users, plan.warm_s + plan.measure_s, plan.warm_s)
            stats = (server_stats - before).as_dict()
            phase.emit(
                {
                    "kind": "level",
                    "layout": label,
                    "instances": instances,
                    "precision": precision,
                    "settings": settings,
                    "status": "ok",
                    "summary": summary.as_dict(),
                    "server": stats,
                    "errors": errors,
                }
            )
            phase.say(
                f"{label}, {users:>3} users: {summary.audio_s_per_s:8.1f} audio s/s  p50/95/99 "
                f"{summary.p50_ms:.0f}/{summary.p95_ms:.0f}/{summary.p99_ms:.0f} ms"
                f"  avg batch {stats['avg_batch_size']:.2f}  failed {summary.failures}"
                + (f"  errors: {errors}" if errors else "")
            )
        return 0
    except (ServeError, OSError, ValueError, closed_loop.InferError) as exc:
        phase.emit({"kind": "layout", "layout": label, "status": f"failed: {exc}"})
        phase.say(f"{label}: failed: {exc}")
        return 1
    finally:
        server.stop(timeout_s=10)  # within the parent's grace period
        server.__exit__(None, None, None)  # and its scratch directory
        pid_file.unlink(missing_ok=True)


def client_processes() -> int:
    """Load-generator processes: a quarter of the cores (the server needs the rest), 1-4."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def warm_up(http_url: str, workload, outputs: list[str]) -> None:
    """One request per length bucket, outside the measurement."""
    from e2v.loadtest.closed_loop import Connection

    connection = Connection(http_url)
    try:
        for index in workload.one_per_bucket():
            connection.infer(*workload.padded(index), outputs)
    finally:
        connection.close()
