"""A custom head as Triton models: ONNX of the classifier, its configs, and the ensemble.

`e2v train-head` fits a scikit-learn pipeline (StandardScaler, then LogisticRegression or
MLPClassifier) on embeddings of the served base model. Here it becomes:

  <repo>/head_NAME/          config.pbtxt (cpu: Python backend, gpu: onnxruntime backend),
                             1/model.onnx (+ 1/model.py for cpu)
  <repo>/<base>_NAME/        the ensemble clients call: config.pbtxt, labels.txt,
                             MODEL_CARD.md, model_card.json, 1/ (empty, as ensembles are)

The ONNX graph is written from the fitted arrays (`HeadWeights`) with onnx.helper rather
than a converter: it standardises, applies the dense layers and the softmax in float64
and casts to float32 once, so the served SCORES equal `HeadWeights.predict_proba` to
float32 rounding. Every export checks that in ONNX Runtime before publishing. The head
is published before the ensemble, each by an atomic rename, so a server that loads the
ensemble always finds its head.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2v.export.repository import LABELS_FILE, publish_model_dir
from e2v.model_repository import PYTHON_BACKEND, TEMPLATES

from e2v.contract import (
    HEAD_EMBEDDING_OUTPUT,
    HEAD_MAX_BATCH_SIZE,
    HEAD_NAME_PATTERN,
    OUTPUT_EMBEDDING,
    OUTPUT_SCORES,
    ensemble_model_name,
    head_model_name,
    is_answer_label,
)

HEAD_KINDS = ("logistic", "mlp")
HEAD_TARGETS = ("cpu", "gpu")
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # ONNX Runtime 1.10+, including the 1.19 of Triton 24.10's backend
# ONNX output vs the float64 reference: float32 rounding of probabilities is <= 6e-8.
PARITY_TOLERANCE = 1e-6
MAX_LABEL_CHARS = 64
_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": None}


class HeadExportError(ValueError):
    """The head cannot be exported; the message says why in one line."""


@dataclass(frozen=True)
class HeadWeights:
    """A fitted head as arrays: standardise, dense layers (hidden activation between), softmax."""

    kind: str  # "logistic" | "mlp"
    labels: tuple[str, ...]  # output order
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D], never 0
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (W [in, out], b [out]), float64
    activation: str = "identity"  # between layers (one of _ACTIVATIONS)

    @property
    def embed_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def parameters(self) -> int:
        return sum(w.size + b.size for w, b in self.layers)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """The reference: the head in float64 numpy, [N, D] -> [N, C]."""
        h = (np.asarray(embeddings, dtype=np.float64) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = _activate(h, self.activation)
        h = h - h.max(axis=1, keepdims=True)
        e = np.exp(h)
        return e / e.sum(axis=1, keepdims=True)


def _activate(h: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(h, 0.0)
    if name == "tanh":
        return np.tanh(h)
    if name == "logistic":
        return 1.0 / (1.0 + np.exp(-h))
    return h


def from_sklearn(pipeline, kind: str) -> HeadWeights:
    """HeadWeights of a fitted Pipeline(StandardScaler, LogisticRegression | MLPClassifier)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler, model = pipeline[0], pipeline[-1]
    if not isinstance(scaler, StandardScaler) or len(pipeline) != 2:
        raise HeadExportError("expected Pipeline(StandardScaler, classifier)")
    labels = tuple(str(label) for label in model.classes_)
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    if isinstance(model, LogisticRegression):
        layers = [_output_layer(model.coef_.T, model.intercept_, len(labels))]
        return HeadWeights(kind, labels, mean, scale, tuple(layers))
    if isinstance(model, MLPClassifier):
        pairs = list(zip(model.coefs_, model.intercepts_))
        hidden = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in pairs[:-1]]
        if model.activation not in _ACTIVATIONS:
            raise HeadExportError(f"unsupported MLP activation {model.activation!r}")
        out = _output_layer(pairs[-1][0], pairs[-1][1], len(labels))
        return HeadWeights(kind, labels, mean, scale, (*hidden, out), model.activation)
    raise HeadExportError(f"unsupported classifier {type(model).__name__}")


