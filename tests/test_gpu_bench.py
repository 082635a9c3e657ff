"""The one-shot GPU benchmark: its CPU dry run, its report, its budgets and what it carries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2v.loadtest.gpu import report as gpu_report
from e2v.loadtest.gpu.plan import CPU_PLAN, GPU_PLAN, PHASES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-bench.sh"
CARRY = ROOT / "build" / "carry"
MANIFEST = ROOT / "loadtest" / "gpu-carry.txt"
DEVICE_CALL_LIMIT = 64 * 2**20  # bytes a device call carries: working tree + carried paths
RUN_LIMIT_S = 8 * 60


def bench(*args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


@pytest.mark.slow
def test_cpu_dry_run_writes_a_complete_report(tmp_path):
    """The same command CI can afford: synthetic:tiny on the CPU, every phase, real server."""
    report = tmp_path / "report"
    result = bench("--cpu", env={"OUT": str(report), "E2V_GPU_WORK": str(tmp_path / "work")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    files = sorted(p.relative_to(report) for p in report.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(p.parts) <= 2 for p in files)
    assert {"report.md", "report.json", "log.txt", "alone-throughput.png", "served.png"} <= {
        str(p) for p in files
    }
    data = json.loads((report / "report.json").read_text())
    assert [p["status"] for p in data["phases"]] == ["ok"] * len(PHASES)
    # The phases ran the script's view of the tree, as on a bare machine with nothing
    # installed (the repository's own e2v/ folder lacks e2v.loadtest).
    assert data["environment"]["e2v"] == str(tmp_path / "work" / "source" / "e2v")
    model = data["models"][0]
    assert model["size"] == "tiny" and model["parity"]["torch_batched_SCORES"] <= 1e-5
    measured = {r["precision"] for r in data["alone"]["sweep"] if r["status"] == "ok"}
    assert measured == set(CPU_PLAN.precisions)
    accuracy = {r["precision"]: r["vs_fp32_same_device"] for r in data["alone"]["accuracy"]}
    assert accuracy["fp32"]["SCORES"] == 0 and 0 < accuracy["bf16"]["SCORES"] < 0.05
    levels = data["served"]["levels"]
    assert [lv["summary"]["users"] for lv in levels] == list(CPU_PLAN.users)
    for level in levels:
        assert level["summary"]["requests"] > 0 and level["summary"]["failures"] == 0
        assert level["server"]["avg_batch_size"] >= 1 and level["errors"] == []
        assert level["settings"]["backend"] == "python"
        assert level["settings"]["instance_kind"] == "KIND_CPU"  # KIND_AUTO without a GPU
    live = data["live"]
    first = live["levels"][0]
    assert first["channels"] == CPU_PLAN.live_channels[0] and first["failures"] == 0
    assert first["requests"] > 0 and first["server"]["success"] >= first["requests"]
    assert first["interim_ms"]["count"] > 0 and first["server"]["avg_batch_size"] >= 1
    markdown = (report / "report.md").read_text()
    assert "SYNTHETIC" in markdown and "| 1 instance, fp32 | 2 |" in markdown
    assert "## Live calls" in markdown and f"| {CPU_PLAN.live_channels[0]} |" in markdown
    assert "== served: ok" in (report / "log.txt").read_text()
    assert "== live: ok" in (report / "log.txt").read_text()


def test_gpu_run_refuses_a_python_other_than_3_12(tmp_path):
    if sys.version_info[:2] == (3, 12):
        pytest.skip("this Python is 3.12")
    result = bench(env={"OUT": str(tmp_path / "r"), "E2V_GPU_WORK": str(tmp_path / "w")})
    assert result.returncode == 2
    assert "is not Python 3.12" in result.stderr
    assert not (tmp_path / "r").exists()


def test_gpu_run_fits_its_time_budget():
    """Install + every phase + one grace period stays within the 8 minutes promised."""
    install = int(re.search(r"INSTALL_BUDGET_S=(\d+)", SCRIPT.read_text()).group(1))
    assert install + GPU_PLAN.total_budget_s <= RUN_LIMIT_S
    assert set(GPU_PLAN.budgets) == {*PHASES, "report"}
    assert GPU_PLAN.precisions[0] == "fp32" and max(GPU_PLAN.batches) == 64
    assert set(GPU_PLAN.buckets_s) == {3.0, 10.0, 30.0}
    assert set(GPU_PLAN.models) == {"base", "large"}
    assert max(GPU_PLAN.live_channels) >= 2000  # the goal: 2,000 calls per H100


def tracked_bytes() -> int:
    """What a device call copies of the working tree: tracked and untracked-but-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = {ROOT / p.decode() for p in listed if p}
    return sum(p.stat().st_size for p in paths if p.is_file())


def carried_bytes() -> dict[str, int]:
    """build/carry as built here, else as listed by scripts/gpu-carry.sh."""
    if CARRY.is_dir():
        return {
            str(p.relative_to(CARRY)): p.stat().st_size for p in CARRY.rglob("*") if p.is_file()
        }
    rows = [line.rsplit(" ", 1) for line in MANIFEST.read_text().splitlines() if line.strip()]
    return {name: int(size) for name, size in rows}


def test_everything_that_travels_fits_64_mib():
    carried = carried_bytes()
    assert "tritonserver-py312.tar.xz" in carried and "libpython3.12.so.1.0.xz" in carried
    assert any(name.startswith("wheels/funasr-") for name in carried)
    total = tracked_bytes() + sum(carried.values())
    assert total <= DEVICE_CALL_LIMIT, f"{total / 2**20:.1f} MiB travels"


