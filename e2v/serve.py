"""`e2v serve`: the real Triton Inference Server binary from the nvidia-pytriton wheel.

No Docker, no GPU: the wheel ships `tritonserver` and the Python backend, which runs
the `cpu` target's ONNX model with ONNX Runtime. The same `SERVER_FLAGS` are used by
the containers and Kubernetes manifests in `docker/` and `deploy/`.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from e2v.contract import (
    GRPC_PORT,
    HEALTH_READY_PATH,
    HTTP_PORT,
    METRICS_PORT,
    SERVER_FLAGS,
)


class ServeError(Exception):
    """The server could not start; the message says why in one or a few lines."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


@functools.lru_cache(maxsize=1)
def find_triton() -> TritonInstall:
    """Locate tritonserver, the Python backend and the stub for this Python."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServeError("nvidia-pytriton is not installed: pip install nvidia-pytriton") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=root.parent.parent / "nvidia_pytriton.libs",
    )
    for path in (install.binary, install.python_backend, install.stub):
        if not path.exists():
            raise ServeError(f"incomplete nvidia-pytriton install, missing {path}")
    return install


def prepare_backends(install: TritonInstall, directory: Path) -> Path:
    """A backend directory with the Python backend and the stub matching this Python."""
    python_dir = directory / "python"
    if not (python_dir / "triton_python_backend_stub").exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory))  # staged beside it: rename is atomic
        shutil.copytree(install.python_backend, tmp / "python")
        shutil.copy2(install.stub, tmp / "python" / "triton_python_backend_stub")
        if python_dir.exists():
            shutil.rmtree(python_dir)
        os.replace(tmp / "python", python_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def free_ports(count: int = 3, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports on `host` (bound together, so they cannot repeat)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class ServerConfig:
    repo: Path
    host: str = "127.0.0.1"
    http_port: int = HTTP_PORT
    grpc_port: int = GRPC_PORT
    metrics_port: int = METRICS_PORT
    instances: int | None = None  # override instance_group count of every model
    threads: int | None = None  # override ONNX Runtime intra-op threads (cpu target)
    extra_flags: list[str] = field(default_factory=list)

    @classmethod
    def on_free_ports(cls, repo: Path, **overrides) -> ServerConfig:
        """A loopback config on free ports (tests, load tests)."""
        http, grpc, metrics = free_ports(3)
        return cls(repo=repo, http_port=http, grpc_port=grpc, metrics_port=metrics, **overrides)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def server_args(repo: Path, config: ServerConfig, backend_dir: Path | None) -> list[str]:
    """tritonserver arguments: repository, backends, addresses, ports, then SERVER_FLAGS."""
    args = [f"--model-repository={repo}"]
    if backend_dir is not None:
        args.append(f"--backend-directory={backend_dir}")
    for proto, port in (
        ("http", config.http_port),
        ("grpc", config.grpc_port),
        ("metrics", config.metrics_port),
    ):
        args += [f"--{proto}-address={config.host}", f"--{proto}-port={port}"]
    return args + list(SERVER_FLAGS) + config.extra_flags


def check_repository(repo: Path) -> list[str]:
    """Model names in `repo`; a clear error when there is nothing servable."""
    if not repo.is_dir():
        raise ServeError(
            f"model repository not found: {repo} (create it with `e2v export --repo {repo}`)"
        )
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    if not models:
        raise ServeError(f"no model (no */config.pbtxt) in repository {repo}")
    return models


def check_ports_free(config: ServerConfig) -> None:
    for label, port in (
        ("HTTP", config.http_port),
        ("gRPC", config.grpc_port),
        ("metrics", config.metrics_port),
    ):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((config.host, port))
            except OSError as exc:
                raise ServeError(
                    f"{label} port {port} on {config.host} is already in use ({exc.strerror}); "
                    f"pick another with --{label.lower()}-port"
                ) from exc


def runtime_repository(repo: Path, config: ServerConfig, workdir: Path) -> Path:
    """`repo` itself, or a copy of its configs with instance/thread overrides applied.

    Version directories are symlinked, so weights are never copied and `repo` is never
    modified.
    """
    if config.instances is None and config.threads is None:
        return repo
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    overlay = workdir / "repository"
    overlay.mkdir(parents=True, exist_ok=True)
    for name in check_repository(repo):
        source, target = repo / name, overlay / name
        target.mkdir(exist_ok=True)
        for entry in source.iterdir():
            if entry.name != "config.pbtxt":
                (target / entry.name).symlink_to(entry.resolve())
        model_config = text_format.Parse(
            (source / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        for group in model_config.instance_group:
            if config.instances is not None:
                group.count = config.instances
        if config.threads is not None and "intra_op_thread_count" in model_config.parameters:
            model_config.parameters["intra_op_thread_count"].string_value = str(config.threads)
        (target / "config.pbtxt").write_text(text_format.MessageToString(model_config))
    return overlay


class TritonServer:
    """A running `tritonserver` process. Use as a context manager or call start/stop."""

    def __init__(self, config: ServerConfig, log_path: Path | None = None):
        self.config = config
        self._workdir = Path(tempfile.mkdtemp(prefix="e2v-serve-"))
        self.log_path = log_path or self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        install = find_triton()
        backends = prepare_backends(install, self._workdir / "backends")
        repo = runtime_repository(self.config.repo.resolve(), self.config, self._workdir)
        return [str(install.binary), *server_args(repo, self.config, backends)]

    def environment(self) -> dict[str, str]:
        """PATH starts with this environment's bin so the Python backend finds our packages."""
        install = find_triton()
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def start(self, timeout_s: float = 300.0) -> TritonServer:
        check_repository(self.config.repo)
        check_ports_free(self.config)
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.config.http_url}{HEALTH_READY_PATH}"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServeError(self._failure_reason())
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ServeError(f"server not ready after {timeout_s:.0f} s; log: {self.log_path}")

    def _failure_reason(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        reasons = [
            line.strip()
            for line in text.splitlines()
            if "failed to load" in line
            or "UNAVAILABLE" in line
            or "error:" in line.lower()
            or "address already in use" in line.lower()
        ]
        tail = reasons[-5:] or text.strip().splitlines()[-5:]
        code = self.process.returncode if self.process else None
        return f"tritonserver exited (code {code}):\n  " + "\n  ".join(tail)

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """Graceful shutdown (SIGTERM: Triton drains in-flight requests), then kill."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """Hard kill (tests use it to simulate a crash)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run Triton locally on a model repository (no Docker, no GPU)"
    )
    parser.add_argument("--repo", type=Path, default=Path("build/model_repository"))
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: loopback only; 0.0.0.0 exposes it)",
    )
    parser.add_argument("--http-port", type=int, default=HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    parser.add_argument(
        "--instances",
        type=int,
        help="model instances (default: one per core, up to 8: on CPU, single-threaded "
        "instances beat one multi-threaded instance, see loadtest/reports)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime threads per instance (default: all cores / instances)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for ready")
    parser.set_defaults(func=run_serve)


MAX_DEFAULT_INSTANCES = 8  # each instance holds its own copy of the weights


def default_layout(instances: int | None, threads: int | None) -> tuple[int, int]:
    """(instances, ONNX Runtime threads per instance) that use every core once."""
    cores = os.cpu_count() or 1
    if instances is None:
        instances = max(1, min(MAX_DEFAULT_INSTANCES, cores // (threads or 1)))
    if threads is None:
        threads = max(1, cores // instances)
    return instances, threads


def run_serve(args: argparse.Namespace) -> int:
    instances, threads = default_layout(args.instances, args.threads)
    config = ServerConfig(
        repo=args.repo,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        instances=instances,
        threads=threads,
    )
    server = TritonServer(config)
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    try:
        print(f"starting tritonserver on {args.repo} (log: {server.log_path}) ...", flush=True)
        server.start(args.timeout)
        print(
            f"ready: HTTP {config.http_url}  gRPC {config.grpc_url}  metrics {config.metrics_url}"
        )
        print("Ctrl-C or SIGTERM stops the server gracefully.", flush=True)
        while not stop_requested and server.process.poll() is None:
            time.sleep(0.5)
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        code = server.stop()
    if not stop_requested and code not in (0, None, -signal.SIGTERM):
        print(f"tritonserver exited with code {code}; log: {server.log_path}", file=sys.stderr)
        return 1
    print("stopped")
    return 0
