"""The lean client: `pip install ./` (the clone) alone (no torch, FunASR or Triton
server) classifies recordings against a real server. Installed into a fresh virtual
environment from this checkout, as a batch pod or the gateway image would."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import audio_fixtures as fx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Published packages with the names of our folders (export/, loadtest/), pinned.
NAMESAKES = ("export==0.2.1", "loadtest==0.0.2")
HEAVY = ("torch", "funasr", "nvidia-pytriton", "locust", "scikit-learn", "silero-vad")


@pytest.fixture(scope="module")
def lean_env(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("lean") / "venv"
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # PyPI's own `export` and `loadtest` first: ours live under `e2v.` and must not collide.
    subprocess.run([*install, *NAMESAKES], check=True, timeout=300, capture_output=True)
    subprocess.run([*install, str(ROOT)], check=True, timeout=900, capture_output=True)
    return home


def test_lean_install_has_no_heavy_dependencies(lean_env):
    listed = subprocess.run(
        [str(lean_env / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "emotion2vec-triton" in installed
    assert not installed & set(HEAVY), installed & set(HEAVY)
    size = sum(f.stat().st_size for f in lean_env.rglob("*") if f.is_file()) / 2**20
    print(f"lean client environment: {size:.0f} MiB")


def test_our_packages_install_beside_their_pypi_namesakes(lean_env):
    """Everything of ours is under `e2v.`: PyPI's `export` and `loadtest` stay theirs."""
    probe = (
        "import importlib.util as u, json, export, loadtest, e2v.client.audio\n"
        "print(json.dumps({n: u.find_spec(n).origin for n in "
        "('export', 'loadtest', 'e2v.export', 'e2v.loadtest', 'e2v.client')}))\n"
        "print(hasattr(export, 'api') or u.find_spec('export.api') is not None)"
    )
    shown = subprocess.run(
        [str(lean_env / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=lean_env,  # not the clone, whose folders would shadow the installed packages
    ).stdout.splitlines()
    origins = json.loads(shown[0])
    site = Path(origins["e2v.client"]).parents[2]  # site/e2v/client/__init__.py
    assert origins["export"] == str(site / "export" / "__init__.py")
    assert origins["loadtest"] == str(site / "loadtest" / "__init__.py")
    assert origins["e2v.export"] == str(site / "e2v" / "export" / "__init__.py")
    assert origins["e2v.loadtest"] == str(site / "e2v" / "loadtest" / "__init__.py")
    assert shown[1] == "True", "PyPI's export package was overwritten"


def test_lean_client_classifies_against_a_real_server(lean_env, tiny_server, tmp_path):
    path = fx.write_audio(tmp_path / "call.mp3", fx.speech_like(40.0, seed=2), 16_000)
    result = subprocess.run(
        [
            str(lean_env / "bin" / "e2v"),
            "classify",
            "--no-progress",
            str(path),
            "--json",
            "--url",
            tiny_server.config.grpc_url,
            "--csv",
            str(tmp_path / "r.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["emotion"] and len(row["segments"]) >= 2  # the vendored VAD cut it
    helps = [
        subprocess.run([str(lean_env / "bin" / "e2v"), *cmd, "--help"], capture_output=True)
        for cmd in (["merge"], ["serve"], ["export"])
    ]
    assert all(h.returncode == 0 for h in helps)  # every command loads; heavy ones lazily
    assert sys.executable not in result.stderr
