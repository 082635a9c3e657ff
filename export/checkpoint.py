"""Model sources: a local FunASR directory, a hub name, or a synthetic checkpoint.

Loading uses FunASR's own `Emotion2vec` class; this module only adds the checks a
serving exporter needs (every inference weight present, the right model type).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Checkpoint keys that only pre-training uses: reported, never required.
PRETRAINING_ONLY = re.compile(r"(^|\.)(decoder|ema|_ema)\.|^ema\b|^_ema\b")

SYNTHETIC_PREFIX = "synthetic:"
HUB_NAMES = {
    # short aliases -> (ModelScope id, Hugging Face id)
    "emotion2vec_plus_large": ("iic/emotion2vec_plus_large", "emotion2vec/emotion2vec_plus_large"),
    "emotion2vec_plus_base": ("iic/emotion2vec_plus_base", "emotion2vec/emotion2vec_plus_base"),
    "emotion2vec_plus_seed": ("iic/emotion2vec_plus_seed", "emotion2vec/emotion2vec_plus_seed"),
    "emotion2vec_base": ("iic/emotion2vec_base", "emotion2vec/emotion2vec_base"),
}


class CheckpointError(Exception):
    """A model source that cannot be exported; the message is one clear line."""


@dataclass
class LoadedModel:
    """A FunASR `Emotion2vec` in eval mode plus what the exporter needs to know."""

    model: torch.nn.Module
    model_dir: Path
    labels: list[str]  # tokens.txt order; empty for models without a head
    source: str
    synthetic: bool
    checkpoint_sha256: str
    ignored_keys: list[str] = field(default_factory=list)  # pre-training only (decoder, EMA)
    unexpected_keys: list[str] = field(default_factory=list)  # neither used nor pre-training

    @property
    def has_head(self) -> bool:
        return self.model.proj is not None


def resolve_source(source: str, cache_dir: Path) -> tuple[Path, bool]:
    """Turn `--model SOURCE` into a local model directory; returns (dir, synthetic)."""
    if source.startswith(SYNTHETIC_PREFIX):
        from e2v.export.synthetic import write_synthetic_model

        variant = source[len(SYNTHETIC_PREFIX) :]
        return write_synthetic_model(variant, cache_dir / f"synthetic-{variant}"), True
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        if not path.is_dir():
            raise CheckpointError(f"model directory not found: {path}")
        return path, _is_synthetic_dir(path)
    return download_from_hub(source, cache_dir), False


def download_from_hub(name: str, cache_dir: Path) -> Path:
    """Download a published model with ModelScope or Hugging Face Hub.

    Fails fast with a clear message where the hubs are unreachable.
    """
    ms_id, hf_id = HUB_NAMES.get(name.split("/")[-1], (name, name))
    if name.startswith("emotion2vec/"):
        ms_id, hf_id = hf_id, name  # Hugging Face ids first for their own namespace
        order = [("huggingface", hf_id), ("modelscope", ms_id)]
    else:
        order = [("modelscope", ms_id), ("huggingface", hf_id)]
    reasons = []
    for hub, model_id in order:
        try:
            return _download(hub, model_id, cache_dir)
        except Exception as exc:  # noqa: BLE001 - each hub fails in its own way
            reasons.append(f"{hub} ({model_id}): {_first_line(exc)}")
    raise CheckpointError(
        f"cannot download '{name}': " + "; ".join(reasons) + ". Without network access, "
        "download the model elsewhere (model.pt, config.yaml, tokens.txt, configuration.json) "
        "and pass its directory: e2v export --model /path/to/emotion2vec_plus_large"
    )


def _download(hub: str, model_id: str, cache_dir: Path) -> Path:
    # Short timeouts and no retries: an unreachable hub must fail in seconds, not hang.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    if hub == "huggingface":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, cache_dir=str(cache_dir / "hf")))
    _check_reachable("www.modelscope.cn")
    from modelscope.hub.snapshot_download import snapshot_download as ms_download

    return Path(ms_download(model_id, cache_dir=str(cache_dir / "modelscope")))


def _check_reachable(host: str, timeout_s: float = 5.0) -> None:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"{host} unreachable ({exc})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _is_synthetic_dir(path: Path) -> bool:
    card = path / "configuration.json"
    try:
        return bool(json.loads(card.read_text()).get("synthetic"))
    except (OSError, ValueError):
        return False


def load_model(model_dir: Path, source: str | None = None) -> LoadedModel:
    """Build FunASR's `Emotion2vec` from a model directory and fill every inference weight."""
    from omegaconf import OmegaConf

    config_path, ckpt_path, tokens_path = _model_files(model_dir)
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    except Exception as exc:  # noqa: BLE001 - yaml/omegaconf errors vary
        raise CheckpointError(f"unreadable config {config_path}: {_first_line(exc)}") from exc
    if not isinstance(config, dict) or config.get("model") != "Emotion2vec":
        found = config.get("model") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(
            f"{config_path} describes model '{found}', not Emotion2vec: "
            "not an emotion2vec checkpoint"
        )
    labels = _read_labels(tokens_path) if tokens_path else []
    model = _build(config, len(labels))
    state, digest = _read_state_dict(ckpt_path)
    unused = _load_strict(model, state, ckpt_path)
    model.eval()
    return LoadedModel(
        model=model,
        model_dir=model_dir,
        labels=labels,
        source=source or str(model_dir),
        synthetic=_is_synthetic_dir(model_dir),
        checkpoint_sha256=digest,
        ignored_keys=[k for k in unused if PRETRAINING_ONLY.search(k)],
        unexpected_keys=[k for k in unused if not PRETRAINING_ONLY.search(k)],
    )