def _output_layer(w: np.ndarray, b: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A softmax layer. A binary scikit-learn model has one logit z for the second class
    (probability sigmoid(z)); softmax([0, z]) is exactly [1 - sigmoid(z), sigmoid(z)]."""
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64).reshape(-1)
    if classes == 2 and w.shape[1] == 1:
        w = np.concatenate([np.zeros_like(w), w], axis=1)
        b = np.concatenate([[0.0], b])
    if w.shape[1] != classes:
        raise HeadExportError(f"output layer has {w.shape[1]} units for {classes} labels")
    return w, b


# ---------------------------------------------------------------------------- ONNX


def head_onnx(weights: HeadWeights):
    """The head as an ONNX model: EMBEDDING float32 [N, D] -> SCORES float32 [N, C], and
    the embedding itself as HEAD_EMBEDDING_OUTPUT (see e2v.contract)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    init = [
        numpy_helper.from_array(weights.mean, "mean"),
        numpy_helper.from_array(weights.scale, "scale"),
    ]
    nodes = [
        helper.make_node("Cast", [OUTPUT_EMBEDDING], ["x64"], to=TensorProto.DOUBLE),
        helper.make_node("Sub", ["x64", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["h0"]),
    ]
    current = "h0"
    for i, (w, b) in enumerate(weights.layers):
        init += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"]),
        ]
        current = f"z{i}"
        op = _ACTIVATIONS[weights.activation]
        if i < len(weights.layers) - 1 and op is not None:
            nodes.append(helper.make_node(op, [current], [f"a{i}"]))
            current = f"a{i}"
    nodes += [
        helper.make_node("Softmax", [current], ["p64"], axis=-1),
        helper.make_node("Cast", ["p64"], [OUTPUT_SCORES], to=TensorProto.FLOAT),
        helper.make_node("Identity", [OUTPUT_EMBEDDING], [HEAD_EMBEDDING_OUTPUT]),
    ]
    rows = ["batch", weights.embed_dim], ["batch", len(weights.labels)]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info(OUTPUT_EMBEDDING, TensorProto.FLOAT, rows[0])],
        [
            helper.make_tensor_value_info(OUTPUT_SCORES, TensorProto.FLOAT, rows[1]),
            helper.make_tensor_value_info(HEAD_EMBEDDING_OUTPUT, TensorProto.FLOAT, rows[0]),
        ],
        init,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="e2v train-head",
        ir_version=ONNX_IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_parity(model_bytes: bytes, weights: HeadWeights, embeddings: np.ndarray) -> float:
    """Largest |ONNX Runtime - float64 reference| over `embeddings` (float32 [N, D])."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    x = np.asarray(embeddings, dtype=np.float32)
    served = session.run([OUTPUT_SCORES], {OUTPUT_EMBEDDING: x})[0]
    return float(np.abs(served - weights.predict_proba(x)).max(initial=0.0))


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BaseModel:
    """The served model the head reads embeddings from (its Triton config and metadata)."""

    name: str
    version: int
    embed_dim: int
    max_batch_size: int
    synthetic: bool
    source: str
    checkpoint_sha256: str
    length_buckets_s: str
    backend: str  # "python" (cpu target) or "onnxruntime", "pytorch"

    @property
    def default_target(self) -> str:
        return "cpu" if self.backend == "python" else "gpu"

    @classmethod
    def from_config(cls, config: dict, versions: list[str]) -> BaseModel:
        """From Triton's model config (JSON form) and the model's served versions."""
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        outputs = {o["name"]: o for o in config.get("output", [])}
        if config.get("platform") == "ensemble":
            raise HeadExportError(
                f"'{config.get('name')}' is an ensemble; train heads on the base model"
            )
        if OUTPUT_EMBEDDING not in outputs:
            raise HeadExportError(f"'{config.get('name')}' has no {OUTPUT_EMBEDDING} output")
        numbers = [int(v) for v in versions if str(v).isdigit()]
        return cls(
            name=config["name"],
            version=max(numbers) if numbers else 1,
            embed_dim=int(outputs[OUTPUT_EMBEDDING]["dims"][0]),
            max_batch_size=int(config.get("max_batch_size", 0)),
            synthetic=params.get("synthetic", "false") == "true",
            source=params.get("source", ""),
            checkpoint_sha256=params.get("checkpoint_sha256", ""),
            length_buckets_s=params.get("length_buckets_s", ""),
            backend=config.get("backend", "") or config.get("platform", ""),
        )


def check_name(name: str) -> str:
    if not re.fullmatch(HEAD_NAME_PATTERN, name):
        raise HeadExportError(
            f"--name {name!r}: use 1-48 lower-case letters, digits, '_' or '-', starting "
            "with a letter or digit"
        )
    return name


def check_labels(labels: list[str]) -> None:
    """Labels become labels.txt lines and Triton's "score:index:label" strings."""
    if len(labels) < 2:
        raise HeadExportError(f"a head needs at least 2 labels, the data has {len(labels)}")
    for label in labels:
        bad = (
            not label
            or label != label.strip()
            or len(label) > MAX_LABEL_CHARS
            or "/" in label  # clients read "a/b" as a bilingual label and show "b"
            or any(not ch.isprintable() for ch in label)
            or not is_answer_label(label)
        )
        if bad:
            raise HeadExportError(
                f"label {label!r} cannot be served: use up to {MAX_LABEL_CHARS} printable "
                "characters without '/', not 'unuse*' or '<unk>' (rename with --map)"
            )


