"""Export: numeric parity with FunASR, batch invariance, formats, configs and errors.

Reference = FunASR's own `AutoModel.generate`, one clip at a time, on the same model
directory. Tolerances (fp32): SCORES max |diff| <= 1e-5, EMBEDDING max |diff| <= 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from e2v.export.checkpoint import CheckpointError, load_model
from e2v.export.exporter import ExportError, export_model
from e2v.export.formats import export_onnx, export_torchscript
from e2v.export.network import BatchedEmotion2vec
from e2v.export.parity import funasr_reference, pad_batch
from e2v.export.synthetic import write_synthetic_model
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

SCORES_TOL = 1e-5
EMBEDDING_TOL = 1e-4
# Mixed lengths: just over one frame, not multiples of 320, one >= 20 s.
CLIP_SAMPLES = (401, 16_000, 16_123, 47_999, 20 * 16_000 + 77, 5_317)


def make_clips(lengths=CLIP_SAMPLES, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    clips = []
    for n in lengths:
        t = np.arange(n) / 16_000
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)
        clips.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return clips


def kept_columns(labels: list[str]) -> list[int]:
    return [i for i, label in enumerate(labels) if not label.startswith("unuse")]


def assert_matches_funasr(model_dir, labels, clips, scores, embedding):
    reference = funasr_reference(model_dir, clips)
    for row, ref in enumerate(reference):
        emb_diff = np.abs(embedding[row] - ref["feats"]).max()
        assert emb_diff <= EMBEDDING_TOL, f"clip {row} ({len(clips[row])} samples): {emb_diff}"
        if scores is not None:
            assert ref["labels"] == [labels[i] for i in kept_columns(labels)]
            diff = np.abs(scores[row, kept_columns(labels)] - np.asarray(ref["scores"])).max()
            assert diff <= SCORES_TOL, f"clip {row} ({len(clips[row])} samples): {diff}"


def run_onnx(path: Path, wav: np.ndarray, lens: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"WAV": wav, "WAV_LENS": lens})))


def run_torchscript(path: Path, wav: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, ...]:
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return tuple(t.numpy() for t in module(torch.from_numpy(wav), torch.from_numpy(lens)))


@pytest.fixture(scope="module")
def tiny_exported(tiny_model_dir, tmp_path_factory):
    loaded = load_model(tiny_model_dir)
    net = BatchedEmotion2vec(loaded.model, loaded.labels).eval()
    out = tmp_path_factory.mktemp("tiny-formats")
    return loaded, export_onnx(net, out / "model.onnx"), export_torchscript(net, out / "model.pt")


def test_onnx_and_torchscript_batched_equal_funasr_tiny(tiny_exported, tiny_model_dir):
    loaded, onnx_path, ts_path = tiny_exported
    clips = make_clips()
    wav, lens = pad_batch(clips)
    onnx_out = run_onnx(onnx_path, wav, lens)
    assert_matches_funasr(
        tiny_model_dir, loaded.labels, clips, onnx_out["SCORES"], onnx_out["EMBEDDING"]
    )
    ts_scores, ts_embedding = run_torchscript(ts_path, wav, lens)
    assert_matches_funasr(tiny_model_dir, loaded.labels, clips, ts_scores, ts_embedding)


def test_naive_padded_funasr_batch_is_wrong_but_ours_is_invariant(tiny_exported):
    """The bug we fix: FunASR's own padded batch differs from single runs; ours does not."""
    loaded, onnx_path, _ = tiny_exported
    short, long = make_clips((16_123, 80_000), seed=3)
    wav, lens = pad_batch([short, long])
    alone = run_onnx(onnx_path, short[None, :], np.array([len(short)]))
    batched = run_onnx(onnx_path, wav, lens)
    for name, tol in (("SCORES", SCORES_TOL), ("EMBEDDING", EMBEDDING_TOL)):
        assert np.abs(alone[name][0] - batched[name][0]).max() <= tol
    # Same rows through FunASR's padding_mask path: measurably different.
    mask = torch.from_numpy(np.arange(wav.shape[1])[None, :] >= lens[:, None])
    with torch.no_grad():
        x = torch.from_numpy(wav)
        x = torch.nn.functional.layer_norm(x, x.shape[1:])
        feats = loaded.model.extract_features(x, padding_mask=mask)["x"]
    frames = int(BatchedEmotion2vec(loaded.model, loaded.labels).frame_counts(torch.tensor(16_123)))
    naive = feats[0, :frames].mean(0).numpy()
    assert np.abs(naive - alone["EMBEDDING"][0]).max() > 1e-3


