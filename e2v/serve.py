"""`e2v serve`: the real Triton Inference Server binary from the nvidia-pytriton wheel.

No Docker, no GPU: the wheel ships `tritonserver` and the Python backend, which runs
the `cpu` target's ONNX model with ONNX Runtime. The same `SERVER_FLAGS` are used by
the containers and Kubernetes manifests in `docker/` and `deploy/`.

Admin APIs (`RESTRICTED_APIS`) need the `ADMIN_KEY_HEADER` key: from `--admin-key-file`,
else a random per-run key written 0600 into the run directory. Everything a run makes
(run directory, shared-memory regions, backend stubs) is removed when it stops, and
leftovers of runs that died are removed at the next start (`e2v.leftovers`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import secrets
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

from e2v import leftovers
from e2v.contract import (
    ADMIN_KEY_GRPC_HEADER,
    ADMIN_KEY_HEADER,
    GRPC_PORT,
    HEALTH_READY_PATH,
    HOT_ADD_FLAGS,
    HTTP_PORT,
    METRICS_PORT,
    MODEL_CONTROL_NONE,
    SERVER_FLAGS,
    restricted_api_flags,
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
    admin_key_file: Path | None = None  # None: a random key per run, in the run directory
    hot_add: bool = False  # explicit model control: new models load through the admin API
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


def server_args(
    repo: Path,
    config: ServerConfig,
    backend_dir: Path | None,
    admin_key: str,
    shm_prefix: str | None = None,
) -> list[str]:
    """tritonserver arguments: repository, backends, addresses, ports, SERVER_FLAGS, then
    the restricted admin APIs and the Python backend's shared-memory region prefix."""
    args = [f"--model-repository={repo}"]
    if backend_dir is not None:
        args.append(f"--backend-directory={backend_dir}")
    for proto, port in (
        ("http", config.http_port),
        ("grpc", config.grpc_port),
        ("metrics", config.metrics_port),
    ):
        args += [f"--{proto}-address={config.host}", f"--{proto}-port={port}"]
    flags = list(SERVER_FLAGS)
    if config.hot_add:  # explicit model control: loads only through the restricted API
        flags[flags.index(MODEL_CONTROL_NONE) : flags.index(MODEL_CONTROL_NONE) + 1] = HOT_ADD_FLAGS
    args += [*flags, *restricted_api_flags(admin_key)]
    if shm_prefix:
        args.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    return args + config.extra_flags


ADMIN_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/")