def test_carry_folder_matches_its_list():
    if not CARRY.is_dir():
        pytest.skip("build/carry not built here (scripts/gpu-carry.sh)")
    rows = [line.rsplit(" ", 1) for line in MANIFEST.read_text().splitlines() if line.strip()]
    assert {name: int(size) for name, size in rows} == carried_bytes()


def gpu_shaped_results() -> dict[str, list[dict]]:
    """Rows as the GPU phases write them (peak memory, probes), for the report alone."""
    env = {"kind": "environment", "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2}
    env |= {"python": "3.12.3", "torch": "2.11.0", "cuda": "13.0", "numpy": "2.5.0"}
    sweep = [
        {"kind": "sweep", "model": m, "precision": p, "bucket_s": b, "batch": n, "status": "ok",
         "calls": 3, "ms_per_batch": 10.0 * n, "audio_s_per_s": b * 100 / (1 + (p == "fp32")),
         "peak_memory_gib": 0.5 * n}
        for m in ("base", "large") for p in ("fp32", "fp16") for b in (3.0, 30.0) for n in (1, 64)
    ]  # fmt: skip
    sweep[-1] = {**sweep[-1], "status": "out of memory"}
    for key in ("calls", "ms_per_batch", "audio_s_per_s", "peak_memory_gib"):
        sweep[-1].pop(key)
    probes = [
        {"kind": "probe", "probe": "cuda_graph", "precision": "fp16", "batch": 1,
         "bucket_s": 3.0, "status": "ok", "eager_ms": 4.0, "graph_ms": 2.0, "speedup": 2.0},
        {"kind": "probe", "probe": "cuda_graph", "precision": "fp32", "batch": 8,
         "bucket_s": 3.0, "status": "failed: capture error"},
        {"kind": "probe", "probe": "jit_optimized_execution", "precision": "fp16", "batch": 8,
         "bucket_s": 3.0, "status": "ok", "plain_ms": 5.0, "optimized_ms": 4.0, "speedup": 1.25},
    ]  # fmt: skip
    return {
        "models": [env, {"kind": "model", "size": "base", "seconds": 20.0, "embed_dim": 768,
                         "parameters": 94_000_000, "parity": {"torch_batched_SCORES": 1e-7}}],
        "alone": sweep + probes + [{"kind": "note", "text": "large bf16: failed: kaput"}],
        "served": [{"kind": "layout", "layout": "2 instances, fp32", "status": "failed: boom"}],
    }  # fmt: skip


def test_report_renders_gpu_rows_and_names_what_was_not_measured(tmp_path):
    phases = [
        {"phase": "models", "status": "ok", "seconds": 50},
        {"phase": "alone", "status": "stopped at its time budget", "seconds": 165},
        {"phase": "served", "status": "failed (exit 1)", "seconds": 30},
    ]
    written = gpu_report.write(tmp_path, vars(GPU_PLAN), phases, gpu_shaped_results(), 2.5, 300)
    assert {p.name for p in written} == {
        "report.md",
        "report.json",
        "alone-throughput.png",
        "alone-memory.png",
    }
    markdown = (tmp_path / "report.md").read_text()
    assert "on NVIDIA H100 80GB HBM3" in markdown
    assert f"| alone | stopped at its time budget | 165 | {GPU_PLAN.budgets['alone']} |" in markdown
    assert "**peak GiB**" in markdown and "out of memory" in markdown
    assert "| fp16 | 1 | 4.0 | 2.0 | 2.00x |" in markdown and "failed: capture error" in markdown
    assert "optimising executor 4.0 ms (1.25x)" in markdown
    assert "not measured: 2 instances, fp32: failed: boom" in markdown
    assert "not measured: large bf16: failed: kaput" in markdown
    assert "## Live calls" in markdown and "Not measured (the phase did not run)." in markdown
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["alone_best"]["base fp16"]["vs_fp32"] == 2.0


def test_live_phase_replays_the_gateways_requests():
    """Per call: an interim window per hop of speech per party, padded to the window's
    bucket (one shape), and one final per utterance in its own bucket, due after the merge
    gap; calls at random phases spread the load evenly."""
    import numpy as np
    from e2v.loadtest.gpu import live as gpu_live

    rows = gpu_live.call_timeline(np.random.default_rng(3), 3.0, 1.0)
    interims, finals = rows[rows[:, 2] == 0], rows[rows[:, 2] == 1]
    assert len(finals) >= 8 and len(interims) > 2 * len(finals)
    assert {gpu_live.padded_size(n, False, 3.0) for n in interims[:, 1]} == {48_000}
    assert all(gpu_live.padded_size(n, True, 3.0) >= n for n in finals[:, 1])
    assert 0.5 < gpu_live.rate_per_channel(3.0, 1.0) < 2.0  # about one request/s per call
    level = gpu_live.schedule(500, 10.0, 3.0, 1.0)
    assert np.all(np.diff(level[:, 0]) >= 0) and level[:, 0].max() < 10.0
    per_second = np.bincount(level[:, 0].astype(int))
    assert per_second.min() > 0.6 * per_second.mean()  # no synchronised bursts
    assert gpu_live.within_target({"failures": 0, "all_ms": {"count": 5, "p95": 149.0}})
    assert not gpu_live.within_target({"failures": 1, "all_ms": {"count": 5, "p95": 20.0}})
