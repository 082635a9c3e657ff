"""`e2v classify PATH|URI...`: recordings in, emotions out (table, JSON Lines, CSV, Parquet).

Inputs are files, directories, globs and URIs (s3://, gs://, az://, https://), or a list
of them (--from-list); --shard K/N takes a stable share of them. Outputs go to local
files or URIs; a DEST ending in "/" gets the shard's part (part-00007-of-00016.jsonl).
--webhook URL posts each file that crossed --alert as it finishes, signed with the
--webhook-secret-file secret (docs/live.md, "Alerts and webhooks"); a slow or failing
receiver never changes the exit status and delays the exit by at most 10 s.
--channels split (or --parties customer,agent) analyses each channel of a call as its
own party: JSON gets a `parties` list and `conversation` figures, CSV / Parquet one row
per (file, party); --alert customer:angry=0.7 watches one party, angry=0.7 every party.

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
from collections import Counter
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from e2v.client.arguments import add_json_argument, add_request_arguments, add_triton_arguments
from e2v.client.parties import add_arguments as add_party_arguments

from e2v.contract import (
    AGGREGATIONS,
    EXIT_ALERT,
    EXIT_FILE_ERRORS,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    MAX_DURATION_S,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify recordings with a running Triton server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="files, directories, globs, URIs")
    parser.add_argument("--from-list", metavar="FILE", help="one path or URI per line")
    parser.add_argument("--shard", metavar="K/N", help="only shard K of N (0-based), by name hash")
    add_triton_arguments(parser)
    parser.add_argument("--segment", default="vad", help="vad | fixed:SECONDS | none")
    parser.add_argument(
        "--aggregate",
        choices=AGGREGATIONS,
        default="mean",
        help="file label: duration-weighted mean of segment scores, or majority vote",
    )
    add_json_argument(parser, "one result per input")
    parser.add_argument("--jsonl", metavar="DEST", help="JSON Lines into a file, URI or DIR/")
    parser.add_argument("--csv", metavar="DEST", help="one row per file into a file, URI or DIR/")
    parser.add_argument("--parquet", metavar="DEST", help="the CSV's columns as Parquet chunks")
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=500,
        help="rows per committed chunk of a URI or Parquet output (also every 30 s)",
    )
    parser.add_argument(
        "--alert",
        metavar="[PARTY:]LABEL=P,...",
        help="e.g. angry=0.7,sad=0.8; with --channels split, customer:angry=0.7 is one "
        "party's (a bare LABEL=P is every party's)",
    )
    add_party_arguments(parser)
    parser.add_argument(
        "--webhook",
        metavar="URL",
        help="POST each finished file that crossed --alert here, signed (never delays the "
        "job: at most 10 s at exit for deliveries still queued)",
    )
    parser.add_argument(
        "--webhook-secret-file", type=Path, metavar="FILE", help="the webhook signing secret"
    )
    parser.add_argument(
        "--labels",
        metavar="LABEL,...",
        help="answer among these of the model's labels only (probabilities renormalised), "
        "e.g. angry,happy,neutral,sad",
    )
    parser.add_argument("--embeddings", type=Path, metavar="FILE", help=".npy or .parquet")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip files already in the outputs (retrying server-side errors) and append",
    )
    add_request_arguments(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes decoding and segmenting files (one per core of the pod: "
        "threads alone do not scale on short files, see README)",
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
    from e2v.client.batch.shards import Shard, parse_shard
    from e2v.client.options import classify_request
    from e2v.client.webhooks import webhook_options

    try:
        request = classify_request(
            url=args.url,
            protocol=args.protocol,
            model=args.model,
            segment=args.segment,
            channels=args.channels,
            parties=args.parties,
            alert=args.alert,
            labels=args.labels,
            aggregate=args.aggregate,
            concurrency=args.concurrency,
            retries=args.retries,
            max_duration_s=args.max_duration_s,
            processes=args.workers,
        )
        shard = parse_shard(args.shard) if args.shard else Shard()
        outputs = _outputs(args, shard)
        if args.chunk_rows < 1:
            raise ValueError(f"--chunk-rows must be >= 1, not {args.chunk_rows}")
        if not args.paths and not args.from_list:
            raise ValueError("nothing to classify: give PATHs or --from-list FILE")
        if args.embeddings and args.embeddings.suffix not in (".npy", ".parquet"):
            raise ValueError("--embeddings must end in .npy or .parquet")
        if args.resume and not outputs:
            raise ValueError("--resume needs --csv, --jsonl or --parquet to know what is done")
        webhook = webhook_options(args.webhook, args.webhook_secret_file)
        if webhook and not args.alert:
            raise ValueError("--webhook posts the files that cross --alert: give --alert too")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_run(args, request, shard, outputs, webhook))


def _outputs(args: argparse.Namespace, shard) -> list:
    """The --jsonl/--csv/--parquet destinations; DEST/ gets this shard's part name."""
    from e2v.client.batch.output import Output

    outputs = []
    for fmt in ("jsonl", "csv", "parquet"):
        dest = getattr(args, fmt)
        if dest is None:
            continue
        if dest.endswith("/"):
            dest = f"{dest}{shard.label}.{fmt}"
        elif args.shard:
            raise ValueError(f"--{fmt} {dest}: with --shard, give a DEST ending in / (a prefix)")
        outputs.append(Output(dest, fmt))
    return outputs


