"""`e2v classify PATH...`: recordings in, emotions out (table, JSON Lines, CSV, alerts).

Exit status (bit flags, so pipelines can test each): 0 all good; 2 bad arguments or no
input; 3 server unreachable (job stopped, rerun with --resume); 4 some files failed
(each has an error row); 8 some file crossed an --alert threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from e2v.contract import GRPC_PORT, MODEL_NAME

EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_FILE_ERRORS, EXIT_ALERT = 2, 3, 4, 8


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
        help="skip files already in --csv/--jsonl and append to them",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--retries", type=int, default=6, help="retries on transient errors")
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
            concurrency=max(1, args.concurrency),
            thresholds=parse_alerts(args.alert),
            retries=args.retries,
        )
        if args.embeddings and args.embeddings.suffix not in (".npy", ".parquet"):
            raise ValueError("--embeddings must end in .npy or .parquet")
        if args.resume and not (args.csv or args.jsonl):
            raise ValueError("--resume needs --csv FILE or --jsonl FILE to know what is done")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    files, missing = expand_paths(args.paths)
    if args.resume:
        from client.output import done_files

        done = done_files(args.csv, args.jsonl)
        skipped = len([f for f in files if f in done])
        files = [f for f in files if f not in done]
        missing = [m for m in missing if m.file not in done]
        print(f"resume: {skipped} file(s) already done, {len(files)} to go", file=sys.stderr)
    return asyncio.run(_run(args, options, files, missing))


async def _run(args, options, files, missing) -> int:
    from client.classify import classify_files
    from client.output import EmbeddingWriter, ResultWriter
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
    if info.synthetic:
        print(
            "note: the served model is SYNTHETIC (random weights): labels are meaningless",
            file=sys.stderr,
        )
    from client.results import by_vote, short_label

    labels = [short_label(label) for label in info.labels if not label.startswith("unuse")]
    writer = ResultWriter(
        labels,
        json_stream=sys.stdout if args.json else None,
        jsonl_path=args.jsonl,
        csv_path=args.csv,
        table=not args.json,
        append=args.resume,
    )
    embeddings = EmbeddingWriter(args.embeddings) if args.embeddings else None
    status = {"errors": 0, "alerts": 0}
    progress = _progress(len(files), args.no_progress)

    def on_result(result) -> None:
        if args.aggregate == "vote":
            result = by_vote(result)
        writer.write(result)
        if embeddings:
            embeddings.add(result)
        status["errors"] += not result.ok
        status["alerts"] += bool(result.alerts)
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
            embeddings.close(append=args.resume)
    if code:
        return code
    if not files and not missing:
        print("nothing to do", file=sys.stderr)
    return (EXIT_FILE_ERRORS if status["errors"] else 0) | (EXIT_ALERT if status["alerts"] else 0)


def _progress(total: int, disabled: bool):
    if disabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)
    bar.audio_s = 0.0
    return bar
