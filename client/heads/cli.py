"""`e2v train-head DATA`: a classifier for your own labels on the served model's embeddings.

DATA is read like `e2v evaluate`'s: a CSV / JSON Lines manifest (`path,label`, other
columns kept; optional `start,end` in seconds give labelled spans of a file) or a folder
with one sub-folder per label. Embeddings come from the served base model through the
classify pipeline and are cached on disk (file SHA-256 + model identity), so training
again never re-encodes. The head is cross-validated (folds grouped by --group-by, else
by file), fitted on every row, checked in ONNX Runtime, and published into --repo as
`head_NAME` plus the ensemble `<model>_NAME`, which `e2v classify --model` serves.

Exit status: 0 done; 2 bad arguments, data or labels; 3 server unreachable (embeddings
made so far are cached: rerun); 4 the head was written but some rows failed (listed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from e2v.client.arguments import add_request_arguments, add_triton_arguments
from e2v.client.parties import add_arguments as add_party_arguments

from e2v.contract import (
    BOOTSTRAP_RESAMPLES,
    EXIT_FILE_ERRORS,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    MAX_BOOTSTRAP_RESAMPLES,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-head",
        help="train a classifier for your own labels on served embeddings, export it to Triton",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="manifest (.csv/.jsonl) or label folders")
    parser.add_argument("--name", required=True, help="head name: serves as <model>_NAME")
    parser.add_argument(
        "--repo", type=Path, required=True, help="the model repository the server loads"
    )
    add_triton_arguments(parser, model_help="the served base model")
    parser.add_argument("--head", choices=("logistic", "mlp"), default="logistic")
    parser.add_argument(
        "--segment",
        default="vad",
        help="vad | fixed:SECONDS | none: how files are cut (classify with the same)",
    )
    parser.add_argument("--cv", type=int, default=5, help="cross-validation folds (>= 2)")
    parser.add_argument(
        "--group-by", metavar="COLUMN", help="keep each value (a speaker) within one fold"
    )
    parser.add_argument("--class-weight", choices=("none", "balanced"), default="none")
    parser.add_argument("--seed", type=int, default=0, help="folds, MLP init and bootstrap")
    parser.add_argument("--map", metavar="SRC=DST,...", help="rename or merge data labels")
    parser.add_argument(
        "--target",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="head backend: cpu (Python backend), gpu (onnxruntime backend); auto: as the "
        "base model",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="embedding cache (default $E2V_CACHE/embeddings or "
        "~/.cache/emotion2vec-triton/embeddings)",
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write it")
    parser.add_argument(
        "--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, help="resamples (0: none)"
    )
    add_request_arguments(parser)
    add_party_arguments(parser)
    parser.set_defaults(func=run_train_head)


def run_train_head(args: argparse.Namespace) -> int:
    from e2v.client.evaluation.dataset import DatasetError, group_column, read_labelled
    from e2v.client.evaluation.labels import parse_map
    from e2v.client.parties import manifest_parties
    from e2v.client.segment import parse_segment_mode
    from e2v.export.heads import HeadExportError, check_name

    try:
        check_name(args.name)
        if "," in args.segment:
            raise ValueError("--segment takes one mode (the one the head will be served with)")
        segment = parse_segment_mode(args.segment)
        mapping = parse_map(args.map)
        if args.cv < 2:
            raise ValueError(f"--cv must be at least 2, not {args.cv}")
        if not 0 <= args.bootstrap <= MAX_BOOTSTRAP_RESAMPLES:
            raise ValueError(f"--bootstrap must be between 0 and {MAX_BOOTSTRAP_RESAMPLES}")
        if args.concurrency < 1 or args.retries < 0:
            raise ValueError("--concurrency must be >= 1 and --retries >= 0")
        _check_writable(args.repo)
        dataset = read_labelled(args.data)
        group_by = group_column(dataset, args.group_by)
        args.party_names = manifest_parties(args, dataset.columns)
    except (ValueError, DatasetError, HeadExportError) as exc:
        return _usage_error(exc)
    for warning in dataset.warnings:
        _say(f"warning: {warning}")
    return asyncio.run(_run(args, dataset, segment, mapping, group_by))


def _check_writable(repo: Path) -> None:
    existing = repo
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--repo {repo} cannot be created or written")


async def _run(args, dataset, segment, mapping, group_by) -> int:
    from e2v.client.classify import JobOptions
    from e2v.client.heads.cache import EmbeddingCache, default_cache_dir
    from e2v.client.heads.embed import embed_rows, plan_rows
    from e2v.client.triton import ServerUnavailable, TritonEmotionClient
    from e2v.export.heads import HeadExportError

    client = TritonEmotionClient(args.url, args.protocol, args.model, retries=args.retries)
    try:
        info = await client.connect()
        base = await _base_model(client)
        _check_repo_base(args.repo, base)
        if info.synthetic:
            _say("note: the served model is SYNTHETIC (random weights): the head is meaningless")
        identity = {
            "name": base.name,
            "version": base.version,
            "checkpoint_sha256": base.checkpoint_sha256,
            "embed_dim": base.embed_dim,
        }
        cache = None
        if not args.no_cache:
            cache = EmbeddingCache(args.cache_dir or default_cache_dir(), identity)
        rows = plan_rows(dataset, mapping, args.party_names)
        options = JobOptions(
            url=args.url,
            protocol=args.protocol,
            model=args.model,
            segment=segment,
            concurrency=args.concurrency,
            retries=args.retries,
            parties=args.party_names,
        )
        _say(f"embedding {sum(r.error is None and r.excluded is None for r in rows)} row(s)")
        try:
            await embed_rows(rows, client, options, cache, _say)
        finally:
            if cache is not None:
                cache.prune()
    except ServerUnavailable as exc:
        _say(f"error: {exc}\nembeddings made so far are cached; rerun to continue")
        return EXIT_UNAVAILABLE
    except HeadExportError as exc:
        return _usage_error(exc)
    finally:
        await client.close()
    if cache is not None:
        _say(
            f"embedding cache {cache.directory}: {cache.hits} hit(s), {cache.misses} miss(es)"
            + (f", {cache.repaired} unreadable entr(ies) recomputed" if cache.repaired else "")
        )
    _say(_rows_summary(rows))
    return _train_and_export(args, dataset, rows, info, base, segment, group_by)


async def _base_model(client):
    """The served base model's config and versions (what the ensemble will chain to)."""
    from e2v.export.heads import BaseModel

    config, metadata = await client.model_config(), await client.model_metadata()
    return BaseModel.from_config(config, list(metadata.get("versions", [])))


