"""The flags the Kubernetes manifests pass to tritonserver start a real local server.

Production runs NVIDIA's container; here the same flags run the binary from the
nvidia-pytriton wheel (no GPU), through the image's launcher docker/e2v-tritonserver.sh:
any flag Triton rejects fails this test, and so does an admin API left open.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from servers import free_ports
from test_deploy import LAUNCHER_SCRIPT, deploy_server_args, split_server_args

from e2v import leftovers
from e2v.contract import ADMIN_KEY_HEADER, HEALTH_READY_PATH, MODEL_READY_PATH
from e2v.serve import find_triton, prepare_backends, server_environment


def http_status(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def launcher_environment(key_file: Path) -> dict[str, str]:
    """The wheel's tritonserver on PATH, as in the image, and the key where the test put it."""
    env = server_environment()
    env["PATH"] = os.pathsep.join([str(find_triton().binary.parent), env["PATH"]])
    env["E2V_ADMIN_KEY_FILE"] = str(key_file)
    return env


def write_key(tmp_path: Path) -> tuple[Path, str]:
    key = secrets.token_hex(24)
    path = tmp_path / "admin-key"
    path.write_text(key + "\n")
    path.chmod(0o400)
    return path, key


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
        # Only so that the session's leftover check can tell these regions are ours.
        "--backend-config=python,shm-region-prefix-name="
        + leftovers.shm_region_prefix(secrets.token_hex(4)),
    ]
    key_file, _ = write_key(tmp_path)
    env = launcher_environment(key_file)
    with open(tmp_path / "triton.log", "wb") as log:
        proc = subprocess.Popen(
            [str(LAUNCHER_SCRIPT), *args], env=env, stdout=log, stderr=subprocess.STDOUT
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
    key = (tmp_path / "admin-key").read_text().strip()
    logging = base + "/v2/logging"
    try:
        assert http_status(base + MODEL_READY_PATH) == 200
        assert http_status(logging, b'{"log_verbose_level": 1}') == 403
        assert http_status(logging, b'{"log_verbose_level": 0}', {ADMIN_KEY_HEADER: key}) == 200
    finally:
        proc.terminate()
        proc.wait(60)


def test_launcher_refuses_to_start_without_a_key(tmp_path):
    proc = subprocess.run(
        [str(LAUNCHER_SCRIPT), "--model-repository=/nonexistent"],
        env=launcher_environment(tmp_path / "missing"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "admin key file" in proc.stderr
    weak = tmp_path / "weak"
    weak.write_text("short\n")
    proc = subprocess.run(
        [str(LAUNCHER_SCRIPT)], env=launcher_environment(weak), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "at least 16 characters" in proc.stderr


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
