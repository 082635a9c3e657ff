"""Shared fixtures: synthetic checkpoints and exported repositories, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Synthetic checkpoints are cached here across tests (and across runs in CI).
os.environ.setdefault("E2V_CACHE", str(Path(__file__).resolve().parent.parent / "build" / "cache"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["E2V_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path) -> Path:
    from export.synthetic import write_synthetic_model

    return write_synthetic_model("tiny", cache_dir / "synthetic-tiny")


@pytest.fixture(scope="session")
def tiny_cpu_repo(tmp_path_factory) -> Path:
    """A Triton repository with synthetic:tiny exported for the cpu target."""
    from export.exporter import export_model

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
