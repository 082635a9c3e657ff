"""The flags the Kubernetes manifests pass to tritonserver start a real local server.

Production runs NVIDIA's container; here the same flags run the binary from the
nvidia-pytriton wheel (no GPU): any flag Triton rejects fails this test.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest
from servers import free_ports
from test_deploy import deploy_server_args, split_server_args

from e2v.contract import HEALTH_READY_PATH
from e2v.serve import ServerConfig, TritonServer, find_triton, prepare_backends


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_manifest_server_flags_start_the_local_server(overlay, tiny_cpu_repo, tmp_path):
    flags, named = split_server_args(deploy_server_args(overlay))
    http, grpc, metrics = free_ports()
    args = [
        *flags,
        f"--model-repository={tiny_cpu_repo}",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        f"--backend-directory={prepare_backends(find_triton(), tmp_path / 'backends')}",
    ]
    env = TritonServer(ServerConfig(repo=tiny_cpu_repo)).environment()
    log = open(tmp_path / "triton.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(find_triton().binary), *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                url = f"http://127.0.0.1:{http}{HEALTH_READY_PATH}"
                ready = urllib.request.urlopen(url, timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert ready, (tmp_path / "triton.log").read_text()[-3000:]
        assert set(named) == {"--model-repository", "--http-port", "--grpc-port", "--metrics-port"}
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
