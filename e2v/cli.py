"""`e2v`: the single command-line entry point. Each subsystem registers its subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from e2v.client.targets import TargetError
from e2v.contract import EXIT_INTERNAL, EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The `e2v` parser with every subcommand registered."""
    from e2v import serve
    from e2v.client.batch import cli as client_cli
    from e2v.client.batch import merge
    from e2v.client.evaluation import cli as evaluate_cli
    from e2v.client.gateway import cli as gateway_cli
    from e2v.client.heads import cli as heads_cli
    from e2v.client.live import player as live_player
    from e2v.export import cli as export_cli
    from e2v.loadtest import cli as loadtest_cli
    from e2v.loadtest import client_bench, heads_bench

    parser = argparse.ArgumentParser(
        prog="e2v", description="emotion2vec speech emotion recognition on Triton."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (
        export_cli,
        serve,
        client_cli,
        merge,
        gateway_cli,
        live_player,
        evaluate_cli,
        heads_cli,
        loadtest_cli,
    ):
        module.register(subparsers)
    bench = subparsers.add_parser("bench", help="benchmarks that print figures")
    benchmarks = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for module in (export_cli, client_bench, heads_bench):
        module.register_bench(benchmarks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `e2v`; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TargetError as exc:  # --url / --triton names no Triton the protocol can reach
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `e2v classify ... --json | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - a bug: one line, documented exit code 1
        if os.environ.get("E2V_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} "
            "(a bug: please report it; E2V_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