def _check_repo_base(repo: Path, base) -> None:
    """The ensemble runs `base.name` from the server that loads --repo: if --repo has that
    model, it must be the one that made the embeddings."""
    from e2v.export.heads import HeadExportError, parse_config

    config_path = repo / base.name / "config.pbtxt"
    if not config_path.is_file():
        _say(
            f"warning: {repo} has no model '{base.name}': the ensemble needs it on the server "
            "that loads this repository"
        )
        return
    try:
        config = parse_config(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise HeadExportError(f"cannot read {config_path}: {exc}") from exc
    sha = config.parameters["checkpoint_sha256"].string_value
    if base.checkpoint_sha256 and sha and sha != base.checkpoint_sha256:
        raise HeadExportError(
            f"{config_path} is another checkpoint ({sha[:12]}...) than the served "
            f"'{base.name}' ({base.checkpoint_sha256[:12]}...): train against the server "
            "that serves --repo"
        )


def _train_and_export(args, dataset, rows, info, base, segment, group_by) -> int:
    import time
    from dataclasses import replace

    from e2v.client.evaluation.cli import summary
    from e2v.client.heads import report, train
    from e2v.export.heads import HeadExportError, check_labels, export_head, from_sklearn

    from e2v.contract import ensemble_model_name

    ensemble = ensemble_model_name(base.name, args.name)
    try:
        data = train.samples(rows, group_by)
        check_labels(data.labels)
        cv = train.cross_validate(data, args.head, args.cv, args.class_weight, args.seed)
    except (train.TrainingError, HeadExportError) as exc:
        _report_rows(rows)
        return _usage_error(exc)
    for note in cv.warnings:
        _say(f"warning: {note}")
    cv_info = replace(info, name=f"{ensemble} (cross-validated)", labels=list(data.labels))
    results = train.row_results(data, cv.probabilities, cv_info)
    by_row = {row.item.row: result for row, result in zip(data.rows, results)}
    evaluation = report.evaluation(
        dataset, rows, by_row, cv_info, data.labels, segment, group_by, args.bootstrap, args.seed
    )
    start = time.perf_counter()
    pipeline = train.fit(args.head, args.class_weight, args.seed, data.x, data.y)
    fit_seconds = time.perf_counter() - start
    weights = from_sklearn(pipeline, args.head)
    target = base.default_target if args.target == "auto" else args.target
    card = _card(args, ensemble, dataset, rows, data, cv, evaluation, base, weights, target)
    card["training"] = {"fit_seconds": round(fit_seconds, 3), "cv_seconds": round(cv.seconds, 3)}
    intro = _intro(args, ensemble, cv, group_by)
    replaced = (args.repo / ensemble).exists()
    try:
        exported = export_head(
            args.repo,
            args.name,
            weights,
            base,
            target,
            str(segment),
            card,
            data.x.astype("float32"),
            lambda directory: report.write_cv_report(evaluation, directory / "cv", intro),
        )
    except HeadExportError as exc:
        return _usage_error(exc)
    print(summary(evaluation), flush=True)
    _say(f"head: {exported.head_dir}  ensemble: {exported.ensemble_dir} (target {target})")
    _say(f"report: {exported.ensemble_dir / 'cv' / 'report.md'}")
    _say(f"classify with: e2v classify FILES --model {ensemble} --segment {segment}")
    if replaced:
        _say(f"replaced {ensemble}: a running server keeps the previous head until restarted")
    else:
        _say(f"an `e2v serve --hot-add` on {args.repo} loads it now; another server at restart")
    failed = _report_rows(rows)
    return EXIT_FILE_ERRORS if failed else 0


def _intro(args, ensemble, cv, group_by) -> list[str]:
    grouped = f"`{group_by}`" if group_by else "file"
    return [
        f"# Cross-validated accuracy of `{ensemble}` ({args.head} head)",
        "",
        f"{cv.folds}-fold cross-validation, stratified by label and grouped by {grouped}: "
        "every row below was predicted by a head trained without its group. A row's label "
        "is the duration-weighted mean (or the vote) of its segments' probabilities, as "
        "`e2v classify` computes it with the served ensemble.",
    ]


def _card(args, ensemble, dataset, rows, data, cv, evaluation, base, weights, target) -> dict:
    from datetime import datetime, timezone

    import numpy as np
    import onnx
    import onnxruntime
    import sklearn

    from e2v.contract import head_model_name

    primary = evaluation.metrics[evaluation.primary.name]
    per_label = {
        label: {
            "rows": sum(row.label == label for row in data.rows),
            "segments": int(np.sum(data.y == label)),
        }
        for label in data.labels
    }
    return {
        "name": ensemble,
        "head_model": head_model_name(args.name),
        "head_kind": args.head,
        "parameters": weights.parameters,
        "labels": list(data.labels),
        "target": target,
        "segment": str(evaluation.primary.segment),
        "synthetic": base.synthetic,
        "base_model": {
            "name": base.name,
            "version": base.version,
            "checkpoint_sha256": base.checkpoint_sha256,
            "source": base.source,
        },
        "data": {
            "source": str(dataset.source),
            "kind": dataset.kind,
            "rows": len(rows),
            "used": len(data.rows),
            "segments": int(len(data.y)),
            "groups": len(set(data.groups.tolist())),
            "failed": sum(row.error is not None for row in rows),
            "excluded": sum(row.excluded is not None for row in rows),
            "per_label": per_label,
        },
        "cross_validation": {
            "folds": cv.folds,
            "grouped_by": f"`{args.group_by}`" if args.group_by else "file",
            "seed": args.seed,
            "class_weight": args.class_weight,
            "method": evaluation.primary.name,
            "metrics": {k: primary[k] for k in ("wa", "ua", "macro_f1")},
            "per_class": primary.get("per_class"),
            "confusion": primary.get("confusion"),
            "notes": cv.warnings,
        },
        "versions": {
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "trained_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _rows_summary(rows) -> str:
    """`48 rows: 40 used, 2 failed, 6 left out (6 x no speech found ...)`."""
    from collections import Counter

    used = sum(row.used for row in rows)
    failed = sum(row.error is not None for row in rows)
    reasons = Counter(row.excluded for row in rows if row.excluded is not None)
    text = f"{len(rows)} rows: {used} used, {failed} failed, {sum(reasons.values())} left out"
    if reasons:
        reason, count = reasons.most_common(1)[0]
        text += f" ({count} x {reason})"
    return text


def _report_rows(rows) -> int:
    failed = [row for row in rows if row.error is not None]
    for row in failed[:20]:
        _say(f"failed: row {row.item.row}: {row.error}")
    if len(failed) > 20:
        _say(f"... and {len(failed) - 20} more failed rows (see cv/predictions.csv)")
    return len(failed)


def _usage_error(exc: Exception) -> int:
    _say(f"error: {exc}")
    return EXIT_USAGE


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
