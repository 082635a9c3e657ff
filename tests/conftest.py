"""Shared fixtures: synthetic checkpoints and exported repositories, built once per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

# Synthetic checkpoints are cached here across tests (and across runs in CI).
os.environ.setdefault("E2V_CACHE", str(Path(__file__).resolve().parent.parent / "build" / "cache"))
# hypothesis (tests/test_gateway_openapi.py, schemathesis) keeps its caches there, not in the tree.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    str(Path(__file__).resolve().parent.parent / "build" / "hypothesis"),
)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["E2V_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path) -> Path:
    from e2v.export.synthetic import write_synthetic_model

    return write_synthetic_model("tiny", cache_dir / "synthetic-tiny")


@pytest.fixture(scope="session")
def tiny_cpu_repo(tmp_path_factory) -> Path:
    """A Triton repository with synthetic:tiny exported for the cpu target."""
    from e2v.export.exporter import export_model

    repo = tmp_path_factory.mktemp("repo-tiny-cpu")
    export_model("synthetic:tiny", repo, target="cpu", check_parity=False)
    return repo


@pytest.fixture(scope="session")
def tiny_server(tiny_cpu_repo):
    """A real tritonserver serving synthetic:tiny (cpu target) for the whole session."""
    from servers import start_server

    server = start_server(tiny_cpu_repo)
    yield server
    server.stop()


# --------------------------------------------------------------------------- leftovers
# Every tritonserver, backend stub, shared-memory region and `e2v serve` run directory the
# tests make must be gone when the run ends. Processes are told ours by an environment
# variable they inherit; regions and run directories by the session id in their names
# (e2v.leftovers), so servers of other runs on the same machine do not count.

_SESSION_MARK = "E2V_TEST_SESSION"
_LEFTOVER_GRACE_S = 20.0


def _marked_processes(mark: str) -> list[int]:
    from e2v import leftovers

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if Path(os.readlink(proc / "exe").removesuffix(" (deleted)")).name not in (
                leftovers.SERVER_NAME,
                leftovers.STUB_NAME,
            ):
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{_SESSION_MARK}={mark}".encode() in environ:
            found.append(int(proc.name))
    return found


def _ours(paths: list[Path], owner) -> set[Path]:
    sid = os.getsid(0)
    return {p for p in paths if (o := owner(p)) and (o.sid == sid or o.pid == os.getpid())}


def _leftover_files() -> set[Path]:
    from e2v import leftovers

    return _ours(leftovers.run_dirs(), leftovers.run_dir_owner) | _ours(
        leftovers.shm_regions(), leftovers.shm_region_owner
    )


def pytest_sessionstart(session) -> None:
    import secrets

    os.environ[_SESSION_MARK] = secrets.token_hex(8)
    session.config.stash[_before_key] = _leftover_files()


def pytest_sessionfinish(session, exitstatus) -> None:
    import shutil
    import signal
    import time

    mark = os.environ.get(_SESSION_MARK)
    before = session.config.stash.get(_before_key, set())
    deadline = time.monotonic() + _LEFTOVER_GRACE_S
    while True:
        processes = _marked_processes(mark)
        files = _leftover_files() - before
        if not (processes or files) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not (processes or files):
        return
    lines = [f"process {pid}: {' '.join(_cmd(pid))[:120]}" for pid in processes]
    lines += [str(p) for p in sorted(files)]
    for pid in processes:  # clean up, then fail the run
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for path in files:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line("LEFTOVERS: the tests left these behind (now removed):", red=True)
        for line in lines:
            reporter.write_line(f"  {line}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _cmd(pid: int) -> list[str]:
    from e2v import leftovers

    return leftovers.cmdline(pid)


_before_key = pytest.StashKey[set]()
