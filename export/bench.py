"""`e2v bench export`: FunASR one clip at a time vs the exported ONNX model in ONNX Runtime.

Prints audio seconds processed per wall second for each way of running the same clips,
and the ratios against FunASR. Figures, not assertions: run it on the machine you size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from e2v.export.parity import funasr_model, pad_batch

from e2v.contract import INPUT_WAV, INPUT_WAV_LENS, SAMPLE_RATE, bucket_samples


def call_centre_clips(count: int, seed: int = 0) -> list[np.ndarray]:
    """Utterances of 1-20 s, skewed short (log-normal, median ~4 s), noisy tones."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(mean=np.log(4.0), sigma=0.6, size=count), 1.0, 20.0)
    clips = []
    for s in seconds:
        n = int(s * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        clip = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(n)
        clips.append(clip.astype(np.float32))
    return clips


def audio_seconds(clips: list[np.ndarray]) -> float:
    return sum(len(c) for c in clips) / SAMPLE_RATE


def time_funasr(model_dir: Path, clips: list[np.ndarray], threads: int) -> float:
    model = funasr_model(model_dir, threads=threads)
    model.generate(clips[0][:SAMPLE_RATE], disable_pbar=True)  # warm up
    start = time.perf_counter()
    for clip in clips:
        model.generate(clip, extract_embedding=True, disable_pbar=True)
    return time.perf_counter() - start


def time_onnx(onnx_path: Path, clips: list[np.ndarray], batch_size: int, threads: int) -> float:
    """batch_size 1: each clip alone, unpadded. >1: grouped by length bucket and padded,
    as the Triton dynamic batcher receives them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    session.run(None, dict(zip((INPUT_WAV, INPUT_WAV_LENS), pad_batch([clips[0]]))))  # warm up
    batches = _batches(clips, batch_size)
    start = time.perf_counter()
    for wav, lens in batches:
        session.run(None, {INPUT_WAV: wav, INPUT_WAV_LENS: lens})
    return time.perf_counter() - start


def _batches(clips: list[np.ndarray], batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if batch_size == 1:
        return [pad_batch([c]) for c in clips]
    by_bucket: dict[int, list[np.ndarray]] = defaultdict(list)
    for clip in clips:
        by_bucket[bucket_samples(len(clip))].append(clip)
    batches = []
    for size, group in sorted(by_bucket.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            wav = np.zeros((len(chunk), size), dtype=np.float32)
            for row, clip in enumerate(chunk):
                wav[row, : len(clip)] = clip
            batches.append((wav, np.array([len(c) for c in chunk], dtype=np.int64)))
    return batches


def run_benchmark(args: argparse.Namespace) -> int:
    from e2v.export.checkpoint import load_model, resolve_source
    from e2v.export.exporter import default_cache_dir
    from e2v.export.formats import export_onnx
    from e2v.export.network import BatchedEmotion2vec

    if args.repo and not (args.repo / args.name / "model_card.json").is_file():
        print(
            f"error: no exported model '{args.name}' in {args.repo} to record the figures in "
            f"(export it first, or drop --repo)",
            file=sys.stderr,
        )
        return 2
    model_dir, synthetic = resolve_source(args.model, default_cache_dir())
    clips = call_centre_clips(args.clips)
    total = audio_seconds(clips)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(model_dir, source=args.model)
        onnx_path = export_onnx(
            BatchedEmotion2vec(loaded.model, loaded.labels).eval(), Path(tmp) / "model.onnx"
        )
        del loaded
        threads = args.threads
        rows = [
            (
                "FunASR AutoModel.generate, one clip at a time",
                time_funasr(model_dir, clips, threads),
            ),
            ("ONNX Runtime, one clip at a time", time_onnx(onnx_path, clips, 1, threads)),
            (
                f"ONNX Runtime, batched by bucket (<= {args.batch_size})",
                time_onnx(onnx_path, clips, args.batch_size, threads),
            ),
        ]
    report = _format(args.model, synthetic, len(clips), total, rows, threads)
    print(report)
    if args.repo:
        _record(args.repo / args.name, report)
    return 0


def _format(source, synthetic, count, total, rows, threads: int) -> str:
    baseline = total / rows[0][1]
    lines = [
        f"model {source}{' (SYNTHETIC weights)' if synthetic else ''}; {count} clips, "
        f"{total:.1f} s of audio (1-20 s, call-centre mix); {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores; {threads} threads per method (FunASR ncpu, checked after "
        "loading; ONNX Runtime intra-op)",
        f"{'method':<52} {'wall s':>8} {'audio s/s':>10} {'vs FunASR':>10}",
    ]
    for name, wall in rows:
        rate = total / wall
        lines.append(f"{name:<52} {wall:>8.2f} {rate:>10.1f} {rate / baseline:>9.2f}x")
    return "\n".join(lines)


def _record(model_dir: Path, report: str) -> None:
    """Add the figures to the model card of an exported model."""
    from e2v.export.repository import write_model_card

    card_path = model_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["benchmark"] = report
    write_model_card(model_dir, card)
    print(f"recorded in {card_path}")
