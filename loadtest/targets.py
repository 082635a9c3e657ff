"""What a load test loads: Triton (started here on free loopback ports, or given by
`--url`), `e2v gateway` in front of it, the FunASR baseline server; and the repository a
local Triton serves. Each is a context manager: what a scenario starts, it stops.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from e2v.loadtest import triton_stats
from e2v.loadtest.command import log

from e2v.contract import MODEL_NAME


@dataclass(frozen=True)
class Target:
    """Something to load: `user` is the driver's user kind (grpc, http or baseline)."""

    label: str
    user: str
    url: str
    stats_url: str | None = None  # Triton HTTP endpoint for statistics; None: no server stats
    settings: dict = field(default_factory=dict)


def triton_target(label: str, protocol: str, url: str, stats_url: str | None) -> Target:
    """A running Triton (local or remote) and its model settings."""
    settings = {}
    if stats_url:
        try:
            settings = triton_stats.config_summary(triton_stats.model_config(stats_url))
        except (OSError, ValueError) as exc:  # refused, HTTP errors, not JSON
            raise RuntimeError(
                f"cannot read model '{MODEL_NAME}' from Triton at {stats_url} (HTTP): {exc}"
            ) from exc
    return Target(label, protocol, url, stats_url, settings)


@contextmanager
def local_triton(
    repo: Path, protocol: str, instances: int | None = None, threads: int | None = None
) -> Iterator[Target]:
    """`tritonserver` on `repo` with free loopback ports; yields its Target."""
    from e2v.serve import ServerConfig, TritonServer

    config = ServerConfig.on_free_ports(repo, instances=instances, threads=threads)
    with TritonServer(config) as server:
        url = config.grpc_url if protocol == "grpc" else config.http_url
        label = f"triton-{protocol}" + (f"-{instances}x{threads}" if instances else "")
        target = triton_target(label, protocol, url, config.http_url)
        target.settings["grpc_url"] = config.grpc_url
        target.settings["shm_prefix"] = server.shm_prefix  # finds its stubs (memory, CPU)
        target.settings["server_pid"] = server.process.pid
        yield target


@contextmanager
def local_gateway(triton: Target, concurrency: int) -> Iterator[Target]:
    """`e2v gateway` on a free loopback port in front of the gRPC Triton `triton`."""
    from e2v.loadtest.gateway_process import GatewayProcess

    if triton.user != "grpc":
        raise ValueError("the gateway load test talks to Triton over gRPC: use --protocol grpc")
    # Every Locust user connects from 127.0.0.1: no per-address connection cap here.
    flags = ("--concurrency", str(concurrency), "--max-connections-per-client", "0")
    with GatewayProcess(triton.url, *flags).start(ready=True) as gw:
        settings = {**triton.settings, "gateway_concurrency": concurrency, "gateway_pid": gw.pid}
        label = triton.label.replace("triton-grpc", "gateway")
        yield Target(label, "gateway", gw.url.removeprefix("http://"), triton.stats_url, settings)


@contextmanager
def local_baseline(
    model_dir: Path, device: str = "cpu", threads: int | None = None
) -> Iterator[Target]:
    """The FunASR baseline server on a free loopback port; yields its Target."""
    from e2v.loadtest.baseline_server import BaselineServer

    from e2v.serve import free_ports

    threads = threads or os.cpu_count() or 1
    with BaselineServer(model_dir, free_ports(1)[0], device=device, threads=threads) as server:
        settings = {
            "server": "FunASR AutoModel.generate, one request at a time",
            "device": device,
            "torch_threads": threads,
            "torch_threads_running": server.torch_threads,
        }
        yield Target("baseline-funasr", "baseline", server.url, None, settings)


def triton_server(
    args: argparse.Namespace,
    workdir: Path,
    protocol: str,
    instances: int | None = None,
    threads: int | None = None,
):
    """The Triton to load, as a context manager of its Target: `--url` (with
    `--stats-url`), or a local tritonserver on `served_repo` in the setting given."""
    if args.url:
        label = f"triton-{protocol}"
        return nullcontext(triton_target(label, protocol, args.url, stats_url(args)))
    return local_triton(served_repo(args, workdir), protocol, instances, threads)


def served_repo(args: argparse.Namespace, workdir: Path) -> Path:
    """--repo, or --model exported once into `workdir`."""
    if args.repo:
        return args.repo
    repo = workdir / "repository"
    if not (repo / MODEL_NAME).exists():
        from e2v.export.exporter import ExportError, export_model

        log(f"exporting {args.model} ({args.target})")
        try:
            export_model(args.model, repo, target=args.target, check_parity=False)
        except ExportError as exc:
            raise RuntimeError(f"cannot export {args.model}: {exc}") from exc
    return repo


def stats_url(args: argparse.Namespace) -> str:
    """Triton's HTTP endpoint for statistics: explicit, the HTTP url, or gRPC port - 1."""
    if args.stats_url or args.protocol == "http":
        return args.stats_url or args.url
    host, _, port = args.url.rpartition(":")
    return f"{host}:{int(port) - 1}"


def parse_configs(text: str | None) -> list[tuple[int, int]]:
    """'1x2,2x1' -> [(1, 2), (2, 1)] (instances, ONNX Runtime threads per instance)."""
    if not text:
        return []
    configs = []
    for item in text.split(","):
        try:
            instances, threads = (int(v) for v in item.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"--configs wants INSTANCESxTHREADS items, got '{item}'") from exc
        if instances < 1 or threads < 1:
            raise ValueError(f"--configs {item}: instances and threads must be >= 1")
        configs.append((instances, threads))
    return configs