def test_batch_invariance_each_clip_alone_vs_in_batch(tiny_exported):
    _, onnx_path, ts_path = tiny_exported
    clips = make_clips()
    wav, lens = pad_batch(clips)
    batched = run_onnx(onnx_path, wav, lens)
    ts_batched = run_torchscript(ts_path, wav, lens)
    for row, clip in enumerate(clips):
        alone = run_onnx(onnx_path, clip[None, :], np.array([len(clip)]))
        assert np.abs(alone["SCORES"][0] - batched["SCORES"][row]).max() <= SCORES_TOL
        assert np.abs(alone["EMBEDDING"][0] - batched["EMBEDDING"][row]).max() <= EMBEDDING_TOL
        assert np.abs(ts_batched[0][row] - batched["SCORES"][row]).max() <= SCORES_TOL


def test_shorter_than_one_frame_returns_zeros_without_crashing(tiny_exported):
    _, onnx_path, ts_path = tiny_exported
    clips = make_clips((16_000,))
    wav = np.zeros((3, 16_000), dtype=np.float32)
    wav[0] = clips[0]
    lens = np.array([16_000, 399, 0])
    out = run_onnx(onnx_path, wav, lens)
    assert out["SCORES"][0].sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(out["SCORES"][1:] == 0) and np.all(out["EMBEDDING"][1:] == 0)
    # Whole request shorter than one frame (T < 400): still defined, all zeros.
    tiny = run_onnx(onnx_path, np.ones((2, 100), np.float32), np.array([100, 50]))
    assert np.all(tiny["SCORES"] == 0) and np.all(tiny["EMBEDDING"] == 0)
    ts_scores, ts_emb = run_torchscript(ts_path, np.ones((1, 100), np.float32), np.array([100]))
    assert np.all(ts_scores == 0) and np.all(ts_emb == 0)


def test_unuse_labels_are_masked_like_funasr(cache_dir, tmp_path):
    labels = ("angry", "unuse_0", "happy", "neutral", "unuse_1", "sad", "<unk>")
    model_dir = write_synthetic_model(
        "tiny", cache_dir / "synthetic-tiny-unuse", seed=7, labels=labels
    )
    loaded = load_model(model_dir)
    net = BatchedEmotion2vec(loaded.model, loaded.labels).eval()
    onnx_path = export_onnx(net, tmp_path / "m.onnx")
    clips = make_clips((16_000, 33_333), seed=5)
    out = run_onnx(onnx_path, *pad_batch(clips))
    assert np.all(out["SCORES"][:, [1, 4]] == 0)
    assert np.allclose(out["SCORES"].sum(1), 1.0, atol=1e-5)
    assert_matches_funasr(model_dir, list(labels), clips, out["SCORES"], out["EMBEDDING"])


