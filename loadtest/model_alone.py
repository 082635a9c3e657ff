"""The model alone: the torch target's own runner, without Triton, timed on one device.

`TorchRunner` (model_repository/python_backend/torch_model.py) is what the served model
runs, pinned-memory copies included, so served / alone is the serving overhead. Figures,
not assertions: audio seconds per wall second at each length bucket and batch size, peak
GPU memory, and the numeric distance of fp16/bf16 from fp32.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from e2v.export.parity import pad_batch, parity_clips
from e2v.loadtest.bare_ort import in_flight_batches, stack
from e2v.loadtest.workload import Workload
from e2v.model_repository.python_backend.torch_model import TorchRunner

from e2v.contract import INPUT_WAV, INPUT_WAV_LENS, OUTPUT_EMBEDDING, OUTPUT_SCORES, SAMPLE_RATE

Emit = Callable[[dict], None]


def load(path: Path, device: str, precision: str) -> TorchRunner:
    return TorchRunner(str(path), device=device, precision=precision)


def time_batch(
    runner: TorchRunner,
    batch: int,
    bucket_s: float,
    warmup: int = 1,
    min_time_s: float = 0.3,
    min_calls: int = 2,
    max_calls: int = 50,
) -> dict:
    """Full-length rows of one bucket, `batch` at a time: seconds per call, audio s/s, peak
    memory. The first `warmup` calls (allocator growth, library handles) are untimed; the
    served runner executes the traced graph as recorded, so nothing is compiled later."""
    samples = int(bucket_s * SAMPLE_RATE)
    generator = torch.Generator().manual_seed(batch)
    wav = torch.randn(batch, samples, generator=generator) * 0.1
    lens = torch.full((batch,), samples, dtype=torch.int64)
    row = {"batch": batch, "bucket_s": bucket_s}
    try:
        for _ in range(warmup):
            runner.run([wav], [lens])
        if runner.cuda:
            torch.cuda.reset_peak_memory_stats(runner.device)
        calls, start = 0, time.perf_counter()
        while calls < max_calls and (calls < min_calls or time.perf_counter() - start < min_time_s):
            runner.run([wav], [lens])
            calls += 1
        per_call = (time.perf_counter() - start) / calls
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return row | {"status": "out of memory"}
    row |= {
        "status": "ok",
        "calls": calls,
        "ms_per_batch": round(per_call * 1e3, 3),
        "audio_s_per_s": round(batch * bucket_s / per_call, 2),
    }
    if runner.cuda:
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(runner.device) / 2**30, 3)
    return row


def sweep(
    runner: TorchRunner,
    buckets_s: tuple[float, ...],
    batches: tuple[int, ...],
    deadline: float,
    emit: Emit,
    labels: dict,
) -> None:
    """`time_batch` over buckets x batch sizes; stops a bucket at the first out-of-memory and
    everything at `deadline` (time.monotonic), emitting what was skipped."""
    for bucket_s in buckets_s:
        for batch in batches:
            if time.monotonic() > deadline:
                emit(labels | {"bucket_s": bucket_s, "batch": batch, "status": "skipped (budget)"})
                continue
            row = labels | time_batch(runner, batch, bucket_s)
            emit(row)
            if row["status"] != "ok":
                break


def parity_outputs(runner: TorchRunner) -> dict[str, np.ndarray]:
    """Outputs for the exporter's parity clips, batched (the same clips as the model card)."""
    wav, lens = pad_batch(parity_clips())
    outputs = runner.run([torch.from_numpy(wav)], [torch.from_numpy(lens)])
    names = [OUTPUT_SCORES, OUTPUT_EMBEDDING] if len(outputs) == 2 else [OUTPUT_EMBEDDING]
    return {name: out.numpy() for name, out in zip(names, outputs)}


def max_differences(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    return {name: float(np.abs(ours[name] - reference[name]).max()) for name in reference}


def workload_alone(
    runner: TorchRunner, workload: Workload, batch_size: int, budget_s: float
) -> dict:
    """The served workload's clips, grouped by bucket in windows of `batch_size` (what the
    dynamic batcher can form with that many requests in flight), run back to back."""
    buckets = {int(workload.padded(i)[0].shape[1]): i for i in range(len(workload))}
    for index in buckets.values():  # one row per bucket first, as Triton's warm-up does
        _run_clips(runner, workload, [index])
    batches, clips = in_flight_batches(workload, batch_size), []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        indices = next(batches)
        _run_clips(runner, workload, indices)
        clips += indices
    elapsed = time.perf_counter() - start
    audio = sum(workload.duration_s(i) for i in clips)
    return {
        "batch_size": batch_size,
        "clips": len(clips),
        "elapsed_s": round(elapsed, 3),
        "audio_s_per_s": round(audio / elapsed, 2),
    }


def _run_clips(runner: TorchRunner, workload: Workload, indices: list[int]) -> None:
    feeds = stack(workload, indices)
    runner.run([torch.from_numpy(feeds[INPUT_WAV])], [torch.from_numpy(feeds[INPUT_WAV_LENS])])


def cuda_graph_probe(runner: TorchRunner, batch: int, bucket_s: float, calls: int = 20) -> dict:
    """Device time per call of the module, launched op by op vs replayed as one CUDA graph
    captured for this exact shape (inputs already on the GPU in both cases)."""
    samples = int(bucket_s * SAMPLE_RATE)
    wav = torch.randn(batch, samples, device=runner.device) * 0.1
    lens = torch.full((batch,), samples, dtype=torch.int64, device=runner.device)
    row = {"probe": "cuda_graph", "precision": runner.precision, "batch": batch}
    row["bucket_s"] = bucket_s

    def call():  # the same context for both, so only the launching differs
        with torch.inference_mode(), runner.autocast(cache=False), runner.executor():
            return runner.module(wav, lens)

    try:
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                call()
        torch.cuda.current_stream(runner.device).wait_stream(side)
        eager_ms = _device_ms(call, calls)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph_ms = _device_ms(graph.replay, calls)
    except Exception as exc:  # noqa: BLE001 - capture fails in many ways; report which
        return row | {"status": f"failed: {str(exc).strip().splitlines()[0][:200]}"}
    return row | {
        "status": "ok",
        "eager_ms": round(eager_ms, 3),
        "graph_ms": round(graph_ms, 3),
        "speedup": round(eager_ms / graph_ms, 3),
    }


def executor_probe(path: Path, device: str, precision: str, batch: int, bucket_s: float) -> dict:
    """TorchScript's optimising executor (profiling, fusion) against plain execution of the
    traced graph (the served default), each timed after 8 warm-up calls of one shape."""
    times = {}
    for optimized in (False, True):
        runner = TorchRunner(str(path), device, precision, optimized_execution=optimized)
        times[optimized] = time_batch(runner, batch, bucket_s, warmup=8, min_calls=10)
        del runner
    row = {"probe": "jit_optimized_execution", "precision": precision, "batch": batch}
    row["bucket_s"] = bucket_s
    if not all(t["status"] == "ok" for t in times.values()):
        return row | {"status": "; ".join(t["status"] for t in times.values())}
    plain, optimized = times[False]["ms_per_batch"], times[True]["ms_per_batch"]
    return row | {
        "status": "ok",
        "plain_ms": plain,
        "optimized_ms": optimized,
        "speedup": round(plain / optimized, 3),
    }


def _device_ms(function: Callable, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3
