"""ONNX Runtime alone: the same clips through the same ONNX file, no server, no network.

The upper bound for serving: clips are sent in the load test's order, `batch_size` at a
time (the requests in flight), grouped by length bucket (as the dynamic batcher groups
them), run back to back in this process. Served throughput divided by this one is the
serving overhead ratio. Parallel sessions mirror the server's instances x threads layout.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from e2v.loadtest.workload import Workload

from e2v.contract import INPUT_WAV, INPUT_WAV_LENS


def session(onnx_path: Path, threads: int, device: str = "cpu"):
    """An ORT session configured like the served model (intra-op threads, full graph opts)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)


def in_flight_batches(workload: Workload, batch_size: int) -> Iterator[list[int]]:
    """Clip indices per batch, endlessly: the users' round-robin sequence cut into windows
    of `batch_size` requests in flight, each window split by length bucket (what the
    dynamic batcher can group)."""
    for window in itertools.count():
        groups: dict[int, list[int]] = defaultdict(list)
        for offset in range(batch_size):
            index = (window * batch_size + offset) % len(workload)
            groups[int(workload.padded(index)[0].shape[1])].append(index)
        yield from groups.values()


def stack(workload: Workload, indices: list[int]) -> dict[str, np.ndarray]:
    """ORT feeds for clips `indices` (all of one bucket): WAV [b, T], WAV_LENS [b]."""
    rows = [workload.padded(i) for i in indices]
    return {
        INPUT_WAV: np.concatenate([wav for wav, _ in rows]),
        INPUT_WAV_LENS: np.concatenate([lens.reshape(-1) for _, lens in rows]),
    }


def measure(
    onnx_path: Path,
    workload: Workload,
    batch_size: int,
    threads: int,
    sessions: int = 1,
    budget_s: float = 30.0,
    device: str = "cpu",
) -> dict:
    """Audio seconds per second of `sessions` parallel sessions (like model instances,
    `threads` intra-op threads each) running batches back to back for about `budget_s`.

    One single-row warm-up per bucket runs first on each session, as Triton warms up.
    """
    workers = [session(onnx_path, threads, device) for _ in range(sessions)]
    buckets = {int(workload.padded(i)[0].shape[1]): i for i in range(len(workload))}
    for worker, index in itertools.product(workers, buckets.values()):
        worker.run(None, stack(workload, [index]))
    batches, lock, done = in_flight_batches(workload, batch_size), threading.Lock(), []
    start = time.perf_counter()

    def loop(worker) -> None:
        while time.perf_counter() - start < budget_s:
            with lock:
                indices = next(batches)
            feeds = stack(workload, indices)
            worker.run(None, feeds)  # ONNX Runtime releases the GIL: sessions run in parallel
            done.append(indices)

    pool = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - start
    clips = [i for indices in done for i in indices]
    return {
        "batch_size": batch_size,
        "sessions": sessions,
        "threads": threads,
        "clips": len(clips),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(clips) / elapsed, 3),
        "audio_s_per_s": round(sum(workload.duration_s(i) for i in clips) / elapsed, 3),
    }
