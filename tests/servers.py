"""Helpers to run real Triton servers in tests on free loopback ports."""

from __future__ import annotations

import socket
from pathlib import Path

from e2v.serve import ServerConfig, TritonServer


def free_ports(count: int = 3) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def server_config(repo: Path, **overrides) -> ServerConfig:
    http, grpc, metrics = free_ports()
    return ServerConfig(
        repo=repo, http_port=http, grpc_port=grpc, metrics_port=metrics, **overrides
    )


def start_server(repo: Path, **overrides) -> TritonServer:
    return TritonServer(server_config(repo, **overrides)).start(timeout_s=240)