def test_model_without_head_exports_embedding_only(cache_dir, tmp_path):
    repo = tmp_path / "repo"
    export_model(
        "synthetic:tiny-nohead", repo, target="gpu", check_parity=False, cache_dir=cache_dir
    )
    model = onnx.load(str(repo / "emotion2vec" / "1" / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["EMBEDDING"]
    config = parse_config(repo / "emotion2vec" / "config.pbtxt")
    assert [o.name for o in config.output] == ["EMBEDDING"]
    assert not (repo / "emotion2vec" / "labels.txt").exists()
    clips = make_clips((20_000,))
    out = run_onnx(repo / "emotion2vec" / "1" / "model.onnx", *pad_batch(clips))
    model_dir = cache_dir / "synthetic-tiny-nohead"
    assert_matches_funasr(model_dir, [], clips, None, out["EMBEDDING"])


@pytest.mark.slow
def test_base_size_onnx_equals_funasr(cache_dir, tmp_path):
    """The published base architecture (94 M parameters), once per CI run."""
    repo = tmp_path / "repo"
    export_model("synthetic:base", repo, target="cpu", cache_dir=cache_dir)
    card = json.loads((repo / "emotion2vec" / "model_card.json").read_text())
    assert card["synthetic"] is True and card["embed_dim"] == 768
    clips = make_clips((401, 16_123, 20 * 16_000 + 77, 47_999), seed=11)
    out = run_onnx(repo / "emotion2vec" / "1" / "model.onnx", *pad_batch(clips))
    assert_matches_funasr(
        cache_dir / "synthetic-base", card["labels"], clips, out["SCORES"], out["EMBEDDING"]
    )
    # The exporter's own parity figures went into the model card.
    assert card["parity"]["onnxruntime_batched_SCORES"] <= SCORES_TOL


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
    onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
}


@pytest.mark.parametrize("target", ["cpu", "gpu", "tensorrt"])
def test_generated_config_parses_and_agrees_with_onnx(target, cache_dir, tmp_path):
    repo = tmp_path / "repo"
    export_model("synthetic:tiny", repo, target=target, check_parity=False, cache_dir=cache_dir)
    model_dir = repo / "emotion2vec"
    config = parse_config(model_dir / "config.pbtxt")
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    assert config.name == "emotion2vec"
    assert config.backend == {"cpu": "python"}.get(target, "onnxruntime")
    for io_config, io_graph in ((config.input, graph.input), (config.output, graph.output)):
        assert [c.name for c in io_config] == [g.name for g in io_graph]
        for c, g in zip(io_config, io_graph):
            assert ONNX_TO_TRITON[g.type.tensor_type.elem_type] == c.data_type
            graph_dims = [d.dim_value or -1 for d in g.type.tensor_type.shape.dim][1:]
            effective = list(c.reshape.shape) if c.HasField("reshape") else list(c.dims)
            assert effective == graph_dims, c.name
    scores = next(o for o in config.output if o.name == "SCORES")
    labels = (model_dir / scores.label_filename).read_text().splitlines()
    assert len(labels) == scores.dims[0] == 9
    assert config.parameters["synthetic"].string_value == "true"
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert len(config.model_warmup) >= 1
    if target == "tensorrt":
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
        assert "WAV:32x480000" in accel.parameters["trt_profile_max_shapes"]


def test_torchscript_target_config(cache_dir, tmp_path):
    repo = tmp_path / "repo"
    export_model(
        "synthetic:tiny", repo, target="torchscript", check_parity=False, cache_dir=cache_dir
    )
    config = parse_config(repo / "emotion2vec" / "config.pbtxt")
    assert config.backend == "pytorch" and config.default_model_filename == "model.pt"
    module = torch.jit.load(str(repo / "emotion2vec" / "1" / "model.pt"))
    names = [a.name for a in module.forward.schema.arguments][1:]
    assert names == [i.name for i in config.input] == ["WAV", "WAV_LENS"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "e2v", *args], capture_output=True, text=True, timeout=timeout
    )


def test_hub_name_fails_fast_with_clear_message(tmp_path):
    start = time.monotonic()
    result = run_cli(
        "export",
        "--model",
        "iic/emotion2vec_plus_large",
        "--repo",
        str(tmp_path / "repo"),
        timeout=90,
    )
    assert time.monotonic() - start < 60
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot download 'iic/emotion2vec_plus_large'" in last
    assert "e2v export --model /path/to" in last
    assert not (tmp_path / "repo").exists()


def damaged_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_inference_weights_are_refused_with_key_list(tiny_model_dir, tmp_path):
    model_dir = damaged_copy(tiny_model_dir, tmp_path / "damaged")
    state = torch.load(model_dir / "model.pt", weights_only=True)["model"]
    del state["blocks.0.attn.qkv.weight"], state["proj.bias"]
    torch.save({"model": state}, model_dir / "model.pt")
    with pytest.raises(
        CheckpointError, match=r"lacks 2 inference weight.*blocks\.0\.attn\.qkv\.weight"
    ):
        load_model(model_dir)


