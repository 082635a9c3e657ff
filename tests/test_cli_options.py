"""Options that several `e2v` commands share mean the same everywhere (client/arguments.py).

Every command that talks to Triton declares `--url` (alias `--triton`), `--protocol` and
`--model` once, with the contract's defaults; `--json` is a flag printing JSON Lines on
stdout in every command that has it. Checked on the real `e2v` parser, and through the
real CLI against a real tritonserver for the alias.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2v.cli import build_parser
from e2v.contract import (
    MODEL_NAME,
    TRITON_PROTOCOLS,
    TRITON_REQUESTS_IN_FLIGHT,
    TRITON_RETRIES,
    TRITON_URL,
)

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "complaint.mp3"
# Commands that connect to a Triton server, and their required arguments.
TRITON_COMMANDS = {
    ("classify",): ["a.wav"],
    ("evaluate",): ["data.csv"],
    ("train-head",): ["data.csv", "--name", "x", "--repo", "r"],
    ("gateway",): [],
}
# Load tests start their own Triton without --url; their --model is a model source.
OWN_SERVER_COMMANDS = {("loadtest",): [], ("bench", "heads"): []}


def commands(parser: argparse.ArgumentParser, path=()) -> Iterator[tuple[tuple, object]]:
    """(command words, parser) of every `e2v` command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from commands(child, (*path, name))


def option(parser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.fixture(scope="module")
def parsers() -> dict[tuple, argparse.ArgumentParser]:
    return dict(commands(build_parser()))


@pytest.mark.parametrize("command", [*TRITON_COMMANDS, *OWN_SERVER_COMMANDS])
def test_one_triton_connection_definition(parsers, command):
    url = option(parsers[command], "--url")
    assert url.option_strings == ["--url", "--triton"] and url.dest == "url"
    assert url.metavar == "TARGET"
    if command in OWN_SERVER_COMMANDS:
        assert url.default is None and "omitted:" in url.help
        return
    protocol, model = option(parsers[command], "--protocol"), option(parsers[command], "--model")
    assert (url.default, protocol.default, model.default) == (TRITON_URL, "grpc", MODEL_NAME)
    assert tuple(protocol.choices) == TRITON_PROTOCOLS


@pytest.mark.parametrize("command", TRITON_COMMANDS)
def test_every_command_parses_the_same_connection(command):
    words = [*command, *TRITON_COMMANDS[command]]
    parse = build_parser().parse_args
    for flag in ("--url", "--triton"):
        args = parse([*words, flag, "h:1", "--protocol", "http", "--model", "m"])
        assert (args.url, args.protocol, args.model) == ("h:1", "http", "m")
    args = parse(words)
    assert (args.url, args.protocol, args.model) == (TRITON_URL, "grpc", MODEL_NAME)


@pytest.mark.parametrize("command", [("classify",), ("evaluate",), ("train-head",)])
def test_request_options_have_the_contract_defaults(parsers, command):
    parser = parsers[command]
    assert option(parser, "--concurrency").default == TRITON_REQUESTS_IN_FLIGHT
    assert option(parser, "--retries").default == TRITON_RETRIES


def test_json_is_a_stdout_flag_everywhere(parsers):
    """`--json` never takes a value; JSON written into a file has its own option name."""
    found = {}
    for command, parser in parsers.items():
        action = option(parser, "--json")
        if action is not None:
            found[command] = action
            assert action.nargs == 0 and action.const is True, command
            assert action.help.startswith("JSON Lines on stdout"), command
    assert set(found) == {("classify",), ("live",)}
    for bench in (("bench", "client"), ("bench", "heads")):
        assert option(parsers[bench], "--json-file").metavar == "FILE"


def test_the_triton_alias_through_the_real_cli(tiny_server):
    """`e2v classify --triton` is `--url` (the gateway's name for it stays)."""
    rows = {}
    for flag in ("--url", "--triton"):
        done = subprocess.run(
            [sys.executable, "-m", "e2v", "classify", "--no-progress", "--json"]
            + [flag, tiny_server.config.grpc_url, str(SAMPLE)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        rows[flag] = json.loads(done.stdout)
    assert rows["--url"]["emotion"] and rows["--url"]["file"] == rows["--triton"]["file"]
    assert rows["--url"]["scores"] == pytest.approx(rows["--triton"]["scores"], abs=1e-6)
