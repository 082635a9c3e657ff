"""Write an evaluation: report.md, metrics.json, predictions.csv and three figures.

Every manifest row gets one line in predictions.csv (label, prediction, confidence,
scores, why it failed or was left out), so every number in the report can be recomputed
from it. A synthetic model is named on the first line of the report, in metrics.json,
and on every figure.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from e2v.client.evaluation.metrics import CALIBRATION_BINS, CI_LEVEL, THRESHOLDS
from e2v.client.evaluation.run import CONFIDENCE_DIGITS, Evaluation, Row
from e2v.client.names import csv_safe
from e2v.client.results import score_labels

SYNTHETIC_LINE = (
    "> **SYNTHETIC MODEL (seeded random weights): every number and label in this report is "
    "meaningless.** It shows what a report looks like; evaluate a real checkpoint for real "
    "figures."
)
SYNTHETIC_CAVEAT = "_Synthetic model: these labels and numbers are meaningless._"
# Published emotion2vec+ figures (EmoBox 4-class, average UA) and the replaced web app's.
CONTEXT = (
    "For context: emotion2vec+ seed / base / large average 78.0 / 80.0 / 81.4 % UA on the "
    "EmoBox 4-class benchmarks (published); the web app this service replaces reported 80.5 % "
    "accuracy (WA) on 200 labelled calls with 3-second windows and a majority vote. Compare "
    "like with like: same classes, same aggregation."
)
METHOD_NOTES = {
    "vad/mean": "whole file, cut at speech boundaries (VAD), duration-weighted mean of "
    "segment scores (the service's default)",
    "vad/vote": "VAD segments, majority vote (ties: higher mean score)",
    "fixed:3/vote": "3-second windows, majority vote: the replaced web app's rule",
    "fixed:3/mean": "3-second windows, duration-weighted mean",
}
MAX_LISTED = 100  # failed / excluded rows listed in report.md; all are in predictions.csv


def write_report(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    """Write every artefact into `out_dir` (created); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        write_predictions(evaluation, out_dir / "predictions.csv"),
        write_metrics(evaluation, out_dir / "metrics.json"),
    ]
    if evaluation.metrics.get(evaluation.primary.name):
        from e2v.client.evaluation import figures

        written += figures.write_all(evaluation, out_dir)
    written.append(_write_text(out_dir / "report.md", markdown(evaluation)))
    return written


# ---------------------------------------------------------------------------- predictions


def prediction_fields(evaluation: Evaluation) -> list[str]:
    fields = ["row", "path", "file", "label", "label_model", "prediction", "confidence"]
    fields += ["correct"] + [f"score_{label}" for label in _score_labels(evaluation)]
    for method in evaluation.methods[1:]:  # the unprefixed columns are the first method's
        fields += [f"prediction_{method.slug}", f"confidence_{method.slug}"]
    fields += ["excluded", "error", "error_kind", "method"]
    fields += [_extra_name(name, fields) for name in _extra_columns(evaluation)]
    return fields


def write_predictions(evaluation: Evaluation, path: Path) -> Path:
    fields = prediction_fields(evaluation)
    extras = _extra_columns(evaluation)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in evaluation.rows:
            cells = _prediction_cells(evaluation, row)
            cells += [row.item.fields.get(name, "") for name in extras]
            writer.writerow([csv_safe(str(cell)) for cell in cells])
    return path


def _prediction_cells(evaluation: Evaluation, row: Row) -> list:
    primary = row.results.get(evaluation.primary.name)
    item = row.item
    cells = [item.row, item.fields.get("path", ""), item.path, item.label, row.truth or ""]
    cells += [_label(primary), _conf(primary)]
    cells.append("" if not row.scored else int(primary.emotion == row.truth))
    scores = primary.scores if primary is not None and primary.ok else {}
    cells += [_num(scores.get(label)) for label in _score_labels(evaluation)]
    for method in evaluation.methods[1:]:
        result = row.results.get(method.name)
        cells += [_label(result), _conf(result)]
    cells += [row.excluded or "", row.error or "", row.error_kind or ""]
    cells.append(evaluation.primary.name)
    return cells


def _score_labels(evaluation: Evaluation) -> list[str]:
    return score_labels(evaluation.info.labels)


def _extra_columns(evaluation: Evaluation) -> list[str]:
    return [c for c in evaluation.dataset.columns if c not in ("path", "label")]


def _extra_name(name: str, taken: list[str]) -> str:
    return f"manifest_{name}" if name in taken else name


def _label(result) -> str:
    return (result.emotion or "") if result is not None and result.ok else ""


def _conf(result) -> str:
    if result is None or not result.ok or result.confidence is None:
        return ""
    return _num(result.confidence)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.{CONFIDENCE_DIGITS}f}"


# ---------------------------------------------------------------------------- metrics.json


