"""Placeholder: subcommands registered here once implemented."""


def register(subparsers) -> None:
    return None
