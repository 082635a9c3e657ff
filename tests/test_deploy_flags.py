"""The flags the Kubernetes manifests pass to tritonserver start a real local server.

Production runs NVIDIA's container; here the same flags run the binary from the
nvidia-pytriton wheel (no GPU): any flag Triton rejects fails this test.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from servers import free_ports
from test_deploy import deploy_server_args, split_server_args

from e2v.contract import HEALTH_READY_PATH, MODEL_READY_PATH
from e2v.serve import ServerConfig, TritonServer, find_triton, prepare_backends


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def start_with_manifest_flags(overlay: str, repo: Path, tmp_path: Path):
    """tritonserver with the overlay's flags, only the repository and ports swapped."""
    flags, named = split_server_args(deploy_server_args(overlay))
    assert set(named) == {"--model-repository", "--http-port", "--grpc-port", "--metrics-port"}
    http, grpc, metrics = free_ports()
    backends = prepare_backends(find_triton(), tmp_path / "backends")
    args = [
        *flags,
        f"--model-repository={repo}",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        f"--backend-directory={backends}",
    ]
    env = TritonServer(ServerConfig(repo=repo)).environment()
    log = open(tmp_path / "triton.log", "wb")  # noqa: SIM115 - closed by the caller's process
    proc = subprocess.Popen(
        [str(find_triton().binary), *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if http_status(base + HEALTH_READY_PATH) == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError((tmp_path / "triton.log").read_text()[-3000:])


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_manifest_server_flags_start_the_local_server(overlay, tiny_cpu_repo, tmp_path):
    proc, base = start_with_manifest_flags(overlay, tiny_cpu_repo, tmp_path)
    try:
        assert http_status(base + MODEL_READY_PATH) == 200
    finally:
        proc.terminate()
        proc.wait(60)


def test_model_readiness_probe_is_false_on_an_empty_repository(tmp_path):
    """Why the manifests probe the model, not the server: an empty repository is 'ready'."""
    (tmp_path / "empty").mkdir()
    proc, base = start_with_manifest_flags("gpu", tmp_path / "empty", tmp_path)
    try:
        assert http_status(base + HEALTH_READY_PATH) == 200
        assert http_status(base + MODEL_READY_PATH) != 200
    finally:
        proc.terminate()
        proc.wait(60)