async def _run(args, request, shard, outputs, webhook=None) -> int:
    from e2v.client.batch.output import EmbeddingWriter, OutputError, ResultWriter, previous_results
    from e2v.client.batch.workers import classify_in_processes
    from e2v.client.classify import classify_files
    from e2v.client.inputs import InputError
    from e2v.client.triton import ServerUnavailable, TritonEmotionClient
    from e2v.client.webhooks import file_alert

    options = request.job
    client = TritonEmotionClient(
        options.url, options.protocol, options.model, retries=options.retries
    )
    try:
        info = await client.connect()
    except ServerUnavailable as exc:
        await client.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    writer = embeddings = None
    done = {}
    try:
        options, labels = request.resolve(info)
        split = options.parties is not None
        if args.resume:
            done = previous_results(outputs, labels=labels, split=split)
        writer = ResultWriter(
            labels,
            outputs,
            json_stream=sys.stdout if args.json else None,
            table=not args.json,
            append=args.resume,
            chunk_rows=args.chunk_rows,
            split=split,
        )
        if args.embeddings:
            embeddings = EmbeddingWriter(
                args.embeddings, info.embed_dim, resume=args.resume, split=split
            )
            if args.resume:
                embeddings.drop_incomplete_last(done)
    except (ValueError, OutputError, InputError) as exc:
        await client.close()
        for output in (writer, embeddings):
            if output is not None:
                output.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    plan = _Plan(args, shard, done, embeddings)
    if info.synthetic:
        print(
            "note: the served model is SYNTHETIC (random weights): labels are meaningless",
            file=sys.stderr,
        )
    status = {"errors": 0, "alerts": 0}
    progress = _progress(args.no_progress)
    sender = await _webhook_sender(webhook)

    def on_result(result) -> None:
        result = request.finish(result)
        if result.file not in plan.embeddings_only:
            writer.write(result)
            status["errors"] += not result.ok
            status["alerts"] += bool(result.alerts)
            if sender and result.ok and result.alerts:
                sender.post(file_alert(_without_segments(result.to_json())))
        if embeddings:
            embeddings.add(result)
        if progress:
            progress.update(1)

    def on_audio(seconds: float) -> None:
        if progress:
            progress.audio_s += seconds
            progress.set_postfix_str(f"{progress.audio_s / 3600:.2f} h audio", refresh=False)

    code = 0
    worker_requests: Counter = Counter()
    try:
        if options.processes > 1:
            await classify_in_processes(
                plan.items(), client, options, on_result, on_audio, worker_requests
            )
        else:
            await classify_files(plan.items(), client, options, on_result, on_audio)
    except ServerUnavailable as exc:
        print(
            f"\nerror: {exc}\n{writer.results} row(s) written; rerun with --resume to finish.",
            file=sys.stderr,
        )
        code = EXIT_UNAVAILABLE
    except InputError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    finally:
        await client.close()
        _report_requests(client, client.replica_requests() + worker_requests)
        if sender:
            await _stop_webhooks(sender)
        if progress:
            progress.close()
        writer.close()
        if embeddings:
            embeddings.close()
    plan.report()
    if code:
        return code
    return (EXIT_FILE_ERRORS if status["errors"] else 0) | (EXIT_ALERT if status["alerts"] else 0)


class _Plan:
    """What this run does: the inputs, streamed, of this shard, not yet done, once each."""

    def __init__(self, args, shard, done, embeddings):
        self.args, self.shard, self.done, self.embeddings = args, shard, done, embeddings
        self.embeddings_only: set[str] = set()
        self.skipped = self.todo = 0
        self._seen: set[bytes] = set()

    def items(self) -> Iterator:
        from e2v.client.inputs import iter_inputs, read_list
        from e2v.client.names import display_name
        from e2v.client.results import FileResult

        listed = read_list(self.args.from_list) if self.args.from_list else ()
        for item in iter_inputs(chain(self.args.paths, listed)):
            name = item.file if isinstance(item, FileResult) else display_name(item)
            if name not in self.shard or not self._first(name):
                continue
            finished = self.done.get(name)
            if finished is not None and finished.final:
                if not (self.embeddings and finished.segments and not self.embeddings.has(name)):
                    self.skipped += 1
                    continue
                self.embeddings_only.add(name)
            self.todo += 1
            yield item

    def _first(self, name: str) -> bool:
        import hashlib

        key = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=10).digest()
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def report(self) -> None:
        if self.args.resume:
            extra = f" ({len(self.embeddings_only)} for their embeddings only)"
            print(
                f"resume: {self.skipped} file(s) already done, {self.todo} to go"
                + (extra if self.embeddings_only else ""),
                file=sys.stderr,
            )
        elif not self.todo:
            print("nothing to do", file=sys.stderr)


async def _webhook_sender(webhook: tuple[str, bytes] | None):
    if webhook is None:
        return None
    from e2v.client.webhooks import WebhookSender

    sender = WebhookSender(*webhook)
    await sender.start()
    return sender


async def _stop_webhooks(sender) -> None:
    """A bounded drain: a slow or dead receiver costs the job at most DRAIN_S at exit, and
    never its exit status (the counts are reported)."""
    from e2v.client.webhooks import DRAIN_S

    await sender.stop(DRAIN_S)
    print(
        f"webhooks: {sender.delivered} delivered, {sender.failed} failed, {sender.dropped} dropped",
        file=sys.stderr,
    )


def _report_requests(client, requests: Counter) -> None:
    """The job's Triton requests per replica, when --url names several (stderr)."""
    if client.target.fleet and requests:
        parts = ", ".join(f"{replica} {n}" for replica, n in sorted(requests.items()))
        print(f"triton requests per replica: {parts}", file=sys.stderr)


def _without_segments(row: dict) -> dict:
    """A split row's parties without their segments (file_alert drops the file's)."""
    if "parties" in row:
        row["parties"] = [{k: v for k, v in p.items() if k != "segments"} for p in row["parties"]]
    return row


def _progress(disabled: bool):
    if disabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(unit="file", file=sys.stderr, dynamic_ncols=True)
    bar.audio_s = 0.0
    return bar
