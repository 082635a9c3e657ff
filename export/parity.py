"""Numeric parity of an exported model with FunASR's own inference, for the model card."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from e2v.contract import INPUT_WAV, INPUT_WAV_LENS, OUTPUT_EMBEDDING, OUTPUT_SCORES, is_scored_label

# Lengths chosen to hit the edge cases: just over one frame, not a multiple of the
# 320-sample stride, and long enough to span many attention positions.
PARITY_CLIP_SAMPLES = (401, 16_000, 40_077, 97_123)


def parity_clips(seed: int = 0) -> list[np.ndarray]:
    """Deterministic noisy test clips (random speech-band noise, not silence)."""
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in PARITY_CLIP_SAMPLES]


def pad_batch(clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad clips into WAV [B, T] and WAV_LENS [B]."""
    lens = np.array([len(c) for c in clips], dtype=np.int64)
    wav = np.zeros((len(clips), int(lens.max())), dtype=np.float32)
    for row, clip in enumerate(clips):
        wav[row, : len(clip)] = clip
    return wav, lens


def funasr_model(model_dir: Path, device: str = "cpu", threads: int | None = None):
    """FunASR's `AutoModel` on `model_dir`, without update checks or log noise, running
    `threads` torch threads (default: one per core).

    AutoModel sets torch's thread count itself from `ncpu` (default 4, whatever the machine
    has), undoing any `torch.set_num_threads` before it: on 2 cores that oversubscribes
    and makes FunASR up to 20x slower on long clips. So `ncpu` is passed explicitly and the
    count checked after loading: a baseline with other threads than stated is refused.
    """
    import torch
    from funasr import AutoModel

    threads = threads or os.cpu_count() or 1
    # Importing funasr configures the root logger at INFO; keep its per-step logs quiet.
    logging.getLogger().setLevel(logging.WARNING)
    model = AutoModel(
        model=str(model_dir),
        device=device,
        ncpu=threads,
        disable_update=True,
        disable_pbar=True,
        disable_log=True,
        log_level="WARNING",
    )
    if torch.get_num_threads() != threads:
        raise RuntimeError(
            f"FunASR runs {torch.get_num_threads()} torch threads after loading, not {threads}"
        )
    return model


def funasr_reference(model_dir: Path, clips: list) -> list[dict]:
    """FunASR `AutoModel.generate`, one clip (array or file path) at a time:
    {labels, scores, feats} per clip."""
    model = funasr_model(model_dir)
    return [model.generate(clip, extract_embedding=True, disable_pbar=True)[0] for clip in clips]


def compare(
    reference: list[dict], labels: list[str], scores: np.ndarray | None, embedding: np.ndarray
) -> dict[str, float]:
    """Max |diff| of SCORES (labels FunASR reports) and EMBEDDING against the reference."""
    kept = [i for i, label in enumerate(labels) if is_scored_label(label)]
    score_diff, emb_diff = 0.0, 0.0
    for row, ref in enumerate(reference):
        emb_diff = max(emb_diff, float(np.abs(embedding[row] - ref["feats"]).max()))
        if scores is not None:
            ours = scores[row, kept]
            score_diff = max(score_diff, float(np.abs(ours - np.asarray(ref["scores"])).max()))
    result = {OUTPUT_EMBEDDING: emb_diff}
    if scores is not None:
        result[OUTPUT_SCORES] = score_diff
    return result


def onnx_parity(onnx_path: Path, model_dir: Path, labels: list[str]) -> dict:
    """Batched ONNX Runtime vs FunASR one-at-a-time on `parity_clips()`."""
    import onnxruntime as ort

    clips = parity_clips()
    wav, lens = pad_batch(clips)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, {INPUT_WAV: wav, INPUT_WAV_LENS: lens})))
    diffs = compare(
        funasr_reference(model_dir, clips),
        labels,
        outputs.get(OUTPUT_SCORES),
        outputs[OUTPUT_EMBEDDING],
    )
    return {f"onnxruntime_batched_{k}": v for k, v in diffs.items()} | {
        "clip_samples": list(PARITY_CLIP_SAMPLES)
    }


def torchscript_parity(ts_path: Path, model_dir: Path, labels: list[str]) -> dict:
    """Batched TorchScript on the CPU, through the torch target's own runner, vs FunASR."""
    outputs = _run_torch(ts_path, "cpu", "fp32", parity_clips())
    diffs = compare(
        funasr_reference(model_dir, parity_clips()),
        labels,
        outputs.get(OUTPUT_SCORES),
        outputs[OUTPUT_EMBEDDING],
    )
    return {f"torch_batched_{k}": v for k, v in diffs.items()} | {
        "clip_samples": list(PARITY_CLIP_SAMPLES)
    }


def precision_difference(ts_path: Path, precision: str, device: str | None = None) -> dict:
    """Max |diff| of `precision` (autocast) against fp32 on the same device and clips.

    The device is CUDA where there is one (where fp16/bf16 are meant to run), else the CPU.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clips = parity_clips()
    reference = _run_torch(ts_path, device, "fp32", clips)
    reduced = _run_torch(ts_path, device, precision, clips)
    diffs = {
        f"torch_{precision}_vs_fp32_{name}": float(np.abs(reduced[name] - ref).max())
        for name, ref in reference.items()
    }
    return diffs | {"precision_check_device": device}


def _run_torch(ts_path: Path, device: str, precision: str, clips: list) -> dict[str, np.ndarray]:
    import torch
    from e2v.model_repository.python_backend.torch_model import TorchRunner

    runner = TorchRunner(str(ts_path), device=device, precision=precision)
    wav, lens = pad_batch(clips)
    outputs = runner.run([torch.from_numpy(wav)], [torch.from_numpy(lens)])
    names = [OUTPUT_SCORES, OUTPUT_EMBEDDING] if len(outputs) == 2 else [OUTPUT_EMBEDDING]
    return {name: out.numpy() for name, out in zip(names, outputs)}
