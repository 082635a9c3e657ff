"""Write a Triton model repository entry: `<repo>/<name>/{config.pbtxt, labels.txt, 1/...}`.

The config is rendered from the commented templates in `model_repository/templates/`,
so the generated file reads like documentation. A re-export replaces the model
directory atomically: it is built beside the old one and swapped in by rename.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2v.model_repository import TEMPLATES

from e2v.contract import (
    INPUT_WAV,
    INPUT_WAV_LENS,
    LENGTH_BUCKETS_S,
    MAX_BATCH_SAMPLES,
    MAX_SAMPLES,
    MIN_SAMPLES,
    OUTPUT_EMBEDDING,
    OUTPUT_SCORES,
    SAMPLE_RATE,
    bucket_lengths_samples,
)

LABELS_FILE = "labels.txt"
TARGETS = ("cpu", "gpu", "tensorrt", "torchscript", "torch")
PRECISIONS = ("fp32", "fp16", "bf16")  # torch target only
# Triton backend per target; the rest use the onnxruntime backend.
BACKENDS = {"cpu": "python", "torch": "python", "torchscript": "pytorch"}
# Instance kind per target: KIND_AUTO resolves to the GPU where Triton sees one.
INSTANCE_KINDS = {"cpu": "KIND_CPU", "torch": "KIND_AUTO"}


@dataclass(frozen=True)
class ServingOptions:
    """Batching and instance settings; defaults per target come from `default_options`."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    max_queue_size: int
    queue_timeout_us: int
    instance_count: int
    intra_op_threads: int  # cpu and torch (CPU instances) targets; 0 = all cores
    warmup_buckets_s: tuple[float, ...]
    # Python-backend targets: samples per ONNX Runtime call and per request (rows x length).
    max_batch_samples: int = MAX_BATCH_SAMPLES
    precision: str = "fp32"  # torch target: fp32, fp16 or bf16 (autocast)


def default_options(target: str) -> ServingOptions:
    """Batching defaults. GPU: big batches, short delay; CPU: small batches (compute-bound)."""
    if target == "cpu":
        return ServingOptions(
            max_batch_size=8,
            preferred_batch_sizes=(4, 8),
            max_queue_delay_us=10_000,
            max_queue_size=64,
            queue_timeout_us=30_000_000,
            instance_count=1,
            intra_op_threads=0,
            warmup_buckets_s=(3.0,),
        )
    return ServingOptions(
        max_batch_size=32,
        preferred_batch_sizes=(8, 16, 32),
        max_queue_delay_us=5_000,
        max_queue_size=512,
        queue_timeout_us=30_000_000,
        instance_count=1,
        intra_op_threads=0,
        warmup_buckets_s=LENGTH_BUCKETS_S,
        # GPU memory holds a full batch of the longest bucket (the torch target checks it;
        # the onnxruntime/tensorrt backends run no Python checks).
        max_batch_samples=32 * MAX_SAMPLES,
    )


def render_config(
    name: str,
    target: str,
    options: ServingOptions,
    num_labels: int | None,
    embed_dim: int,
    metadata: dict[str, str],
) -> str:
    """The `config.pbtxt` text for one target."""
    if target not in TARGETS:
        raise ValueError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    backend = BACKENDS.get(target, "onnxruntime")
    common = string.Template((TEMPLATES / "common.pbtxt").read_text())
    specific = string.Template((TEMPLATES / f"{target}.pbtxt").read_text())
    values = {
        "name": name,
        "backend": backend,
        "max_batch_size": options.max_batch_size,
        "outputs": _outputs(num_labels, embed_dim),
        "preferred_batch_sizes": ", ".join(map(str, options.preferred_batch_sizes)),
        "max_queue_delay_us": options.max_queue_delay_us,
        "queue_timeout_us": options.queue_timeout_us,
        "max_queue_size": options.max_queue_size,
        "instance_count": options.instance_count,
        "instance_kind": INSTANCE_KINDS.get(target, "KIND_GPU"),
        "precision": options.precision,
        "warmup": _warmup(options.warmup_buckets_s),
        "length_buckets": ",".join(f"{s:g}" for s in LENGTH_BUCKETS_S),
        "intra_op_threads": options.intra_op_threads,
        "max_samples": MAX_SAMPLES,
        "max_batch_samples": options.max_batch_samples,
        **_trt_profile(options.max_batch_size),
        **{k: _escape(v) for k, v in metadata.items()},
    }
    return common.substitute(values) + "\n" + specific.substitute(values)