def _model_files(model_dir: Path) -> tuple[Path, Path, Path | None]:
    """(config.yaml, model.pt, tokens.txt or None), honouring configuration.json."""
    metas: dict = {}
    conf_json = model_dir / "configuration.json"
    if conf_json.exists():
        try:
            metas = json.loads(conf_json.read_text(encoding="utf-8")).get("file_path_metas", {})
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"unreadable {conf_json}: {_first_line(exc)}") from exc
    config = model_dir / metas.get("config", "config.yaml")
    ckpt = model_dir / metas.get("init_param", "model.pt")
    tokens_name = metas.get("tokenizer_conf", {}).get("token_list", "tokens.txt")
    tokens = model_dir / tokens_name
    for required in (config, ckpt):
        if not required.is_file():
            raise CheckpointError(f"missing file: {required}")
        if not os.access(required, os.R_OK):
            raise CheckpointError(f"unreadable file (permission denied): {required}")
    return config, ckpt, tokens if tokens.is_file() else None


def _read_labels(tokens_path: Path) -> list[str]:
    try:
        labels = [line.strip() for line in tokens_path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"unreadable labels {tokens_path}: {_first_line(exc)}") from exc
    labels = [label for label in labels if label]
    if not labels:
        raise CheckpointError(f"{tokens_path} has no labels")
    return labels


def _build(config: dict, vocab_size: int) -> torch.nn.Module:
    from funasr.models.emotion2vec.model import Emotion2vec

    try:
        return Emotion2vec(model_conf=config["model_conf"], vocab_size=vocab_size or -1)
    except Exception as exc:  # noqa: BLE001 - missing/invalid config fields
        raise CheckpointError(f"invalid model_conf in config.yaml: {_first_line(exc)}") from exc


def _read_state_dict(ckpt_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    data = ckpt_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        import io

        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors vary
        raise CheckpointError(f"unreadable checkpoint {ckpt_path}: {_first_line(exc)}") from exc
    # Same unwrapping as FunASR's load_pretrained_model.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{ckpt_path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, digest


def inference_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys the inference path reads (everything but pre-training parts)."""
    return [k for k in model.state_dict() if not PRETRAINING_ONLY.search(k)]


def _load_strict(model: torch.nn.Module, state: dict, ckpt_path: Path) -> list[str]:
    """Load weights; refuse missing or mis-shaped inference weights. Returns unused keys."""
    expected = model.state_dict()
    needed = inference_keys(model)
    missing = [k for k in needed if k not in state]
    if missing:
        shown = ", ".join(missing[:20]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 20 else ""
        )
        raise CheckpointError(f"{ckpt_path} lacks {len(missing)} inference weight(s): {shown}")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in needed
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{ckpt_path} does not match config.yaml (another model size or type?): "
            + "; ".join(wrong[:5])
        )
    usable = {
        k: v
        for k, v in state.items()
        if k in expected and tuple(v.shape) == tuple(expected[k].shape)
    }
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in state if k not in needed)