def metrics_document(evaluation: Evaluation) -> dict:
    info, dataset = evaluation.info, evaluation.dataset
    doc: dict = {"synthetic": info.synthetic}
    if info.synthetic:
        doc["note"] = "synthetic model: random weights, labels and numbers meaningless"
    doc |= {
        "model": info.name,
        "labels": evaluation.labels,
        "data": {
            "source": str(dataset.source),
            "kind": dataset.kind,
            "rows": len(evaluation.rows),
            "scored": sum(row.scored for row in evaluation.rows),
            "failed": len(evaluation.failed),
            "excluded": sum(row.excluded is not None for row in evaluation.rows),
            "unknown_labels": unknown_labels(evaluation),
            "warnings": dataset.warnings,
        },
        "settings": {
            "methods": [m.name for m in evaluation.methods],
            "primary": evaluation.primary.name,
            "bootstrap": {
                "resamples": evaluation.settings["bootstrap"],
                "seed": evaluation.settings["seed"],
                "kind": "stratified by true label, percentile interval",
                "level": CI_LEVEL,
            },
            "thresholds": list(THRESHOLDS),
            "calibration_bins": CALIBRATION_BINS,
            "group_by": evaluation.settings["group_by"],
        },
        "methods": evaluation.metrics,
        "groups": evaluation.groups,
        "failures": [_row_ref(row) | {"error": row.error} for row in evaluation.failed],
        "excluded": [
            _row_ref(row) | {"reason": row.excluded}
            for row in evaluation.rows
            if row.excluded is not None
        ],
    }
    return doc


def write_metrics(evaluation: Evaluation, path: Path) -> Path:
    text = json.dumps(_finite(metrics_document(evaluation)), indent=2, ensure_ascii=False)
    return _write_text(path, text + "\n")


def unknown_labels(evaluation: Evaluation) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in evaluation.rows:
        if row.truth is None and row.item.label and row.error is None:
            counts[row.item.label] = counts.get(row.item.label, 0) + 1
    return counts


def _row_ref(row: Row) -> dict:
    return {"row": row.item.row, "path": row.item.fields.get("path", row.item.path)}


