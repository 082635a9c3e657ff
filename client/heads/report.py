"""The cross-validation report of a head, in `e2v evaluate`'s format and with its code.

Out-of-fold predictions become an `Evaluation` (one row per manifest row, methods
`<segment>/mean` and `<segment>/vote`), so the metrics (UA / WA / macro F1 with bootstrap
intervals, per class, confusion matrix, thresholds, calibration) and the files
(report.md, metrics.json, predictions.csv, figures) are those of `e2v evaluate`.
"""

from __future__ import annotations

from pathlib import Path

from e2v.client.evaluation.dataset import LabelledSet
from e2v.client.evaluation.run import Evaluation, Method, score_method
from e2v.client.evaluation.run import Row as EvalRow
from e2v.client.heads.embed import Row
from e2v.client.results import FileResult, by_vote
from e2v.client.segment import SegmentMode
from e2v.client.triton import ModelInfo


def evaluation(
    dataset: LabelledSet,
    rows: list[Row],
    results: dict[int, FileResult],
    info: ModelInfo,
    labels: list[str],
    segment: SegmentMode,
    group_by: str | None,
    resamples: int,
    seed: int,
) -> Evaluation:
    """`results`: the cross-validated result of each used row, by manifest row number."""
    methods = [Method(segment, "mean"), Method(segment, "vote")]
    eval_rows = []
    for row in rows:
        truth = row.label if row.label in labels else None
        out = EvalRow(row.item, truth, error=row.error, error_kind=row.error_kind)
        result = results.get(row.item.row)
        if row.excluded is not None:
            out.excluded = row.excluded
        elif result is not None:
            out.results = {methods[0].name: result, methods[1].name: by_vote(result)}
        eval_rows.append(out)
    scored = [row for row in eval_rows if row.scored]
    metrics = {m.name: score_method(scored, m, labels, resamples, seed) for m in methods}
    groups = None
    if group_by is not None:
        values = sorted({row.item.fields.get(group_by, "") for row in scored})
        groups = {
            value: score_method(
                [r for r in scored if r.item.fields.get(group_by, "") == value],
                methods[0],
                labels,
                resamples,
                seed,
                full=False,
            )
            for value in values
        }
    settings = {"group_by": group_by, "bootstrap": resamples, "seed": seed}
    return Evaluation(dataset, info, labels, methods, eval_rows, metrics, groups, settings)


def write_cv_report(result: Evaluation, out_dir: Path, intro: list[str]) -> Path:
    """report.md, metrics.json, predictions.csv and figures under `out_dir`."""
    from e2v.client.evaluation import figures
    from e2v.client.evaluation.report import (
        CONTEXT,
        markdown,
        write_metrics,
        write_predictions,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(result, out_dir / "predictions.csv")
    write_metrics(result, out_dir / "metrics.json")
    if result.metrics.get(result.primary.name):
        figures.write_all(result, out_dir)
    lines = markdown(result).replace(CONTEXT + "\n\n", "").splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("# "))
    lines[title : title + 1] = intro
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
