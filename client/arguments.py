"""Command-line options that several commands share: one name and one definition each.

    add_triton_arguments(parser)   # --url (alias --triton), --protocol, --model
    add_request_arguments(parser)  # --concurrency, --retries
    add_json_argument(parser, "one result per input")  # --json: JSON Lines on stdout

Every command that talks to Triton (classify, evaluate, train-head, gateway, the load
tests) declares its connection here, so a flag means the same thing and has the same
default everywhere. `--json` is always a flag that prints JSON Lines on stdout; a command
that writes JSON into a file names that option after the file (`--jsonl DEST`,
`--json-file FILE`).
"""

from __future__ import annotations

import argparse

from e2v.contract import (
    MODEL_NAME,
    TRITON_PROTOCOLS,
    TRITON_REQUESTS_IN_FLIGHT,
    TRITON_RETRIES,
    TRITON_URL,
)

# argparse accepts both parsers and argument groups.
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def add_triton_arguments(parser: Parser, model_help: str = "model name on the server") -> None:
    """`--url/--triton TARGET`, `--protocol grpc|http` and `--model NAME`."""
    add_url_argument(parser)
    add_protocol_argument(parser)
    parser.add_argument("--model", default=MODEL_NAME, help=f"{model_help} (default %(default)s)")


def add_url_argument(parser: Parser, omitted: str | None = None) -> None:
    """`--url TARGET` of Triton (`--triton` is the same option): one server or a fleet
    (client/targets.py). With `omitted`, the option has no default and `omitted` says what
    the command does without it."""
    default = None if omitted else TRITON_URL
    parser.add_argument(
        "--url",
        "--triton",
        dest="url",
        default=default,
        metavar="TARGET",
        help="Triton: HOST:PORT, a replica list (gRPC: IP:PORT,IP:PORT or ipv4:...; HTTP: "
        "HOST:PORT,HOST:PORT) or dns:///NAME:PORT, balanced per request "
        f"({f'omitted: {omitted}' if omitted else 'default %(default)s'})",
    )


def add_protocol_argument(parser: Parser) -> None:
    parser.add_argument(
        "--protocol",
        choices=TRITON_PROTOCOLS,
        default=TRITON_PROTOCOLS[0],
        help="Triton's protocol at --url (default %(default)s)",
    )


def add_request_arguments(parser: Parser) -> None:
    """`--concurrency N` requests in flight and `--retries N` on transient errors."""
    parser.add_argument(
        "--concurrency",
        type=int,
        default=TRITON_REQUESTS_IN_FLIGHT,
        help="requests in flight (default %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=TRITON_RETRIES,
        help="retries on transient errors (default %(default)s: backoff doubles up to 5 s, "
        "about 40 s for a restarting server)",
    )


def add_json_argument(parser: Parser, what: str) -> None:
    """`--json`: JSON Lines on stdout, `what` each line is, instead of the human output."""
    parser.add_argument("--json", action="store_true", help=f"JSON Lines on stdout: {what}")
