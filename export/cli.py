"""`e2v export` and `e2v bench export` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from e2v.export.repository import PRECISIONS, TARGETS, default_options

from e2v.contract import MODEL_NAME


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export an emotion2vec checkpoint into a Triton model repository",
        description="Export a checkpoint (local FunASR directory, hub name such as "
        "iic/emotion2vec_plus_large, or synthetic:tiny|base|large) to ONNX/TorchScript "
        "inside a Triton model repository.",
    )
    parser.add_argument("--model", required=True, metavar="SOURCE", help="checkpoint source")
    parser.add_argument("--repo", type=Path, default=Path("build/model_repository"))
    parser.add_argument("--name", default=MODEL_NAME, help="model name in the repository")
    parser.add_argument("--target", default="cpu", help=f"one of: {', '.join(TARGETS)}")
    parser.add_argument("--max-batch-size", type=int, help="override the target's default")
    parser.add_argument("--instances", type=int, help="instance count (default 1)")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        help="cpu target: ONNX Runtime threads per instance (default 0 = all visible cores; "
        "set it to the container's CPU limit)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        help=f"torch target: one of {', '.join(PRECISIONS)} (fp16/bf16 through torch.autocast; "
        "their difference from fp32 goes into the model card)",
    )
    parser.add_argument("--no-parity", action="store_true", help="skip the FunASR parity check")
    parser.set_defaults(func=run_export)


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """`e2v bench export`."""
    bench_export = bench_sub.add_parser(
        "export", help="FunASR one-at-a-time vs exported ONNX in ONNX Runtime"
    )
    bench_export.add_argument("--model", default="synthetic:base", metavar="SOURCE")
    bench_export.add_argument("--repo", type=Path, help="record the figures in this model's card")
    bench_export.add_argument("--name", default=MODEL_NAME)
    bench_export.add_argument("--clips", type=int, default=24)
    bench_export.add_argument("--batch-size", type=int, default=8)
    bench_export.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads for each method: torch (FunASR's ncpu) and ONNX Runtime intra-op "
        "(default: one per core)",
    )
    bench_export.set_defaults(func=run_bench)


def run_export(args: argparse.Namespace) -> int:
    from e2v.export.exporter import ExportError, export_model

    if args.target not in TARGETS:
        print(
            f"error: unknown target '{args.target}'; choose one of {', '.join(TARGETS)}",
            file=sys.stderr,
        )
        return 2
    options = default_options(args.target)
    if args.max_batch_size:
        sizes = tuple(s for s in options.preferred_batch_sizes if s <= args.max_batch_size)
        options = replace(
            options,
            max_batch_size=args.max_batch_size,
            preferred_batch_sizes=sizes or (args.max_batch_size,),
        )
    if args.instances:
        options = replace(options, instance_count=args.instances)
    if args.intra_op_threads is not None:
        options = replace(options, intra_op_threads=args.intra_op_threads)
    options = replace(options, precision=args.precision)
    try:
        model_dir = export_model(
            args.model,
            args.repo,
            args.name,
            args.target,
            options,
            check_parity=not args.no_parity,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    card = json.loads((model_dir / "model_card.json").read_text())
    print(f"exported {args.model} -> {model_dir} (target {args.target})")
    if card["ignored_keys_count"]:
        print(
            f"ignored {card['ignored_keys_count']} checkpoint keys used only in pre-training "
            f"(decoder, EMA), e.g. {', '.join(card['ignored_keys_sample'][:3])}"
        )
    if card["unexpected_keys"]:
        print(
            f"warning: checkpoint keys the model does not have were ignored: "
            f"{', '.join(card['unexpected_keys'][:5])}",
            file=sys.stderr,
        )
    if card["synthetic"]:
        print("note: SYNTHETIC model (random weights): its predictions are meaningless")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from e2v.export.bench import run_benchmark

    return run_benchmark(args)
