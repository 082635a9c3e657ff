"""The `torch` target: TorchScript run by torch in Triton's Python backend.

Parity with FunASR through a real tritonserver (batched and alone, dynamic batching),
request validation, precision options, and a traced graph that is not tied to a device.
Tolerances as for every target: SCORES <= 1e-5, EMBEDDING <= 1e-4.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from e2v.client.triton import TritonEmotionClient
from e2v.export.exporter import export_model
from e2v.export.parity import compare, funasr_reference, pad_batch
from e2v.model_repository.python_backend.torch_model import TorchRunner
from google.protobuf import text_format
from servers import start_server
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

SCORES_TOL = 1e-5
EMBEDDING_TOL = 1e-4
# Just over one frame, not multiples of the 320-sample stride, one of 20 s.
CLIP_SAMPLES = (401, 16_123, 47_999, 20 * 16_000 + 77, 5_317)


def clips(lengths=CLIP_SAMPLES, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * np.arange(n) / 16_000)
        out.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def torch_repo(cache_dir, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo-tiny-torch")
    export_model("synthetic:tiny", repo, target="torch", cache_dir=cache_dir)
    return repo


@pytest.fixture(scope="module")
def torch_server(torch_repo):
    server = start_server(torch_repo)
    yield server
    server.stop()


def infer(url: str, wav: np.ndarray, lens: np.ndarray) -> dict[str, np.ndarray]:
    client = httpclient.InferenceServerClient(url)
    try:
        inputs = [
            httpclient.InferInput("WAV", list(wav.shape), "FP32"),
            httpclient.InferInput("WAV_LENS", [len(lens), 1], "INT64"),
        ]
        inputs[0].set_data_from_numpy(wav)
        inputs[1].set_data_from_numpy(lens.reshape(-1, 1).astype(np.int64))
        result = client.infer("emotion2vec", inputs)
        return {name: result.as_numpy(name) for name in ("SCORES", "EMBEDDING")}
    finally:
        client.close()


def assert_parity(reference, labels, outputs):
    diffs = compare(reference, labels, outputs["SCORES"], outputs["EMBEDDING"])
    assert diffs["SCORES"] <= SCORES_TOL and diffs["EMBEDDING"] <= EMBEDDING_TOL, diffs


def test_config_version_dir_and_model_card(torch_repo):
    model_dir = torch_repo / "emotion2vec"
    config = text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.backend == "python"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert config.parameters["precision"].string_value == "fp32"
    assert config.parameters["torchscript_file"].string_value == "model.pt"
    assert [i.name for i in config.input] == ["WAV", "WAV_LENS"]
    assert [o.name for o in config.output] == ["SCORES", "EMBEDDING"]
    version = sorted(p.name for p in (model_dir / "1").iterdir())
    assert version == ["model.pt", "model.py", "request_checks.py"]
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["target"] == "torch" and card["exporter"] == "torch.jit.trace"
    assert card["parity"]["torch_batched_SCORES"] <= SCORES_TOL
    assert card["parity"]["torch_batched_EMBEDDING"] <= EMBEDDING_TOL


def test_served_batched_and_alone_equal_funasr(torch_server, torch_repo, tiny_model_dir):
    labels = (torch_repo / "emotion2vec" / "labels.txt").read_text().splitlines()
    audio = clips()
    reference = funasr_reference(tiny_model_dir, audio)
    url = torch_server.config.http_url
    assert_parity(reference, labels, infer(url, *pad_batch(audio)))
    alone = [infer(url, clip[None, :], np.array([len(clip)])) for clip in audio]
    stacked = {name: np.concatenate([a[name] for a in alone]) for name in ("SCORES", "EMBEDDING")}
    assert_parity(reference, labels, stacked)


def test_dynamic_batching_groups_requests_with_unbatched_results(torch_server):
    """Concurrent same-bucket requests run in batches > 1 and equal their single runs."""
    rng = np.random.default_rng(1)
    audio = [
        (0.1 * rng.standard_normal(n)).astype(np.float32) for n in rng.integers(20_000, 48_000, 16)
    ]
    stats = httpclient.InferenceServerClient(torch_server.config.http_url)

    def executions() -> dict[int, int]:
        model = stats.get_inference_statistics("emotion2vec")["model_stats"][0]
        return {b["batch_size"]: b["compute_infer"]["count"] for b in model["batch_stats"]}

    async def run(concurrent: bool):
        async with TritonEmotionClient(torch_server.config.grpc_url) as client:
            if concurrent:
                return await asyncio.gather(*(client.predict(c) for c in audio))
            return [await client.predict(c) for c in audio]

    before = executions()
    batched = asyncio.run(run(concurrent=True))
    grew = {size: count - before.get(size, 0) for size, count in executions().items()}
    stats.close()
    assert any(size > 1 and count > 0 for size, count in grew.items()), grew
    for one, many in zip(asyncio.run(run(concurrent=False)), batched, strict=True):
        assert np.abs(one.scores - many.scores).max() <= SCORES_TOL
        assert np.abs(one.embedding - many.embedding).max() <= EMBEDDING_TOL


@pytest.mark.parametrize(
    "wav, lens, message",
    [
        (np.full((1, 16_000), np.nan, np.float32), [16_000], "NaN or infinite samples"),
        (np.zeros((1, 16_000), np.float32), [16_001], "WAV_LENS[0]=16001 is outside [400, 16000]"),
        (np.zeros((1, 16_000), np.float32), [-1], "WAV_LENS[0]=-1 is outside"),
        (np.zeros((2, 16_000), np.float32), [16_000], "batch size does not match"),  # Triton
        (np.zeros((1, 30 * 16_000 + 1), np.float32), [16_000], "above the 480000-sample maximum"),
    ],
)
def test_bad_requests_get_one_clear_error_and_serving_goes_on(torch_server, wav, lens, message):
    url = torch_server.config.http_url
    client = httpclient.InferenceServerClient(url)
    inputs = [
        httpclient.InferInput("WAV", list(wav.shape), "FP32"),
        httpclient.InferInput("WAV_LENS", [len(lens), 1], "INT64"),
    ]
    inputs[0].set_data_from_numpy(wav)
    inputs[1].set_data_from_numpy(np.array(lens, np.int64).reshape(-1, 1))
    with pytest.raises(InferenceServerException, match=re.escape(message)):
        client.infer("emotion2vec", inputs)
    client.close()
    good = clips((16_000,))
    assert abs(infer(url, good[0][None, :], np.array([16_000]))["SCORES"].sum() - 1) < 1e-5


def test_reduced_precision_is_measured_against_fp32_in_the_card(cache_dir, tmp_path):
    repo = tmp_path / "repo"
    export_model("synthetic:tiny", repo, target="torch", check_parity=False, cache_dir=cache_dir)
    fp32 = json.loads((repo / "emotion2vec" / "model_card.json").read_text())
    assert fp32["parity"] == {}  # fp32 without --no-parity's FunASR check: nothing to report
    result = run_cli(
        "export", "--model", "synthetic:tiny", "--repo", str(repo), "--target", "torch",
        "--precision", "bf16", "--no-parity",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((repo / "emotion2vec" / "model_card.json").read_text())
    assert card["options"]["precision"] == "bf16"
    assert card["parity"]["precision_check_device"] == "cpu"
    # bf16 keeps 8 bits of mantissa: visibly different from fp32, still close.
    assert 1e-6 < card["parity"]["torch_bf16_vs_fp32_SCORES"] < 0.05
    assert 1e-6 < card["parity"]["torch_bf16_vs_fp32_EMBEDDING"] < 0.2
    assert "bf16 vs fp32 measured on cpu" in (repo / "emotion2vec" / "MODEL_CARD.md").read_text()
    assert 'string_value: "bf16"' in (repo / "emotion2vec" / "config.pbtxt").read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "e2v", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("--target", "cpu", "--precision", "fp16"), "--precision fp16 needs --target torch"),
        (("--target", "torch", "--precision", "fp64"), "unknown precision 'fp64'"),
    ],
)
def test_precision_errors_are_one_line(args, message, tmp_path):
    repo = tmp_path / "repo"
    result = run_cli("export", "--model", "synthetic:tiny", "--repo", str(repo), *args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not repo.exists()


def test_traced_graph_names_no_device(torch_repo):
    """Tracing records `device=` arguments as constants; none may remain, or the module
    would build its masks on the export machine's device when served on a GPU."""
    module = torch.jit.load(str(torch_repo / "emotion2vec" / "1" / "model.pt"))
    graph = str(module.inlined_graph)
    assert "aten::arange" not in graph
    assert not re.findall(r"Device = prim::Constant", graph)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_runner_pads_requests_of_different_lengths_exactly(torch_repo, precision):
    """Several requests of different lengths in one execution equal each request alone."""
    runner = TorchRunner(str(torch_repo / "emotion2vec" / "1" / "model.pt"), "cpu", precision)
    audio = clips((16_000, 40_077, 401), seed=2)
    wavs = [torch.from_numpy(a[None, :]) for a in audio]
    lens = [torch.tensor([len(a)]) for a in audio]
    together = runner.run(wavs, lens)
    tolerance = 1e-5 if precision == "fp32" else 5e-3  # fp16/bf16: ~5e-4 seen (other tiling)
    for row, (wav, n) in enumerate(zip(wavs, lens)):
        alone = runner.run([wav], [n])
        for ours, single in zip(together, alone):
            assert np.abs(ours[row].numpy() - single[0].numpy()).max() <= tolerance


@pytest.mark.parametrize("processes", [1, 2])
def test_benchmark_client_counts_what_triton_counts(torch_server, processes):
    """The GPU benchmark's stdlib HTTP closed loop (threads, or forked processes): every
    request answered and plausible, and Triton's statistics see exactly as many."""
    from e2v.loadtest import closed_loop, triton_stats
    from e2v.loadtest.gpu.phases import served_workload

    url = torch_server.config.http_url
    workload = served_workload("fixed-3s")
    before = triton_stats.snapshot(url)
    requests, errors = closed_loop.run_users(
        url, workload, 3, 1.5, ["SCORES", "EMBEDDING"], processes=processes
    )
    after = triton_stats.settled(url, before.handled + len(requests.ok)) - before
    assert errors == [] and requests.ok.all() and len(requests.ok) >= 3
    assert after.success == len(requests.ok) and after.failures == 0
    assert np.all(requests.audio_s == 3.0) and np.all(requests.latency_ms > 0)
