"""`e2v evaluate DATA`: accuracy, thresholds and aggregation on your own labelled recordings.

DATA is a CSV or JSON Lines manifest with `path,label` columns (paths relative to the
manifest; other columns such as `speaker` are kept), or a folder with one sub-folder per
label. Labels match the model's case-insensitively (`angry`, `生气/angry`); `--map`
renames others. Every (segmentation, aggregation) pair given is scored on the same files:
the default compares the whole file (VAD, mean) with 3-second windows (vote and mean).
A `party` or `channel` column (or --channels split / --parties) scores each channel of a
stereo call as its own party: a row's label is that party's; --group-by party reports
per party.

Exit status, as `e2v classify`: 0 all good; 2 bad arguments or an unusable data set;
3 server unreachable; 4 some files failed (each is listed in the report).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from e2v.client.arguments import add_request_arguments, add_triton_arguments
from e2v.client.parties import add_arguments as add_party_arguments

from e2v.contract import (
    AGGREGATIONS,
    BOOTSTRAP_RESAMPLES,
    EXIT_FILE_ERRORS,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    MAX_BOOTSTRAP_RESAMPLES,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="accuracy on labelled recordings: WA/UA/F1, thresholds, calibration, aggregation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="manifest (.csv/.jsonl) or label folders")
    add_triton_arguments(parser)
    parser.add_argument(
        "--segment",
        default="vad,fixed:3",
        help="segmentations to compare, comma-separated: vad | fixed:SECONDS | none "
        "(the first is the report's main one)",
    )
    parser.add_argument(
        "--aggregate",
        choices=(*AGGREGATIONS, "both"),
        default="both",
        help="file label from segments: duration-weighted mean, majority vote, or both",
    )
    parser.add_argument("--map", metavar="SRC=DST,...", help="rename data labels, anger=angry")
    parser.add_argument(
        "--labels",
        metavar="LABEL,...",
        help="score among these of the model's labels only (probabilities renormalised): "
        "angry,happy,neutral,sad is EmoBox's 4-class protocol",
    )
    parser.add_argument(
        "--group-by",
        metavar="COLUMN",
        help="metrics per value of a column (e.g. party, with a per-party manifest)",
    )
    add_party_arguments(parser)
    parser.add_argument(
        "--report", type=Path, metavar="DIR", help="write the report here (else: summary only)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES, help="resamples (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_request_arguments(parser)
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from e2v.client.evaluation.dataset import DatasetError, group_column, read_labelled
    from e2v.client.evaluation.labels import parse_map
    from e2v.client.evaluation.run import parse_methods
    from e2v.client.parties import manifest_parties

    try:
        methods = parse_methods(args.segment, args.aggregate)
        mapping = parse_map(args.map)
        if not 0 <= args.bootstrap <= MAX_BOOTSTRAP_RESAMPLES:
            raise ValueError(f"--bootstrap must be between 0 and {MAX_BOOTSTRAP_RESAMPLES}")
        if args.report is not None and args.report.exists() and not args.report.is_dir():
            raise ValueError(f"--report {args.report} exists and is not a directory")
        dataset = read_labelled(args.data)
        group_by = group_column(dataset, args.group_by)
        args.party_names = manifest_parties(args, dataset.columns)
    except (ValueError, DatasetError) as exc:
        return _usage_error(exc)
    for warning in dataset.warnings:
        _say(f"warning: {warning}")
    return asyncio.run(_run(args, dataset, methods, mapping, group_by))


async def _run(args, dataset, methods, mapping, group_by) -> int:
    from e2v.client.classify import JobOptions
    from e2v.client.evaluation.labels import LabelError, LabelMatcher
    from e2v.client.evaluation.run import evaluate
    from e2v.client.results import short_label
    from e2v.client.triton import ServerUnavailable, TritonEmotionClient

    options = JobOptions(
        url=args.url,
        protocol=args.protocol,
        model=args.model,
        concurrency=max(1, args.concurrency),
        retries=args.retries,
        parties=args.party_names,
    )
    client = TritonEmotionClient(args.url, args.protocol, args.model, retries=args.retries)
    try:
        info = await client.connect()
        if info.synthetic:
            _say("note: the served model is SYNTHETIC (random weights): results are meaningless")
        if not info.labels:
            raise LabelError(f"model '{info.name}' has no classifier head (embeddings only)")
        keep = _restriction(args.labels, info.labels)
        if keep is not None:
            options = dataclasses.replace(options, labels=keep)
        model_labels = [x for x in info.labels if keep is None or short_label(x) in keep]
        matcher = LabelMatcher(model_labels, mapping)
        _check_labels(dataset, matcher)
        evaluation = await evaluate(
            dataset, client, matcher, methods, options, group_by, args.bootstrap, args.seed, _say
        )
    except ServerUnavailable as exc:
        _say(f"error: {exc}\nno report written")
        return EXIT_UNAVAILABLE
    except LabelError as exc:
        return _usage_error(exc)
    finally:
        await client.close()
    return _finish(evaluation, args.report)


def _restriction(text, labels):
    from e2v.client.evaluation.labels import LabelError
    from e2v.client.results import resolve_labels

    try:
        return resolve_labels(text, labels)
    except ValueError as exc:
        raise LabelError(str(exc)) from None


def _check_labels(dataset, matcher) -> None:
    from e2v.client.evaluation.labels import LabelError

    labelled = [item for item in dataset.items if item.error is None]
    unknown = sorted({item.label for item in labelled if matcher(item.label) is None})
    if labelled and len(unknown) == len({item.label for item in labelled}):
        raise LabelError(
            f"none of the data's labels ({', '.join(unknown[:10])}) is one of the model's "
            f"({', '.join(matcher.labels)}); use --map SRC=DST,..."
        )
    if unknown:
        _say(
            f"warning: labels the model lacks, left out of the metrics: {', '.join(unknown)} "
            "(--map SRC=DST renames them)"
        )


def _finish(evaluation, report_dir: Path | None) -> int:
    from e2v.client.evaluation.report import write_report

    print(summary(evaluation), flush=True)
    if report_dir is not None:
        write_report(evaluation, report_dir)
        _say(f"report: {report_dir / 'report.md'}")
    failed = evaluation.failed
    for row in failed[:20]:
        _say(f"failed: row {row.item.row}: {row.error}")
    if len(failed) > 20:
        _say(f"... and {len(failed) - 20} more failed rows (see predictions.csv)")
    return EXIT_FILE_ERRORS if failed else 0


def summary(evaluation) -> str:
    """The comparison table as plain text, for the terminal."""
    rows = evaluation.rows
    lines = []
    if evaluation.info.synthetic:
        lines.append("SYNTHETIC MODEL (random weights): every number and label is meaningless")
    if evaluation.metrics[evaluation.primary.name] is None:
        lines.append("no row could be scored")
    else:
        lines.append(f"{'method':<16} {'files':>5}  {'WA':<22} {'UA':<22} {'macro F1':<22}")
    for method in evaluation.methods:
        m = evaluation.metrics[method.name]
        if m is None:
            continue
        cells = [_ci(m[k]) for k in ("wa", "ua", "macro_f1")]
        lines.append(f"{method.name:<16} {m['files']:>5}  " + " ".join(f"{c:<22}" for c in cells))
    scored = sum(row.scored for row in rows)
    excluded = sum(row.excluded is not None for row in rows)
    lines.append(
        f"{len(rows)} rows: {scored} scored, {len(evaluation.failed)} failed, {excluded} left out"
    )
    return "\n".join(lines)


def _ci(metric: dict) -> str:
    text = f"{metric['value'] * 100:.1f}%"
    if metric["ci"] is not None:
        text += f" [{metric['ci'][0] * 100:.1f}, {metric['ci'][1] * 100:.1f}]"
    return text


def _usage_error(exc: Exception) -> int:
    _say(f"error: {exc}")
    return EXIT_USAGE


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