def _finite(value):
    """JSON has no NaN: undefined values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------- report.md


def markdown(evaluation: Evaluation) -> str:
    doc = metrics_document(evaluation)
    lines = [SYNTHETIC_LINE, ""] if evaluation.info.synthetic else []
    lines += [f"# Is it accurate on {_md(Path(doc['data']['source']).name)}?", ""]
    lines += _overview(evaluation, doc)
    primary = evaluation.metrics.get(evaluation.primary.name)
    if primary is None:
        lines += ["", "**No row could be scored**: see the failed and excluded rows below.", ""]
    else:
        lines += _headline(evaluation)
        lines += _per_class(evaluation, primary)
        lines += _confusion(evaluation, primary)
        lines += _thresholds(evaluation, primary)
        lines += _calibration(evaluation, primary)
        if evaluation.groups is not None:
            lines += _groups(evaluation)
    lines += _problems(evaluation, doc)
    return "\n".join(lines).rstrip() + "\n"


def _overview(evaluation: Evaluation, doc: dict) -> list[str]:
    data, boot = doc["data"], doc["settings"]["bootstrap"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Model `{evaluation.info.name}`, labels: {', '.join(evaluation.labels)}. {when}.",
        "",
        f"{data['rows']} manifest rows: **{data['scored']} scored**, {data['failed']} failed, "
        f"{data['excluded']} left out (listed at the end).",
    ]
    if boot["resamples"]:
        lines += [
            "",
            f"Intervals: {CI_LEVEL:.0%} percentile intervals of {boot['resamples']} "
            f"bootstrap resamples stratified by true label, seed {boot['seed']}.",
        ]
    return [*lines, ""]


def _headline(evaluation: Evaluation) -> list[str]:
    lines = [
        "## Aggregation methods compared",
        "",
        "| method | files | WA (accuracy) | UA (mean recall) | macro F1 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method in evaluation.methods:
        m = evaluation.metrics[method.name]
        cells = [_ci(m["wa"]), _ci(m["ua"]), _ci(m["macro_f1"])]
        lines.append(f"| `{method.name}` | {m['files']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [
        f"- `{m.name}`: {METHOD_NOTES[m.name]}"
        for m in evaluation.methods
        if m.name in METHOD_NOTES
    ]
    lines += ["", CONTEXT, ""]
    return lines


def _per_class(evaluation: Evaluation, metrics: dict) -> list[str]:
    lines = [
        f"## Per class (`{evaluation.primary.name}`)",
        "",
        "| label | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, m in metrics["per_class"].items():
        cells = [_ci(m["precision"]), _ci(m["recall"]), _ci(m["f1"]), str(m["support"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, "", *_caveat(evaluation)]


def _confusion(evaluation: Evaluation, metrics: dict) -> list[str]:
    matrix = metrics["confusion"]
    labels = matrix["labels"]
    lines = [
        f"## Confusion matrix (`{evaluation.primary.name}`)",
        "",
        "Rows: true label, columns: predicted; count (share of the row).",
        "",
        "| true \\ predicted | " + " | ".join(labels) + " |",
        "| --- |" + " ---: |" * len(labels),
    ]
    for label, counts, shares in zip(labels, matrix["counts"], matrix["normalized"]):
        cells = [f"{c} ({s:.0%})" if c else "0" for c, s in zip(counts, shares)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    return lines


def _thresholds(evaluation: Evaluation, metrics: dict) -> list[str]:
    lines = [
        f"## Confidence thresholds (`{evaluation.primary.name}`)",
        "",
        "Coverage: share of files whose confidence is >= t; accuracy: on those files.",
        "",
        "| t | files | coverage | accuracy |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in metrics["thresholds"]:
        lines.append(
            f"| {r['threshold']:.1f} | {r['files']} | {_pct(r['coverage'])} | "
            f"{_pct(r['accuracy'])} |"
        )
    lines += [
        "",
        'Per predicted label: "flag L when its confidence >= t". Coverage: share of the L '
        "predictions flagged; precision and recall of the flags. Labels never predicted are "
        "left out.",
        "",
        "| label | t | flagged | coverage | precision | recall |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows in metrics["label_thresholds"].items():
        if not any(c[label] for c in _predicted_counts(metrics)):
            continue  # never predicted: nothing to flag
        for r in rows:
            lines.append(
                f"| {label} | {r['threshold']:.1f} | {r['flagged']} | {_pct(r['coverage'])} | "
                f"{_pct(r['precision'])} | {_pct(r['recall'])} |"
            )
    lines += ["", *_caveat(evaluation), "![thresholds](thresholds.png)", ""]
    return lines


def _predicted_counts(metrics: dict) -> list[dict[str, int]]:
    """Rows of the confusion matrix as {predicted label: count}."""
    labels = metrics["confusion"]["labels"]
    return [dict(zip(labels, row)) for row in metrics["confusion"]["counts"]]


def _calibration(evaluation: Evaluation, metrics: dict) -> list[str]:
    ece = metrics["calibration"]["ece"]
    return [
        f"## Calibration (`{evaluation.primary.name}`)",
        "",
        f"Expected calibration error (top label, {CALIBRATION_BINS} equal-width bins): "
        f"**{_pct(ece)}**. 0 means a confidence of p is right p of the time.",
        "",
        "![reliability diagram](reliability.png)",
        "",
    ]


def _groups(evaluation: Evaluation) -> list[str]:
    column = evaluation.settings["group_by"]
    header = " | ".join(f"t={t:.1f} cov / acc" for t in THRESHOLDS)
    lines = [
        f"## By {_md(column)} (`{evaluation.primary.name}`)",
        "",
        f"| {_md(column)} | files | WA | UA | macro F1 | {header} |",
        "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(THRESHOLDS),
    ]
    for value, m in evaluation.groups.items():
        cells = [str(m["files"]), _ci(m["wa"]), _ci(m["ua"]), _ci(m["macro_f1"])]
        cells += [f"{_pct(r['coverage'])} / {_pct(r['accuracy'])}" for r in m["thresholds"]]
        lines.append(f"| {_md(value) or '(empty)'} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _problems(evaluation: Evaluation, doc: dict) -> list[str]:
    lines: list[str] = []
    unknown = doc["data"]["unknown_labels"]
    if unknown:
        listed = ", ".join(f"`{_md(k)}` ({v})" for k, v in unknown.items())
        lines += [
            "## Labels the model lacks",
            "",
            f"Left out of the metrics: {listed}. Map them with "
            "`--map SRC=DST,...` if they mean one of the model's labels.",
            "",
        ]
    failed = evaluation.failed
    if failed:
        lines += [f"## Failed rows ({len(failed)})", "", "| row | path | error |"]
        lines += ["| ---: | --- | --- |"]
        lines += [
            f"| {r.item.row} | {_md(_shown_path(r))} | {_md(r.error)} |"
            for r in failed[:MAX_LISTED]
        ]
        lines += _more(len(failed))
    excluded = [row for row in evaluation.rows if row.excluded is not None]
    if excluded:
        lines += [f"## Left out of the metrics ({len(excluded)})", "", "| row | path | reason |"]
        lines += ["| ---: | --- | --- |"]
        lines += [
            f"| {r.item.row} | {_md(_shown_path(r))} | {_md(r.excluded)} |"
            for r in excluded[:MAX_LISTED]
        ]
        lines += _more(len(excluded))
    if doc["data"]["warnings"]:
        lines += ["## Warnings", "", *[f"- {_md(w)}" for w in doc["data"]["warnings"]], ""]
    return lines


def _more(count: int) -> list[str]:
    extra = count - MAX_LISTED
    return [f"| | ... {extra} more in predictions.csv | |", ""] if extra > 0 else [""]


def _caveat(evaluation: Evaluation) -> list[str]:
    return [SYNTHETIC_CAVEAT, ""] if evaluation.info.synthetic else []


def _shown_path(row: Row) -> str:
    return row.item.fields.get("path") or row.item.path


def _ci(metric: dict) -> str:
    value, ci = metric["value"], metric["ci"]
    text = _pct(value)
    if ci is not None:
        text += f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"
    return text


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value * 100:.1f}%"


def _md(text: str) -> str:
    """A table-safe cell: no pipes, newlines or HTML from file names and labels."""
    return (
        str(text)
        .replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
