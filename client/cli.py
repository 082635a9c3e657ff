"""`e2v classify PATH...`: recordings in, emotions out (table, JSON Lines, CSV, alerts).

Exit status (bit flags, so pipelines can test each): 0 all good; 2 bad arguments, no
input or an output that cannot be written or resumed; 3 server unreachable (job
stopped, rerun with --resume); 4 some files failed (each has an error row); 8 some file
crossed an --alert threshold; 1 an internal error (a bug: the rows written so far are
intact, rerun with --resume).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from e2v.contract import GRPC_PORT, MAX_DURATION_S, MODEL_NAME

EXIT_INTERNAL, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_FILE_ERRORS, EXIT_ALERT = 1, 2, 3, 4, 8


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify recordings with a running Triton server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files, directories, globs")
    parser.add_argument("--url", default=f"localhost:{GRPC_PORT}", help="Triton HOST:PORT")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default=MODEL_NAME, help="model name on the server")
    parser.add_argument("--segment", default="vad", help="vad | fixed:SECONDS | none")
    parser.add_argument(
        "--aggregate",
        choices=("mean", "vote"),
        default="mean",
        help="per-file label: duration-weighted mean of segment scores, or majority vote "
        "of segments (ties: higher mean score)",
    )
    parser.add_argument("--json", action="store_true", help="JSON Lines on stdout")
    parser.add_argument("--jsonl", type=Path, metavar="FILE", help="JSON Lines into FILE")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="one row per file into FILE")
    parser.add_argument("--alert", metavar="LABEL=P,...", help="e.g. angry=0.7,sad=0.8")
    parser.add_argument("--embeddings", type=Path, metavar="FILE", help=".npy or .parquet")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip files already in --csv/--jsonl (retrying server-side errors) and append",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument(
        "--retries",
        type=int,
        default=12,
        help="retries on transient errors (backoff doubles up to 5 s: the default waits "
        "about 40 s for a restarting server)",
    )
    parser.add_argument(
        "--max-duration-s",
        type=float,
        default=MAX_DURATION_S,
        help="longer recordings get a too_long error row",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    from client.classify import JobOptions, expand_paths
    from client.results import parse_alerts
    from client.segment import parse_segment_mode

    try:
        options = JobOptions(
            url=args.url,
            protocol=args.protocol,
            model=args.model,
            segment=parse_segment_mode(args.segment),
            concurrency=args.concurrency,
            thresholds=parse_alerts(args.alert),
            retries=args.retries,
            max_duration_s=args.max_duration_s,
        )
        if args.embeddings and args.embeddings.suffix not in (".npy", ".parquet"):
            raise ValueError("--embeddings must end in .npy or .parquet")
        if args.resume and not (args.csv or args.jsonl):
            raise ValueError("--resume needs --csv FILE or --jsonl FILE to know what is done")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    files, missing = expand_paths(args.paths)
    return asyncio.run(_run(args, options, files, missing))


async def _run(args, options, files, missing) -> int:
    from client.classify import classify_files
    from client.output import EmbeddingWriter, OutputError, ResultWriter, previous_results
    from client.results import by_vote, resolve_alerts, short_label
    from client.triton import ServerUnavailable, TritonEmotionClient

    client = TritonEmotionClient(
        options.url, options.protocol, options.model, retries=options.retries
    )
    try:
        info = await client.connect()
    except ServerUnavailable as exc:
        await client.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    labels = [short_label(label) for label in info.labels if not label.startswith("unuse")]
    writer = embeddings = None
    try:
        thresholds = resolve_alerts(options.thresholds or {}, info.labels)
        options = _with_thresholds(options, thresholds)
        if args.resume:
            done = previous_results(args.csv, args.jsonl, labels=labels)
        writer = ResultWriter(
            labels,
            json_stream=sys.stdout if args.json else None,
            jsonl_path=args.jsonl,
            csv_path=args.csv,
            table=not args.json,
            append=args.resume,
        )
        if args.embeddings:
            embeddings = EmbeddingWriter(args.embeddings, info.embed_dim, resume=args.resume)
            if args.resume:
                embeddings.drop_incomplete_last(done)
    except (ValueError, OutputError) as exc:
        await client.close()
        for output in (writer, embeddings):
            if output is not None:
                output.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    embeddings_only: set[str] = set()
    if args.resume:
        files, missing, embeddings_only = _still_to_do(files, missing, done, embeddings)
    if info.synthetic:
        print(
            "note: the served model is SYNTHETIC (random weights): labels are meaningless",
            file=sys.stderr,
        )
    status = {"errors": 0, "alerts": 0}
    progress = _progress(len(files), args.no_progress)

    def on_result(result) -> None:
        if args.aggregate == "vote":
            result = by_vote(result)
        if result.file not in embeddings_only:
            writer.write(result)
            status["errors"] += not result.ok
            status["alerts"] += bool(result.alerts)
        if embeddings:
            embeddings.add(result)
        if progress:
            progress.update(1)

    def on_audio(seconds: float) -> None:
        if progress:
            progress.audio_s += seconds
            progress.set_postfix_str(f"{progress.audio_s / 3600:.2f} h audio", refresh=False)

    for result in missing:
        on_result(result)
    code = 0
    try:
        if files:
            await classify_files(files, client, options, on_result, on_audio)
    except ServerUnavailable as exc:
        print(
            f"\nerror: {exc}\n{writer.results} row(s) written; rerun with --resume to finish.",
            file=sys.stderr,
        )
        code = EXIT_UNAVAILABLE
    finally:
        await client.close()
        if progress:
            progress.close()
        writer.close()
        if embeddings:
            embeddings.close()
    if code:
        return code
    if not files and not missing:
        print("nothing to do", file=sys.stderr)
    return (EXIT_FILE_ERRORS if status["errors"] else 0) | (EXIT_ALERT if status["alerts"] else 0)


def _still_to_do(files, missing, done, embeddings):
    """(files to classify, error rows to write, files whose embeddings alone are missing)."""
    from client.names import display_name

    todo, embeddings_only, skipped = [], set(), 0
    for path in files:
        name = display_name(path)
        finished = done.get(name)
        if finished is None or not finished.final:
            todo.append(path)
        elif embeddings and finished.segments and not embeddings.has(name):
            todo.append(path)
            embeddings_only.add(name)
        else:
            skipped += 1
    missing = [m for m in missing if m.file not in done or not done[m.file].final]
    print(
        f"resume: {skipped} file(s) already done, {len(todo)} to go"
        + (f" ({len(embeddings_only)} for their embeddings only)" if embeddings_only else ""),
        file=sys.stderr,
    )
    return todo, missing, embeddings_only


def _with_thresholds(options, thresholds):
    from dataclasses import replace

    return replace(options, thresholds=thresholds)


def _progress(total: int, disabled: bool):
    if disabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)
    bar.audio_s = 0.0
    return bar
