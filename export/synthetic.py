"""Synthetic checkpoints: the published directory layout with seeded random weights.

Model hubs are unreachable on our CI machines, so the whole pipeline is exercised on
these. Their labels are meaningless; every artefact made from them says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from e2v.export.config_template import PUBLISHED_LABELS, SIZES, configuration_json, model_config

VARIANTS = tuple(SIZES) + tuple(f"{size}-nohead" for size in SIZES)


def write_synthetic_model(
    variant: str, out_dir: Path, seed: int = 0, labels: tuple[str, ...] = PUBLISHED_LABELS
) -> Path:
    """Write `model.pt`, `config.yaml`, `tokens.txt`, `configuration.json` into `out_dir`.

    `variant` is `tiny`, `base` or `large`, optionally suffixed `-nohead` (embeddings
    only, like `emotion2vec_base`). Re-running with the same arguments reuses the
    directory; it is written atomically.
    """
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown synthetic model '{variant}'; choose one of {', '.join(VARIANTS)}"
        )
    size_name, _, suffix = variant.partition("-")
    with_head = suffix != "nohead"
    stamp = {"synthetic": True, "variant": variant, "seed": seed, "labels": list(labels)}
    marker = out_dir / "configuration.json"
    if marker.exists() and json.loads(marker.read_text()).get("synthetic_stamp") == stamp:
        return out_dir

    config = model_config(SIZES[size_name], with_head=with_head)
    model = _random_model(config, len(labels) if with_head else -1, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        torch.save({"model": model.state_dict()}, tmp / "model.pt")
        with open(tmp / "config.yaml", "w", encoding="utf-8") as f:
            f.write(
                "# SYNTHETIC emotion2vec checkpoint: seeded random weights, labels meaningless\n"
            )
            yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True)
        if with_head:
            (tmp / "tokens.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        meta = configuration_json(with_head) | {"synthetic": True, "synthetic_stamp": stamp}
        (tmp / "configuration.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        (tmp / "README.md").write_text(
            f"# SYNTHETIC emotion2vec ({variant})\n\nSeeded random weights (seed {seed}) in the "
            "published FunASR layout, for offline tests. Predictions are meaningless.\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _random_model(config: dict, vocab_size: int, seed: int) -> torch.nn.Module:
    """FunASR's Emotion2vec with seeded weights; norms and scales perturbed off identity.

    Default initialisation leaves LayerNorms at (1, 0), extra tokens at zero and the
    ALiBi scale at 1: parity tests would then miss bugs in those paths.
    """
    from funasr.models.emotion2vec.model import Emotion2vec

    torch.manual_seed(seed)
    model = Emotion2vec(model_conf=config["model_conf"], vocab_size=vocab_size)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "alibi_scale" in name:
                param.copy_(0.5 + noise.abs() * 0.5)
            elif "extra_tokens" in name:
                param.copy_(noise)
            elif param.dim() == 1 and ("norm" in name or name.endswith(("1.weight", "1.bias"))):
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * noise)
            elif name.startswith("proj."):
                param.copy_(noise * (0.5 if name.endswith("weight") else 0.1))
    return model.eval()
