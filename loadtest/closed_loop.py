"""Closed-loop load on Triton over HTTP with the standard library only.

For machines that have no tritonclient (it needs gevent or grpcio, and pins protobuf and
ml-dtypes below what torch/onnx bring): requests use the KServe v2 binary tensor extension
on persistent `http.client` connections, one thread per user. Each user sends a clip,
waits for the answer and sends the next (no think time), so `users` is the number of
requests in flight. Triton's statistics and the model's configuration come from
`loadtest.triton_stats` (the standard library too).
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time

import numpy as np
from e2v.loadtest.metrics import Requests
from e2v.loadtest.workload import Workload

from e2v.contract import INPUT_WAV, INPUT_WAV_LENS, MODEL_NAME, OUTPUT_EMBEDDING, OUTPUT_SCORES

HEADER_LENGTH = "Inference-Header-Content-Length"


class InferError(Exception):
    """Triton answered a request with an error; the message is Triton's."""


def encode_request(wav: np.ndarray, lens: np.ndarray, outputs: list[str]) -> tuple[bytes, int]:
    """(body, JSON header length) of a binary-extension inference request."""
    wav_bytes = np.ascontiguousarray(wav, dtype=np.float32).tobytes()
    lens_bytes = np.ascontiguousarray(lens, dtype=np.int64).tobytes()
    header = {
        "inputs": [
            _input(INPUT_WAV, wav.shape, "FP32", len(wav_bytes)),
            _input(INPUT_WAV_LENS, lens.shape, "INT64", len(lens_bytes)),
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }
    head = json.dumps(header).encode()
    return head + wav_bytes + lens_bytes, len(head)


def _input(name: str, shape, datatype: str, size: int) -> dict:
    return {
        "name": name,
        "shape": list(shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


def decode_response(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    """Output arrays (FP32) from a binary-extension response; raises InferError on errors."""
    head = json.loads(body[: header_length or len(body)])
    if "error" in head:
        raise InferError(head["error"])
    arrays, offset = {}, header_length or len(body)
    for output in head.get("outputs", []):
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.asarray(output["data"], np.float32)
            continue
        data = np.frombuffer(body[offset : offset + size], dtype=np.float32)
        arrays[output["name"]] = data.reshape(output["shape"])
        offset += size
    return arrays


class Connection:
    """One persistent HTTP connection to Triton's inference endpoint."""

    def __init__(self, url: str, model: str = MODEL_NAME, timeout_s: float = 120.0):
        host, port = url.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        self.path = f"/v2/models/{model}/infer"

    def infer(self, wav: np.ndarray, lens: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        body, head_length = encode_request(wav, lens, outputs)
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(head_length)}
        self.connection.request("POST", self.path, body=body, headers=headers)
        response = self.connection.getresponse()
        data = response.read()
        length = response.getheader(HEADER_LENGTH)
        if response.status != 200:
            raise InferError(_error_text(data, response.status))
        return decode_response(data, int(length) if length else None)

    def close(self) -> None:
        self.connection.close()


def _error_text(data: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(data)['error']}"
    except (ValueError, KeyError):
        return f"HTTP {status}: {data[:200]!r}"


def run_users(
    http_url: str,
    workload: Workload,
    users: int,
    duration_s: float,
    outputs: list[str],
    processes: int = 1,
) -> tuple[Requests, list[str]]:
    """`users` closed-loop users for `duration_s`: every request's end time (since the start),
    latency and audio, plus the distinct error messages. Requests in flight at the end are
    finished and logged (Triton counts them too). With `processes` > 1 the users are spread
    over that many forked processes, so one interpreter's lock does not cap the load."""
    processes = max(1, min(processes, users))
    shares = [users // processes + (i < users % processes) for i in range(processes)]
    offsets = np.cumsum([0, *shares[:-1]]).tolist()
    jobs = [
        (http_url, workload, n, duration_s, outputs, offset) for n, offset in zip(shares, offsets)
    ]
    if processes == 1:
        parts = [_user_threads(*jobs[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.starmap(_user_threads, jobs)
    rows = np.concatenate([rows for rows, _ in parts]).reshape(-1, 4)
    requests = Requests(
        end_s=rows[:, 0],
        latency_ms=rows[:, 1],
        audio_s=rows[:, 2],
        ok=rows[:, 3].astype(bool),
        users=np.full(len(rows), users, dtype=np.int64),
    )
    return requests, sorted({e for _, errors in parts for e in errors})


def _user_threads(
    http_url: str,
    workload: Workload,
    users: int,
    duration_s: float,
    outputs: list[str],
    offset: int,
) -> tuple[np.ndarray, list[str]]:
    """`users` threads, each a closed-loop user; clips round robin from `offset`."""
    order = itertools.count(offset)
    lock = threading.Lock()
    log: list[tuple[float, float, float, bool]] = []
    errors: set[str] = set()
    start = time.perf_counter()

    def user() -> None:
        connection = Connection(http_url)
        try:
            while time.perf_counter() - start < duration_s:
                with lock:
                    index = next(order) % len(workload)
                wav, lens = workload.padded(index)
                sent = time.perf_counter()
                ok = True
                try:
                    ok = _plausible(connection.infer(wav, lens, outputs))
                    if not ok:
                        errors.add("implausible outputs (NaN, or SCORES not summing to 1)")
                except (InferError, OSError, http.client.HTTPException) as exc:
                    ok = False
                    errors.add(str(exc).splitlines()[0][:200])
                    connection.close()
                    connection = Connection(http_url)
                done = time.perf_counter()
                with lock:
                    log.append((done - start, (done - sent) * 1e3, workload.duration_s(index), ok))
        finally:
            connection.close()

    threads = [threading.Thread(target=user, daemon=True) for _ in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.array(log, dtype=np.float64).reshape(-1, 4), sorted(errors)


def _plausible(outputs: dict[str, np.ndarray]) -> bool:
    if any(not np.isfinite(v).all() for v in outputs.values()):
        return False
    scores = outputs.get(OUTPUT_SCORES)
    return scores is None or bool(np.all(np.abs(scores.sum(-1) - 1.0) < 1e-2))


def output_names(config: dict) -> list[str]:
    """SCORES and EMBEDDING, or EMBEDDING alone for models without a head."""
    names = [o["name"] for o in config.get("output", [])]
    return names or [OUTPUT_SCORES, OUTPUT_EMBEDDING]
