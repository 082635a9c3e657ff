"""`e2v export`: checkpoint in, Triton model repository entry out."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from e2v.export.checkpoint import CheckpointError, LoadedModel, load_model, resolve_source
from e2v.export.formats import ONNX_EXPORTER, ONNX_OPSET, export_onnx, export_torchscript
from e2v.export.network import BatchedEmotion2vec
from e2v.export.repository import (
    LABELS_FILE,
    PRECISIONS,
    TARGETS,
    ServingOptions,
    default_options,
    publish_model_dir,
    render_config,
    write_model_card,
    write_warmup_data,
)
from e2v.model_repository import TORCH_BACKEND_MODEL, install_python_backend

from e2v.contract import MODEL_NAME

TORCHSCRIPT_TARGETS = ("torchscript", "torch")


class ExportError(Exception):
    """Export failed; the message is one clear line. Nothing half-written is left."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("E2V_CACHE", Path.home() / ".cache" / "emotion2vec-triton"))


def export_model(
    source: str,
    repo: Path,
    name: str = MODEL_NAME,
    target: str = "cpu",
    options: ServingOptions | None = None,
    cache_dir: Path | None = None,
    check_parity: bool = True,
) -> Path:
    """Export `source` into `repo/name` for `target`; returns the model directory."""
    if target not in TARGETS:
        raise ExportError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    options = options or default_options(target)
    if options.precision not in PRECISIONS:
        raise ExportError(
            f"unknown precision '{options.precision}'; choose one of {', '.join(PRECISIONS)}"
        )
    if options.precision != "fp32" and target != "torch":
        raise ExportError(f"--precision {options.precision} needs --target torch")
    _check_writable(repo)
    try:
        model_dir, synthetic = resolve_source(source, cache_dir or default_cache_dir())
        loaded = load_model(model_dir, source=source)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    loaded.synthetic = loaded.synthetic or synthetic

    repo.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=repo))
    try:
        _write_model_dir(staged, loaded, name, target, options, check_parity)
        publish_model_dir(staged, repo / name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return repo / name


def _check_writable(repo: Path) -> None:
    """Fail before any slow work when `repo` cannot be created or written."""
    existing = repo
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"cannot create repository {repo}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"repository {repo} is not writable ({existing})")


def _write_model_dir(
    model_dir: Path,
    loaded: LoadedModel,
    name: str,
    target: str,
    options: ServingOptions,
    check_parity: bool,
) -> None:
    # FunASR caches ALiBi biases by size; a cached tensor would be baked into the graph.
    loaded.model.alibi_biases.clear()
    net = BatchedEmotion2vec(loaded.model, loaded.labels).eval()
    version_dir = model_dir / "1"
    version_dir.mkdir()
    parity: dict = {}
    if target in TORCHSCRIPT_TARGETS:
        ts_path = export_torchscript(net, version_dir / "model.pt")
        if target == "torch":
            install_python_backend(version_dir, TORCH_BACKEND_MODEL)
            parity = _torch_checks(ts_path, loaded, options.precision, check_parity)
    else:
        onnx_path = export_onnx(net, version_dir / "model.onnx")
        if target == "cpu":
            install_python_backend(version_dir)
        if check_parity:
            from e2v.export.parity import onnx_parity

            parity = onnx_parity(onnx_path, loaded.model_dir, loaded.labels)
    if loaded.has_head:
        (model_dir / LABELS_FILE).write_text("\n".join(loaded.labels) + "\n", encoding="utf-8")
    embed_dim = int(loaded.model.cfg.get("embed_dim"))
    metadata = {
        "synthetic": "true" if loaded.synthetic else "false",
        "source": loaded.source,
        "checkpoint_sha256": loaded.checkpoint_sha256,
    }
    num_labels = len(loaded.labels) if loaded.has_head else None
    config = render_config(name, target, options, num_labels, embed_dim, metadata)
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    write_warmup_data(model_dir, options.warmup_buckets_s)
    write_model_card(model_dir, _card(loaded, name, target, options, embed_dim, parity))


def _torch_checks(ts_path: Path, loaded: LoadedModel, precision: str, check_parity: bool) -> dict:
    """FunASR parity of the fp32 module (CPU) and, for fp16/bf16, their distance from fp32."""
    from e2v.export.parity import precision_difference, torchscript_parity

    checks = torchscript_parity(ts_path, loaded.model_dir, loaded.labels) if check_parity else {}
    if precision != "fp32":
        checks |= precision_difference(ts_path, precision)
    return checks


def _card(loaded, name, target, options, embed_dim, parity) -> dict:
    import funasr
    import onnx
    import onnxruntime
    import torch

    return {
        "name": name,
        "target": target,
        "synthetic": loaded.synthetic,
        "source": loaded.source,
        "model_dir": str(loaded.model_dir),
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "labels": loaded.labels,
        "embed_dim": embed_dim,
        "exporter": "torch.jit.trace" if target in TORCHSCRIPT_TARGETS else ONNX_EXPORTER,
        "onnx_opset": ONNX_OPSET,
        "versions": {
            "funasr": funasr.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "ignored_keys_count": len(loaded.ignored_keys),
        "ignored_keys_sample": loaded.ignored_keys[:10],
        "unexpected_keys": loaded.unexpected_keys[:50],
        "options": asdict(options),
        "parity": parity,
    }
