"""A gateway as a child process on a free loopback port (tests and load tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from e2v.contract import GATEWAY_LIVE_PATH, GATEWAY_READY_PATH


class GatewayProcess:
    """`python -m e2v gateway --url URL ...`; `url` is its http://127.0.0.1:PORT."""

    def __init__(
        self,
        triton: str,
        *args: str,
        protocol: str = "grpc",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ):
        from e2v.serve import free_ports

        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "e2v",
            "gateway",
            "--url",
            triton,
            "--protocol",
            protocol,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout_s: float = 60.0, ready: bool = True) -> GatewayProcess:
        """Start and wait for /ready (Triton's model known: sessions and uploads are served);
        `ready=False` waits only for /health, for a gateway whose Triton is not up."""
        if self.log_path is None:  # made here, not in __init__: stop() removes it
            self.log_path = Path(tempfile.mkstemp(prefix="e2v-gateway-", suffix=".log")[1])
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        path = GATEWAY_READY_PATH if ready else GATEWAY_LIVE_PATH
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                message = f"gateway exited ({self.process.returncode}): {self.log()}"
                self.stop()
                raise RuntimeError(message)
            if self.status(path) == 200:
                return self
            time.sleep(0.2)
        message = f"gateway not answering {path} after {timeout_s:.0f} s: {self.log()}"
        self.stop()
        raise RuntimeError(message)

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def log(self) -> str:
        exists = self.log_path is not None and self.log_path.exists()
        text = self.log_path.read_text(errors="replace") if exists else ""
        return "\n".join(text.strip().splitlines()[-10:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> GatewayProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
