"""The baseline: emotion2vec as commonly served today, FunASR `AutoModel` behind HTTP.

One process, one request at a time (the stdlib's single-threaded `HTTPServer`, like a
one-worker Flask/FastAPI app): `POST /infer` takes raw little-endian float32 16 kHz
mono PCM (the clip, unpadded) and answers `{"labels": [...], "scores": [...]}` from
`AutoModel.generate`. `GET /health` answers 200 once the model is loaded.

    python -m e2v.loadtest.baseline_server --model synthetic:base --port 8500
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np

from e2v.contract import SAMPLE_RATE


def load_model(model_dir: Path, device: str, threads: int):
    """FunASR's AutoModel as its README shows, with exactly `threads` torch threads
    (`ncpu`; see export.parity.funasr_model for why it must be passed)."""
    from e2v.export.parity import funasr_model

    return funasr_model(model_dir, device, threads)


class Handler(BaseHTTPRequestHandler):
    model = None  # set by serve()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path != "/health":
            return self._reply(404, {"ok": False})
        import torch

        # The threads FunASR actually runs with, for the report (checked, not assumed).
        self._reply(200, {"ok": True, "torch_threads": torch.get_num_threads()})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/infer":
            return self._reply(404, {"error": "POST /infer"})
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        wav = np.frombuffer(body, dtype="<f4")
        if wav.size < 400:
            return self._reply(400, {"error": f"{wav.size} samples: need >= 400 float32"})
        result = self.model.generate(wav, granularity="utterance", disable_pbar=True)[0]
        scores = np.asarray(result["scores"]).tolist()
        self._reply(200, {"labels": result["labels"], "scores": scores})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet: one line per request would dominate
        pass


class QueueingHTTPServer(HTTPServer):
    request_queue_size = 256  # waiting clients queue in the kernel, not refused


def serve(model_dir: Path, host: str, port: int, device: str, threads: int) -> None:
    Handler.model = load_model(model_dir, device, threads)
    with QueueingHTTPServer((host, port), Handler) as server:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.serve_forever()


class BaselineServer:
    """`python -m e2v.loadtest.baseline_server` as a subprocess; a context manager."""

    def __init__(
        self,
        model_dir: Path,
        port: int,
        device: str = "cpu",
        threads: int | None = None,
        host: str = "127.0.0.1",
    ):
        self.url = f"{host}:{port}"
        self.log_path = Path(tempfile.mkstemp(prefix="e2v-baseline-", suffix=".log")[1])
        self.command = [
            sys.executable,
            "-m",
            "e2v.loadtest.baseline_server",
            "--model",
            str(model_dir),
            "--host",
            host,
            "--port",
            str(port),
            "--device",
            device,
            "--threads",
            str(threads or os.cpu_count() or 1),
        ]
        self.process: subprocess.Popen | None = None
        self.torch_threads: int | None = None  # as the server reports it once loaded

    def __enter__(self) -> BaselineServer:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s=300.0)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._log_tail()
                self.__exit__()
                raise RuntimeError("baseline server exited:\n  " + "\n  ".join(tail))
            try:
                with urllib.request.urlopen(f"http://{self.url}/health", timeout=2) as answer:
                    self.torch_threads = int(json.loads(answer.read())["torch_threads"])
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        tail = self._log_tail()
        self.__exit__()
        raise RuntimeError(
            f"baseline server not ready after {timeout_s:.0f} s:\n  " + "\n  ".join(tail)
        )

    def _log_tail(self) -> list[str]:
        return self.log_path.read_text(errors="replace").strip().splitlines()[-5:]

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_path.unlink(missing_ok=True)


def measure_in_process(
    model_dir: Path, clips: list[np.ndarray], threads: int, budget_s: float, device: str = "cpu"
) -> dict:
    """FunASR's own speed on `clips` in this process, no HTTP, one clip at a time, for
    about `budget_s`: what the baseline server should reach (its ratio to this is checked)."""
    import torch

    model = load_model(model_dir, device, threads)
    model.generate(clips[0], granularity="utterance", disable_pbar=True)  # warm up
    audio, count, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        clip = clips[count % len(clips)]
        model.generate(clip, granularity="utterance", disable_pbar=True)
        audio, count = audio + len(clip), count + 1
    elapsed = time.perf_counter() - start
    return {
        "audio_s_per_s": audio / SAMPLE_RATE / elapsed,
        "clips": count,
        "torch_threads": torch.get_num_threads(),
    }


def infer(url: str, wav: np.ndarray, timeout_s: float = 300.0) -> dict:
    """One blocking request (used for warm-up)."""
    request = urllib.request.Request(
        f"http://{url}/infer",
        data=wav.astype("<f4").tobytes(),
        method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="FunASR model directory or a source (synthetic:base, a hub name)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch intra-op threads (default: all cores)",
    )
    args = parser.parse_args(argv)
    serve(resolve_model_dir(args.model), args.host, args.port, args.device, args.threads)
    return 0


def resolve_model_dir(source: str) -> Path:
    """A FunASR model directory for `source` (a directory, synthetic:*, or a hub name)."""
    from e2v.export.checkpoint import resolve_source
    from e2v.export.exporter import default_cache_dir

    return resolve_source(source, default_cache_dir())[0]


if __name__ == "__main__":
    sys.exit(main())