def render_head_config(
    name: str, weights: HeadWeights, base: BaseModel, target: str, ensemble: str, sha256: str
) -> str:
    if target not in HEAD_TARGETS:
        raise HeadExportError(f"unknown head target {target!r}; choose cpu or gpu")
    values = {
        "name": name,
        "kind": weights.kind,
        "base_model": base.name,
        "ensemble": ensemble,
        "backend": "python" if target == "cpu" else "onnxruntime",
        "max_batch_size": max(HEAD_MAX_BATCH_SIZE, base.max_batch_size),
        "embed_dim": weights.embed_dim,
        "num_labels": len(weights.labels),
        "instance_kind": "KIND_CPU" if target == "cpu" else "KIND_GPU",
        "checkpoint_sha256": _escape(base.checkpoint_sha256),
        "head_sha256": sha256,
    }
    return _render("head_common.pbtxt", values) + "\n" + _render(f"head_{target}.pbtxt", values)


def render_ensemble_config(
    name: str, head: str, weights: HeadWeights, base: BaseModel, segment: str
) -> str:
    values = {
        "name": name,
        "head": head,
        "kind": weights.kind,
        "base_model": base.name,
        "base_version": base.version,
        "max_batch_size": base.max_batch_size,
        "embed_dim": weights.embed_dim,
        "num_labels": len(weights.labels),
        "synthetic": "true" if base.synthetic else "false",
        "source": _escape(base.source),
        "checkpoint_sha256": _escape(base.checkpoint_sha256),
        "length_buckets": _escape(base.length_buckets_s),
        "segment": _escape(segment),
    }
    return _render("ensemble.pbtxt", values)


