"""The report's figures, drawn by scikit-learn's displays and matplotlib (headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from e2v.client.evaluation.metrics import CALIBRATION_BINS  # noqa: E402
from e2v.client.evaluation.run import Evaluation  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

SYNTHETIC_TITLE = "SYNTHETIC model: labels and numbers meaningless"


def write_all(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    return [
        confusion_figure(evaluation, out_dir / "confusion_matrix.png"),
        reliability_figure(evaluation, out_dir / "reliability.png"),
        thresholds_figure(evaluation, out_dir / "thresholds.png"),
    ]


def confusion_figure(evaluation: Evaluation, path: Path) -> Path:
    matrix = evaluation.metrics[evaluation.primary.name]["confusion"]
    size = 3 + 0.6 * len(matrix["labels"])
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    for ax, key, fmt, title in (
        (axes[0], "counts", "d", "counts"),
        (axes[1], "normalized", ".2f", "row-normalised (recall on the diagonal)"),
    ):
        display = ConfusionMatrixDisplay(np.array(matrix[key]), display_labels=matrix["labels"])
        display.plot(ax=ax, values_format=fmt, colorbar=False, cmap="Blues", xticks_rotation=45)
        ax.set_title(title)
    return _save(fig, evaluation, path, f"Confusion matrix ({evaluation.primary.name})")


def reliability_figure(evaluation: Evaluation, path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    for method in evaluation.methods:
        correct, confidence = _correct_and_confidence(evaluation, method.name)
        display = CalibrationDisplay.from_predictions(
            correct, confidence, n_bins=CALIBRATION_BINS, pos_label=1, ax=top, name=method.name
        )
        color = display.line_.get_color()
        bottom.hist(confidence, bins=CALIBRATION_BINS, range=(0, 1), histtype="step", color=color)
    top.set(xlabel="", ylabel="accuracy (fraction correct)")
    bottom.set(xlabel="confidence of the predicted label", ylabel="files")
    return _save(fig, evaluation, path, "Reliability diagram")


def thresholds_figure(evaluation: Evaluation, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in evaluation.methods:
        rows = evaluation.metrics[method.name]["thresholds"]
        t = [r["threshold"] for r in rows]
        accuracy = [np.nan if r["accuracy"] is None else r["accuracy"] for r in rows]
        (line,) = ax.plot(t, accuracy, marker="o", label=f"{method.name} accuracy")
        ax.plot(
            t,
            [r["coverage"] for r in rows],
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"{method.name} coverage",
        )
    ax.set(xlabel="confidence threshold t", ylabel="share", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, evaluation, path, "Accuracy and coverage above a confidence threshold")


def _correct_and_confidence(evaluation: Evaluation, name: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [row for row in evaluation.rows if row.scored]
    results = [row.results[name] for row in rows]
    correct = np.array([r.emotion == row.truth for r, row in zip(results, rows)], dtype=int)
    return correct, np.array([r.confidence for r in results], dtype=float)


def _save(fig, evaluation: Evaluation, path: Path, title: str) -> Path:
    if evaluation.info.synthetic:
        title += f"\n[{SYNTHETIC_TITLE}]"
    fig.suptitle(title, color="crimson" if evaluation.info.synthetic else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
