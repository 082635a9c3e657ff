"""Helpers to run real Triton servers in tests on free loopback ports."""

from __future__ import annotations

from pathlib import Path

from e2v.serve import ServerConfig, TritonServer, free_ports

__all__ = ["free_ports", "server_config", "start_server"]


def server_config(repo: Path, **overrides) -> ServerConfig:
    return ServerConfig.on_free_ports(repo, **overrides)


def start_server(repo: Path, **overrides) -> TritonServer:
    return TritonServer(server_config(repo, **overrides)).start(timeout_s=240)