def _render(template: str, values: dict) -> str:
    return string.Template((TEMPLATES / template).read_text()).substitute(values)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def parse_config(text: str):
    """Triton's ModelConfig of `text`; raises HeadExportError when Triton could not read it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise HeadExportError(f"generated config does not parse: {exc}") from exc


# ---------------------------------------------------------------------------- repository


@dataclass(frozen=True)
class ExportedHead:
    head_dir: Path
    ensemble_dir: Path
    head_sha256: str
    parity_max_abs: float


def export_head(
    repo: Path,
    name: str,
    weights: HeadWeights,
    base: BaseModel,
    target: str,
    segment: str,
    card: dict | None,
    check_embeddings: np.ndarray,
    write_extra=None,
) -> ExportedHead:
    """Write and publish `head_NAME` and `<base>_NAME` into `repo`.

    The ONNX output must match `weights.predict_proba` on `check_embeddings` within
    PARITY_TOLERANCE, or nothing is published. `card` (None: no model card) completes the
    ensemble's MODEL_CARD.md; `write_extra(ensemble_dir)` may add files (the
    cross-validation report) before the ensemble is published.
    """
    check_name(name)
    check_labels(list(weights.labels))
    if weights.embed_dim != base.embed_dim:
        raise HeadExportError(
            f"head expects {weights.embed_dim}-dim embeddings, '{base.name}' has {base.embed_dim}"
        )
    model_bytes = head_onnx(weights).SerializeToString()
    parity = onnx_parity(model_bytes, weights, check_embeddings)
    if not parity <= PARITY_TOLERANCE:
        raise HeadExportError(f"ONNX head differs from the fitted head by {parity:.3g}")
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    head, ensemble = head_model_name(name), ensemble_model_name(base.name, name)
    head_config = render_head_config(head, weights, base, target, ensemble, sha256)
    ensemble_config = render_ensemble_config(ensemble, head, weights, base, segment)
    for text in (head_config, ensemble_config):
        parse_config(text)
    repo.mkdir(parents=True, exist_ok=True)
    staged = [Path(tempfile.mkdtemp(prefix=f".{n}.staging-", dir=repo)) for n in (head, ensemble)]
    try:
        _write_head_dir(staged[0], head_config, model_bytes, target)
        if card is not None:
            card = card | {"head_sha256": sha256, "onnx_parity_max_abs": parity}
        _write_ensemble_dir(staged[1], ensemble_config, weights.labels, card)
        if write_extra is not None:
            write_extra(staged[1])
        publish_model_dir(staged[0], repo / head)  # the head first: the ensemble needs it
        publish_model_dir(staged[1], repo / ensemble)
    finally:
        for path in staged:
            shutil.rmtree(path, ignore_errors=True)
    return ExportedHead(repo / head, repo / ensemble, sha256, parity)


def _write_head_dir(model_dir: Path, config: str, model_bytes: bytes, target: str) -> None:
    version = model_dir / "1"
    version.mkdir()
    (version / "model.onnx").write_bytes(model_bytes)
    if target == "cpu":
        shutil.copy(PYTHON_BACKEND / "head_model.py", version / "model.py")
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")


def _write_ensemble_dir(model_dir: Path, config: str, labels: tuple[str, ...], card) -> None:
    (model_dir / "1").mkdir()  # ensembles have an empty version directory
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    (model_dir / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
    if card is None:
        return
    (model_dir / "model_card.json").write_text(
        json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    (model_dir / "MODEL_CARD.md").write_text(card_markdown(card), encoding="utf-8")


# ---------------------------------------------------------------------------- model card


def card_markdown(card: dict) -> str:
    """MODEL_CARD.md: what the head is, what it was trained on, how well it did in CV."""
    lines = []
    if card.get("synthetic"):
        lines += [
            "> **SYNTHETIC BASE MODEL** (seeded random weights): the embeddings this head was",
            "> trained on are meaningless, and so are its cross-validation figures for real",
            "> speech. It shows the pipeline; train on a real checkpoint for real figures.",
            "",
        ]
    base, data, cv = card["base_model"], card["data"], card["cross_validation"]
    lines += [
        f"# {card['name']}: emotion2vec with your own labels",
        "",
        f"`{card['name']}` = `{base['name']}` (version {base['version']}) -> "
        f"`{card['head_model']}` ({card['head_kind']}, {card['parameters']:,} parameters).",
        "",
        f"- labels: {', '.join(card['labels'])}",
        f"- base checkpoint sha256: `{base['checkpoint_sha256']}`",
        f"- base source: `{base['source']}`",
        f"- target: {card['target']}; head sha256 `{card['head_sha256']}`",
        f"- ONNX vs fitted head: max |diff| {card['onnx_parity_max_abs']:.2g}",
        f"- segmentation used for training: `{card['segment']}` (classify with the same)",
        f"- trained {card['trained_at']} with scikit-learn {card['versions']['scikit-learn']}",
        "",
        "## Data",
        "",
        f"`{data['source']}`: {data['rows']} rows, **{data['used']} used** "
        f"({data['segments']} segments, {data['groups']} groups), {data['failed']} failed, "
        f"{data['excluded']} left out.",
        "",
        "| label | rows | segments |",
        "| --- | ---: | ---: |",
    ]
    for label, counts in data["per_label"].items():
        lines.append(f"| {label} | {counts['rows']} | {counts['segments']} |")
    lines += [
        "",
        "## Cross-validation",
        "",
        f"{cv['folds']} folds, grouped by {cv['grouped_by']} (no group in two folds), "
        f"seed {cv['seed']}, class weight {cv['class_weight']}. Each row is predicted by a "
        "head that never saw it, from its segments' duration-weighted mean probabilities, "
        "as `e2v classify` does.",
        "",
        "| metric | value | 95% interval |",
        "| --- | ---: | ---: |",
    ]
    titles = {"wa": "WA (accuracy)", "ua": "UA (mean recall)", "macro_f1": "macro F1"}
    for key, title in titles.items():
        metric = cv["metrics"][key]
        ci = metric.get("ci")
        interval = f"{ci[0] * 100:.1f} - {ci[1] * 100:.1f}%" if ci else "-"
        lines.append(f"| {title} | {metric['value'] * 100:.1f}% | {interval} |")
    lines += ["", "Per class, the confusion matrix and every prediction: `cv/report.md`.", ""]
    return "\n".join(lines)
