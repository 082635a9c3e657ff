"""Memory of the served model around a maximum-size batch, for `e2v loadtest --compare`.

docs/deploy.md sizes Kubernetes limits from the Python-backend stub's steady memory plus the
peak of one maximum call. This phase measures both on the running server, then checks that
the stub returns to its steady level, which is what bounds a long-lived replica.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from e2v.loadtest.workload import triton_inputs

from e2v import leftovers
from e2v.contract import MAX_BATCH_SAMPLES, MAX_SAMPLES, MODEL_NAME

MIB = 2**20
# Back within this much of the steady level counts as returned (allocator slack).
SETTLED_MIB = 16


def stub_anon_mib(shm_prefix: str) -> int:
    """Anonymous resident memory of the server's Python-backend stubs, summed, in MiB."""
    total = 0
    for pid in leftovers.stub_processes(shm_prefix):
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) // 1024
        except OSError:  # the stub exited between the listing and the read
            continue
    return total


def max_batch_memory(grpc_url: str, shm_prefix: str, settle_s: float = 20.0) -> dict:
    """Stub memory (MiB) at rest, at the peak of maximum-size requests (one of
    MAX_BATCH_SAMPLES, then 8 maximum-length rows at once: a full dynamic batch, run in
    parts), and after them, once back within SETTLED_MIB or after `settle_s`."""
    small = [np.zeros((1, 48_000), np.float32)]
    asyncio.run(_infer(grpc_url, small * 3))
    steady = stub_anon_mib(shm_prefix)
    rows = MAX_BATCH_SAMPLES // MAX_SAMPLES
    biggest = [np.full((rows, MAX_SAMPLES), 0.01, np.float32)]
    full_batch = [np.full((1, MAX_SAMPLES), 0.01, np.float32)] * 8
    with _PeakSampler(shm_prefix) as peak:
        asyncio.run(_infer(grpc_url, biggest))
        asyncio.run(_infer(grpc_url, full_batch))
    deadline = time.monotonic() + settle_s
    while True:
        asyncio.run(_infer(grpc_url, small))
        after = stub_anon_mib(shm_prefix)
        if after <= steady + SETTLED_MIB or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {
        "steady_mib": steady,
        "peak_mib": peak.value,
        "after_mib": after,
        "returned": after <= steady + SETTLED_MIB,
        "requests": f"1 x {rows} rows of {MAX_SAMPLES} samples, then 8 x 1 row at once",
    }


class _PeakSampler:
    """The highest stub memory seen every 5 ms while the block runs (a lower bound)."""

    def __init__(self, shm_prefix: str) -> None:
        self.shm_prefix, self.value = shm_prefix, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, stub_anon_mib(self.shm_prefix))
            self._stop.wait(0.005)


async def _infer(grpc_url: str, batches: list[np.ndarray]) -> None:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        await asyncio.gather(*(_one(client, grpcclient, wav) for wav in batches))
    finally:
        await client.close()


async def _one(client, module, wav: np.ndarray) -> None:
    lens = np.full((wav.shape[0], 1), wav.shape[1], np.int64)
    await client.infer(MODEL_NAME, triton_inputs(module, wav, lens), client_timeout=300)
