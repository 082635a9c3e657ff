"""Helpers to run real Triton servers in tests on free loopback ports (and NATS: the load
test's launcher, loadtest/nats_process.py)."""

from __future__ import annotations

import os
from pathlib import Path

from e2v.loadtest.nats_process import NatsServer

from e2v.serve import ServerConfig, TritonServer, free_ports

__all__ = ["NatsServer", "free_ports", "server_config", "start_server"]


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