def test_pretraining_keys_are_ignored_and_reported(tiny_model_dir, tmp_path):
    model_dir = damaged_copy(tiny_model_dir, tmp_path / "with-ema")
    state = torch.load(model_dir / "model.pt", weights_only=True)["model"]
    state["_ema.blocks.0.attn.qkv.weight"] = torch.zeros(3)
    state["some_other_head.weight"] = torch.zeros(3)
    torch.save({"model": state}, model_dir / "model.pt")
    loaded = load_model(model_dir)
    assert "_ema.blocks.0.attn.qkv.weight" in loaded.ignored_keys
    assert any(".decoder." in k for k in loaded.ignored_keys)
    assert loaded.unexpected_keys == ["some_other_head.weight"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("remove_model_pt", "missing file"),
        ("other_model", "not Emotion2vec"),
        ("corrupt_model_pt", "unreadable checkpoint"),
        ("other_size", "does not match config.yaml"),
        ("bad_yaml", "unreadable config"),
    ],
)
def test_bad_model_directories_give_one_clear_line(
    damage, message, tiny_model_dir, tmp_path, cache_dir
):
    model_dir = damaged_copy(tiny_model_dir, tmp_path / "m")
    if damage == "remove_model_pt":
        (model_dir / "model.pt").unlink()
    elif damage == "other_model":
        text = (
            (model_dir / "config.yaml")
            .read_text()
            .replace("model: Emotion2vec", "model: Paraformer")
        )
        (model_dir / "config.yaml").write_text(text)
    elif damage == "corrupt_model_pt":
        (model_dir / "model.pt").write_bytes(b"not a checkpoint")
    elif damage == "other_size":
        (model_dir / "model.pt").write_bytes(
            (write_synthetic_model("base", cache_dir / "synthetic-base") / "model.pt").read_bytes()
        )
    elif damage == "bad_yaml":
        (model_dir / "config.yaml").write_text("model: [unclosed\n")
    repo = tmp_path / "repo"
    result = run_cli("export", "--model", str(model_dir), "--repo", str(repo))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not repo.exists() or not any(repo.iterdir())


def test_unknown_target_and_unwritable_output(tmp_path):
    result = run_cli(
        "export", "--model", "synthetic:tiny", "--repo", str(tmp_path / "r"), "--target", "fpga"
    )
    assert result.returncode == 2 and "unknown target 'fpga'" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_model("synthetic:tiny", blocker / "repo", check_parity=False)
    with pytest.raises(ExportError, match="model directory not found"):
        export_model(str(tmp_path / "nowhere"), tmp_path / "repo2", check_parity=False)


def test_reexport_replaces_the_model_atomically(cache_dir, tmp_path):
    repo = tmp_path / "repo"
    export_model("synthetic:tiny", repo, target="gpu", check_parity=False, cache_dir=cache_dir)
    first = parse_config(repo / "emotion2vec" / "config.pbtxt")
    (repo / "emotion2vec" / "stale.txt").write_text("from the old export")
    export_model("synthetic:tiny", repo, target="cpu", check_parity=False, cache_dir=cache_dir)
    second = parse_config(repo / "emotion2vec" / "config.pbtxt")
    assert (first.backend, second.backend) == ("onnxruntime", "python")
    assert not (repo / "emotion2vec" / "stale.txt").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["emotion2vec"]  # no staging leftovers


def test_bench_export_prints_figures_for_each_method():
    result = run_cli("bench", "export", "--model", "synthetic:tiny", "--clips", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.rstrip().endswith("x")]
    assert [row.split("  ")[0] for row in rows] == [
        "FunASR AutoModel.generate, one clip at a time",
        "ONNX Runtime, one clip at a time",
        "ONNX Runtime, batched by bucket (<= 8)",
    ]
    assert rows[0].rstrip().endswith("1.00x")