def read_admin_key(path: Path) -> str:
    """The key in `path`: one token of 16+ URL-safe characters, in a file only we can read."""
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as exc:
        raise ServeError(f"cannot read admin key file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ServeError(f"admin key file {path} is readable by others; chmod 600 {path}")
    if len(key) < 16 or not set(key) <= ADMIN_KEY_CHARS:
        raise ServeError(
            f"admin key in {path} must be one token of at least 16 characters "
            "(letters, digits, - _ . ~ + /), e.g. `openssl rand -hex 32`"
        )
    return key


def new_admin_key(directory: Path) -> tuple[str, Path]:
    """A random key written 0600 to `directory/admin-key`."""
    key = secrets.token_urlsafe(32)
    path = directory / "admin-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path


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
    """`repo` itself, or a copy of its configs with instance/thread overrides applied
    (always with --hot-add: see `overlay_model`).

    Files are symlinked, so weights are never copied and `repo` is never modified.
    """
    if config.instances is None and config.threads is None and not config.hot_add:
        return repo
    overlay = workdir / "repository"
    overlay.mkdir(parents=True, exist_ok=True)
    for name in check_repository(repo):
        overlay_model(repo / name, overlay / name, config)
    return overlay


# Written where the Python backend would create its bytecode directory: a file of that name
# makes the import skip writing bytecode (silently), so a loaded model's files never change.
PYCACHE_PLACEHOLDER = "__pycache__"


def overlay_model(source: Path, target: Path, config: ServerConfig) -> None:
    """`target`: `source`'s config with the overrides applied, and links to its files.

    Version directories are real directories of links plus a `__pycache__` placeholder
    file: the Python backend writes no bytecode, neither into `source` nor here. Before
    it loads an ensemble, Triton compares every file time of the models it runs and
    reloads a changed one; bytecode written at load would make the base model "changed".
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    target.mkdir(exist_ok=True)
    for entry in source.iterdir():
        if entry.name in ("config.pbtxt", PYCACHE_PLACEHOLDER):
            continue
        if entry.name.isdigit() and entry.is_dir():
            version = target / entry.name
            version.mkdir()
            for item in entry.iterdir():
                if item.name != PYCACHE_PLACEHOLDER:
                    (version / item.name).symlink_to(item.resolve())
            (version / PYCACHE_PLACEHOLDER).write_text("no bytecode here: see e2v/serve.py\n")
        else:
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


def server_environment() -> dict[str, str]:
    """PATH starts with this environment's bin so the Python backend finds our packages."""
    install = find_triton()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer:
    """A running `tritonserver` process. Use as a context manager or call start/stop.

    Its run directory, shared-memory regions and backend stubs are removed by `stop()` and
    `kill()`, and when `start()` fails.
    """

    def __init__(self, config: ServerConfig, log_path: Path | None = None):
        self.config = config
        self._log_path = log_path  # default: in the run directory (removed at stop)
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.admin_key: str | None = None
        self.admin_key_path: Path | None = None
        self.runtime_repo: Path | None = None  # what Triton reads: the repo or its overlay
        self.shm_prefix = leftovers.shm_region_prefix(secrets.token_hex(4))
        self._cleaned = False

    @property
    def log_path(self) -> Path | None:
        if self._log_path is not None:
            return self._log_path
        return self.workdir / "tritonserver.log" if self.workdir else None

    @property
    def admin_headers(self) -> dict[str, str]:
        """The HTTP header that unlocks the restricted admin APIs of this server."""
        return {ADMIN_KEY_HEADER: self.admin_key or ""}

    @property
    def admin_grpc_headers(self) -> dict[str, str]:
        """The same key as gRPC metadata."""
        return {ADMIN_KEY_GRPC_HEADER: self.admin_key or ""}

    def _prepare(self) -> list[str]:
        """Run directory, admin key, backends, repository overlay; the command line."""
        self.workdir = Path(tempfile.mkdtemp(prefix=leftovers.run_dir_prefix()))
        if self.config.admin_key_file is not None:
            self.admin_key = read_admin_key(self.config.admin_key_file)
            self.admin_key_path = self.config.admin_key_file
        else:
            self.admin_key, self.admin_key_path = new_admin_key(self.workdir)
        install = find_triton()
        backends = prepare_backends(install, self.workdir / "backends")
        repo = runtime_repository(self.config.repo.resolve(), self.config, self.workdir)
        self.runtime_repo = repo
        args = server_args(repo, self.config, backends, self.admin_key, self.shm_prefix)
        return [str(install.binary), *args]

    def start(self, timeout_s: float = 300.0) -> TritonServer:
        check_repository(self.config.repo)
        check_ports_free(self.config)
        leftovers.clean_stale()
        try:
            command = self._prepare()
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command,
                    env=server_environment(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stubs included
                    preexec_fn=_die_with_parent,
                )
            self.wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise
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
        raise ServeError(
            f"server not ready after {timeout_s:.0f} s; last log lines:\n  "
            + "\n  ".join(self.log_tail())
        )

    def log_tail(self, lines: int = 5) -> list[str]:
        path = self.log_path
        text = path.read_text(errors="replace") if path and path.exists() else ""
        return text.strip().splitlines()[-lines:]

    def _failure_reason(self) -> str:
        text = "\n".join(self.log_tail(200))
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
        """Graceful shutdown (SIGTERM: Triton drains in-flight requests), then kill; cleanup."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        return self.kill()

    def kill(self) -> int | None:
        """Hard kill of the server and its stubs (tests use it to simulate a crash); cleanup.

        The run's regions are removed by name even while a stub still maps one: tritonserver
        creates them and removes them only when it stops gracefully, a stub removes its own
        only when it outlives tritonserver and is not killed first, and a SIGKILLed stub may
        still be exiting here (it is not our child: nothing here waits for it). Once it has
        exited nobody else would remove them. Unlinking leaves existing mappings valid, and
        the prefix belongs to this server alone.
        """
        if self._cleaned:
            return self.process.returncode if self.process else None
        self._cleaned = True
        if self.process is not None:
            # The whole group: a server that already exited may have left stubs behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        leftovers.unlink_regions(leftovers.shm_regions(self.shm_prefix))
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode if self.process else None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
        help="model instances, >= 1 (default: one per core, up to 8: on CPU, single-threaded "
        "instances beat one multi-threaded instance, see loadtest/reports)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime threads per instance, >= 1 (default: all cores / instances)",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help="file holding the key that unlocks the admin APIs (logging, trace, shared "
        f"memory, model repository) via the {ADMIN_KEY_HEADER} header (default: a random "
        "key per run, written 0600 into the run directory)",
    )
    parser.add_argument(
        "--hot-add",
        action="store_true",
        help="load models added to --repo while running (e2v train-head's heads): Triton in "
        "explicit model-control mode, loads through the admin-key API; nothing already "
        "loaded is ever reloaded or unloaded",
    )
    parser.add_argument(
        "--poll-secs", type=float, default=1.0, help="with --hot-add: how often to look"
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


def check_layout(instances: int | None, threads: int | None) -> str | None:
    """Why --instances/--threads cannot work, or None."""
    for flag, value in (("--instances", instances), ("--threads", threads)):
        if value is not None and value < 1:
            return f"{flag} must be at least 1, got {value}"
    return None


def _watcher(server: TritonServer, poll_s: float):
    from e2v.hot_add import RepositoryWatcher

    print(f"hot-add: loading models added to {server.config.repo} (every {poll_s:g} s)")
    return RepositoryWatcher(
        server.config.repo.resolve(),
        server.config.http_url,
        server.admin_key,
        server.runtime_repo,
        functools.partial(overlay_model, config=server.config),
        poll_s,
        say=lambda message: print(message, flush=True),
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _StopRequested(Exception):
    """Raised by the signal handler: SIGTERM, SIGINT and SIGHUP all stop gracefully."""


def _raise_stop(signum: int, _frame) -> None:
    raise _StopRequested(signum)


def run_serve(args: argparse.Namespace) -> int:
    problem = check_layout(args.instances, args.threads)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    instances, threads = default_layout(args.instances, args.threads)
    config = ServerConfig(
        repo=args.repo,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        instances=instances,
        threads=threads,
        admin_key_file=args.admin_key_file,
        hot_add=args.hot_add,
    )
    if not 0.1 <= args.poll_secs <= 3600:
        print("error: --poll-secs must be between 0.1 and 3600", file=sys.stderr)
        return 2
    server = TritonServer(config)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
    died: list[str] = []
    try:
        print(f"starting tritonserver on {args.repo} ...", flush=True)
        server.start(args.timeout)
        print(
            f"ready: HTTP {config.http_url}  gRPC {config.grpc_url}  metrics {config.metrics_url}"
        )
        print(f"admin key ({ADMIN_KEY_HEADER} header): {server.admin_key_path}")
        print("Ctrl-C, SIGTERM or SIGHUP stops the server gracefully.", flush=True)
        watcher = _watcher(server, args.poll_secs) if config.hot_add else None
        while server.process.poll() is None:
            time.sleep(0.2)
            if watcher is not None:
                watcher.maybe_scan()
        died = server.log_tail()
    except _StopRequested:
        pass
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig in STOP_SIGNALS:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        code = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if died:
        print(f"tritonserver exited with code {code}:\n  " + "\n  ".join(died), file=sys.stderr)
        return 1
    print("stopped")
    return 0