def _outputs(num_labels: int | None, embed_dim: int) -> str:
    lines = []
    if num_labels:
        lines.append(
            f'  {{ name: "{OUTPUT_SCORES}", data_type: TYPE_FP32, dims: [ {num_labels} ], '
            f'label_filename: "{LABELS_FILE}" }}'
        )
    lines.append(f'  {{ name: "{OUTPUT_EMBEDDING}", data_type: TYPE_FP32, dims: [ {embed_dim} ] }}')
    return ",\n".join(lines)


WARMUP_DIR = "warmup"


def _warmup(buckets_s: tuple[float, ...]) -> str:
    """Silence of each bucket's full length: WAV_LENS comes from a data file, because a
    zero length is refused like any row shorter than one frame."""
    entries = []
    for seconds in buckets_s:
        samples = int(seconds * SAMPLE_RATE)
        entries.append(
            f'  {{ name: "bucket_{seconds:g}s" batch_size: 1\n'
            f'    inputs {{ key: "{INPUT_WAV}" value: {{ data_type: TYPE_FP32 dims: [ {samples} ] '
            "zero_data: true } }\n"
            f'    inputs {{ key: "{INPUT_WAV_LENS}" value: {{ data_type: TYPE_INT64 dims: [ 1 ] '
            f'input_data_file: "{_warmup_lens_file(samples)}" }} }} }}'
        )
    return "model_warmup [\n" + ",\n".join(entries) + "\n]"


def _warmup_lens_file(samples: int) -> str:
    return f"wav_lens_{samples}"


def write_warmup_data(model_dir: Path, buckets_s: tuple[float, ...]) -> None:
    """`<model>/warmup/wav_lens_<n>`: the raw int64 length each warmup sample sends."""
    directory = model_dir / WARMUP_DIR
    directory.mkdir(exist_ok=True)
    for seconds in buckets_s:
        samples = int(seconds * SAMPLE_RATE)
        (directory / _warmup_lens_file(samples)).write_bytes(
            np.array([samples], dtype="<i8").tobytes()
        )


def _trt_profile(max_batch: int) -> dict[str, str]:
    longest = max(bucket_lengths_samples())
    opt_batch = max(1, max_batch // 2)
    return {
        "trt_min_shapes": f"{INPUT_WAV}:1x{MIN_SAMPLES},{INPUT_WAV_LENS}:1",
        "trt_opt_shapes": f"{INPUT_WAV}:{opt_batch}x{3 * SAMPLE_RATE},{INPUT_WAV_LENS}:{opt_batch}",
        "trt_max_shapes": f"{INPUT_WAV}:{max_batch}x{longest},{INPUT_WAV_LENS}:{max_batch}",
    }


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"')


def publish_model_dir(staged: Path, final: Path) -> None:
    """Replace `final` with the fully written `staged` directory (same filesystem)."""
    if final.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, retired / final.name)
        os.replace(staged, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, final)


def write_model_card(model_dir: Path, card: dict) -> None:
    """`model_card.json` (machine-readable) and `MODEL_CARD.md` (for people)."""
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False))
    (model_dir / "MODEL_CARD.md").write_text(_card_markdown(card))


def _card_markdown(card: dict) -> str:
    lines = [f"# {card['name']}: emotion2vec on Triton ({card['target']})", ""]
    if card.get("synthetic"):
        lines += [
            "> **SYNTHETIC MODEL**: seeded random weights in the published layout, made for",
            "> offline tests. Its labels are real names but its predictions are meaningless.",
            "",
        ]
    lines += [
        f"- source: `{card['source']}`",
        f"- checkpoint sha256: `{card['checkpoint_sha256']}`",
        f"- labels: {', '.join(card['labels']) or '(none: embeddings only)'}",
        f"- embedding dim: {card['embed_dim']}",
        f"- exporter: {card['exporter']}, opset {card['onnx_opset']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in card['versions'].items())}",
        f"- ignored checkpoint keys (pre-training only): {card['ignored_keys_count']}",
        f"- unexpected checkpoint keys (ignored): {len(card.get('unexpected_keys', []))}",
        "",
        "## Serving options",
        "",
        "```json",
        json.dumps(card["options"], indent=2),
        "```",
    ]
    if card.get("parity"):
        lines += ["", "## Parity with FunASR `AutoModel.generate` (one clip at a time)", ""]
        lines += ["| check | max abs diff |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3g} |" for k, v in card["parity"].items() if isinstance(v, float)]
        lines += ["", f"clips (samples): {card['parity'].get('clip_samples')}"]
        if "precision_check_device" in card["parity"]:
            lines += [
                f"{card['options']['precision']} vs fp32 measured on "
                f"{card['parity']['precision_check_device']} (same clips, torch.autocast)"
            ]
    if card.get("benchmark"):
        lines += ["", "## Benchmark (`e2v bench export`)", "", "```", card["benchmark"], "```"]
    return "\n".join(lines) + "\n"
