"""Fit a head on cached embeddings, with grouped, stratified cross-validation.

Training samples are segments; each carries its row's label. Folds come from
scikit-learn's StratifiedGroupKFold over groups (the `--group-by` column, else the file),
so no speaker, or no file, is ever on both sides of a fold. Each held-out row is
predicted like `e2v classify` predicts a file: its segments' probabilities, averaged with
duration weights (`client.results.aggregate`). The final head is fitted on every row.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass

import numpy as np
from e2v.client.heads.embed import Row
from e2v.client.results import FileResult, SegmentResult, aggregate
from e2v.client.triton import ModelInfo

HEAD_KINDS = ("logistic", "mlp")
CLASS_WEIGHTS = ("none", "balanced")
# The paper's downstream head is about 0.2 M parameters: 768 x 256 + 256 x C.
MLP_HIDDEN = 256


class TrainingError(ValueError):
    """The data cannot train a head (too few labels, rows or groups); one line says why."""


@dataclass(frozen=True)
class Samples:
    """The used rows' segments as arrays, aligned row by row."""

    x: np.ndarray  # [S, D] float64
    y: np.ndarray  # [S] label strings
    row: np.ndarray  # [S] index into `rows`
    groups: np.ndarray  # [S] group of each segment's row
    rows: list[Row]  # used rows
    labels: list[str]  # sorted: the head's output order


def group_of(row: Row, group_by: str | None) -> str:
    """A row's CV group: its --group-by value, else its file."""
    if group_by is None:
        return f"file:{row.item.path}"
    return f"{group_by}:{row.item.fields.get(group_by, '')}"


def samples(rows: list[Row], group_by: str | None) -> Samples:
    used = [row for row in rows if row.used]
    labels = sorted({row.label for row in used})
    if len(labels) < 2:
        found = ", ".join(labels) or "none"
        raise TrainingError(f"a head needs at least 2 labels with usable rows (found: {found})")
    xs, ys, index, groups = [], [], [], []
    for i, row in enumerate(used):
        n = len(row.embedded.embeddings)
        xs.append(row.embedded.embeddings.astype(np.float64))
        ys += [row.label] * n
        index += [i] * n
        groups += [group_of(row, group_by)] * n
    return Samples(
        np.concatenate(xs),
        np.array(ys, dtype=object),
        np.array(index),
        np.array(groups),
        used,
        labels,
    )


def make_pipeline(kind: str, class_weight: str, seed: int):
    """StandardScaler + LogisticRegression (multinomial) or a one-hidden-layer MLP."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        weight = "balanced" if class_weight == "balanced" else None
        model = LogisticRegression(C=1.0, max_iter=2000, class_weight=weight, random_state=seed)
    elif kind == "mlp":
        model = MLPClassifier(
            hidden_layer_sizes=(MLP_HIDDEN,),
            alpha=1e-3,
            max_iter=300,
            random_state=seed,
        )
    else:
        raise TrainingError(f"--head must be one of {', '.join(HEAD_KINDS)}, not {kind!r}")
    return Pipeline([("scale", StandardScaler()), ("head", model)])


def fit(kind: str, class_weight: str, seed: int, x: np.ndarray, y: np.ndarray):
    """A fitted pipeline. The MLP has no class_weight: balanced sample weights instead."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.utils.class_weight import compute_sample_weight

    pipeline = make_pipeline(kind, class_weight, seed)
    kwargs = {}
    if kind == "mlp" and class_weight == "balanced":
        if "sample_weight" not in inspect.signature(pipeline[-1].fit).parameters:
            raise TrainingError(
                "--head mlp --class-weight balanced needs scikit-learn 1.7+ "
                "(pip install './[train]' in the clone)"
            )
        kwargs["head__sample_weight"] = compute_sample_weight("balanced", y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped fit is still a head
        return pipeline.fit(x, y, **kwargs)


@dataclass
class CrossValidation:
    probabilities: np.ndarray  # [S, C] out-of-fold, in Samples.labels order
    folds: int
    fold_of_row: np.ndarray  # [rows]
    warnings: list[str]
    seconds: float


def cross_validate(
    data: Samples, kind: str, folds: int, class_weight: str, seed: int
) -> CrossValidation:
    """Out-of-fold probabilities of every segment from StratifiedGroupKFold."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = len(set(data.groups.tolist()))
    if folds < 2:
        raise TrainingError(f"--cv must be at least 2, not {folds}")
    if groups < folds:
        raise TrainingError(
            f"--cv {folds} needs at least {folds} groups; the data has {groups} "
            "(lower --cv, or group by another column)"
        )
    notes = []
    for label in data.labels:
        label_groups = len(set(data.groups[data.y == label].tolist()))
        if label_groups < folds:
            notes.append(
                f"label {label!r} is in {label_groups} group(s), fewer than the {folds} folds: "
                "some folds cannot test it"
            )
    start = time.perf_counter()
    out = np.zeros((len(data.y), len(data.labels)))
    fold_of_row = np.full(len(data.rows), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" is in notes
        splits = list(splitter.split(data.x, data.y, data.groups))
    for fold, (train, test) in enumerate(splits):
        trained = set(data.y[train].tolist())
        if len(trained) < 2:
            raise TrainingError(f"fold {fold + 1} has a single label to train on; lower --cv")
        pipeline = fit(kind, class_weight, seed, data.x[train], data.y[train])
        columns = [data.labels.index(label) for label in pipeline.classes_]
        out[np.ix_(test, columns)] = pipeline.predict_proba(data.x[test])
        fold_of_row[data.row[test]] = fold
        missing = sorted(set(data.labels) - trained)
        if missing:
            notes.append(f"fold {fold + 1} trained without {', '.join(missing)}")
    return CrossValidation(out, folds, fold_of_row, notes, time.perf_counter() - start)


def row_results(data: Samples, probabilities: np.ndarray, info: ModelInfo) -> list[FileResult]:
    """Each used row's result from its segments' probabilities, aggregated as classify does."""
    results = []
    for i, row in enumerate(data.rows):
        mask = data.row == i
        bounds = row.embedded.bounds
        segments = [
            SegmentResult(
                float(start), float(end), dict(zip(data.labels, map(float, p))), np.zeros(0)
            )
            for (start, end), p in zip(bounds, probabilities[mask])
        ]
        results.append(aggregate(row.item.path, row.embedded.duration_s, segments, info, {}))
    return results
