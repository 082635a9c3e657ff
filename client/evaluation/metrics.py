"""Accuracy metrics in EmoBox's terms, computed by scikit-learn, with bootstrap intervals.

WA is plain accuracy, UA the mean per-class recall, F1 the macro F1; all three average
over the classes present in the true labels (a class the data lacks has no recall).
Intervals are percentile intervals of a stratified bootstrap: rows are resampled within
each true class, so every resample has the same class supports and every class a
recall. Resamples come from `numpy.random.default_rng(seed)`, fresh for each call, so a
seed reproduces them, and every aggregation method is resampled on the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION_BINS = 10
CI_LEVEL = 0.95


def classes_of(y_true: Sequence[str], y_pred: Sequence[str], order: Sequence[str]):
    """(evaluated classes: those in y_true; shown classes: plus predicted-only ones),
    both in the model's label order."""
    truth, predicted = set(y_true), set(y_pred)
    evaluated = [label for label in order if label in truth]
    shown = evaluated + [label for label in order if label in predicted - truth]
    return evaluated, shown


def summary(y_true, y_pred, evaluated: list[str]) -> dict[str, float]:
    """WA, UA and macro F1 (scikit-learn, zero_division=0)."""
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(
            recall_score(y_true, y_pred, labels=evaluated, average="macro", zero_division=0)
        ),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=evaluated, average="macro", zero_division=0)
        ),
    }


def per_class(y_true, y_pred, shown: list[str]) -> dict[str, dict[str, float]]:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=shown, zero_division=0
    )
    return {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(shown)
    }


def bootstrap_indices(y_true: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """Row indices of `resamples` stratified resamples (with replacement, per true class)."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y_true == label) for label in dict.fromkeys(y_true.tolist())]
    return [
        np.concatenate([rng.choice(group, size=len(group), replace=True) for group in groups])
        for _ in range(resamples)
    ]


def intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    evaluated: list[str],
    shown: list[str],
    resamples: int,
    seed: int,
) -> dict:
    """Percentile intervals of WA/UA/macro F1 and per-class precision/recall/F1."""
    if resamples <= 0 or len(y_true) == 0:
        return {}
    keep = [shown.index(label) for label in evaluated]
    codes = {label: i for i, label in enumerate(shown)}  # integer labels: faster in sklearn
    true, pred = (np.array([codes[x] for x in y]) for y in (y_true, y_pred))
    draws: dict[str, list] = {"wa": [], "ua": [], "macro_f1": [], "per_class": []}
    for index in bootstrap_indices(true, resamples, seed):
        t, p = true[index], pred[index]
        prf = precision_recall_fscore_support(t, p, labels=range(len(shown)), zero_division=0)[:3]
        draws["wa"].append(accuracy_score(t, p))
        draws["ua"].append(prf[1][keep].mean())
        draws["macro_f1"].append(prf[2][keep].mean())
        draws["per_class"].append(np.stack(prf))  # [3, classes]
    lo, hi = 50 * (1 - CI_LEVEL), 50 * (1 + CI_LEVEL)
    out = {name: _pair(np.percentile(draws[name], [lo, hi])) for name in ("wa", "ua", "macro_f1")}
    bounds = np.percentile(np.stack(draws["per_class"]), [lo, hi], axis=0)  # [2, 3, classes]
    out["per_class"] = {
        label: {
            metric: _pair(bounds[:, m, i]) for m, metric in enumerate(("precision", "recall", "f1"))
        }
        for i, label in enumerate(shown)
    }
    return out


def confusion(y_true, y_pred, shown: list[str]) -> dict:
    return {
        "labels": list(shown),
        "counts": confusion_matrix(y_true, y_pred, labels=shown).tolist(),
        "normalized": confusion_matrix(y_true, y_pred, labels=shown, normalize="true").tolist(),
    }


def threshold_table(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray) -> list:
    """Per threshold t: coverage (share of files with confidence >= t) and accuracy there."""
    rows = []
    for t in THRESHOLDS:
        kept = confidence >= t
        accuracy = accuracy_score(y_true[kept], y_pred[kept]) if kept.any() else None
        rows.append(
            {
                "threshold": t,
                "files": int(kept.sum()),
                "coverage": float(kept.mean()) if len(kept) else 0.0,
                "accuracy": _float(accuracy),
            }
        )
    return rows


def label_thresholds(y_true, y_pred, confidence, shown: list[str]) -> dict[str, list]:
    """Per predicted label L and threshold t, the rule "flag L when confidence >= t":
    coverage (share of L predictions kept), precision and recall of the flags."""
    table = {}
    for label in shown:
        predicted, actual = y_pred == label, y_true == label
        rows = []
        for t in THRESHOLDS:
            flagged = predicted & (confidence >= t)
            rows.append(
                {
                    "threshold": t,
                    "flagged": int(flagged.sum()),
                    "coverage": float(flagged.sum() / predicted.sum()) if predicted.any() else None,
                    "precision": _float(
                        precision_score(actual, flagged, zero_division=np.nan)
                        if flagged.any()
                        else None
                    ),
                    "recall": _float(recall_score(actual, flagged) if actual.any() else None),
                }
            )
        table[label] = rows
    return table


def calibration(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray) -> dict:
    """Top-label calibration: reliability bins from scikit-learn's `calibration_curve`
    (uniform bins) and the expected calibration error over the same bins."""
    correct = (y_true == y_pred).astype(int)
    if len(correct) == 0:
        return {"ece": None, "bins": []}
    accuracy, mean_confidence = calibration_curve(
        correct, confidence, n_bins=CALIBRATION_BINS, strategy="uniform", pos_label=1
    )
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    ids = np.searchsorted(edges[1:-1], confidence)  # calibration_curve's own binning
    counts = np.bincount(ids, minlength=CALIBRATION_BINS)
    used = np.flatnonzero(counts)
    ece = float(np.sum(counts[used] / len(correct) * np.abs(accuracy - mean_confidence)))
    bins = [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "files": int(counts[b]),
            "accuracy": float(a),
            "confidence": float(c),
        }
        for b, a, c in zip(used, accuracy, mean_confidence)
    ]
    return {"ece": ece, "bins": bins}


def evaluate_method(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    confidence: Sequence[float],
    order: Sequence[str],
    resamples: int,
    seed: int,
    full: bool = True,
) -> dict:
    """Every metric for one set of predictions (`order`: the model's labels). `full=False`
    (a --group-by value) stops after the headline metrics and the threshold table."""
    t, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    c = np.asarray(confidence, dtype=float)
    evaluated, shown = classes_of(t, p, order)
    ci = intervals(t, p, evaluated, shown, resamples, seed)
    out: dict = {"files": len(t), "classes": evaluated}
    for name, value in summary(t, p, evaluated).items():
        out[name] = {"value": value, "ci": ci.get(name)}
    out["thresholds"] = threshold_table(t, p, c)
    if not full:
        return out
    out["per_class"] = {}
    for label, values in per_class(t, p, shown).items():
        bounds = ci["per_class"][label] if ci else {}
        out["per_class"][label] = {
            metric: {"value": values[metric], "ci": bounds.get(metric)}
            for metric in ("precision", "recall", "f1")
        } | {"support": values["support"]}
    out["confusion"] = confusion(t, p, shown)
    out["label_thresholds"] = label_thresholds(t, p, c, shown)
    out["calibration"] = calibration(t, p, c)
    return out


def _pair(values) -> list[float]:
    return [float(values[0]), float(values[1])]


def _float(value) -> float | None:
    if value is None or np.isnan(value):
        return None
    return float(value)
