"""The `e2v loadtest` command being run: its progress lines and, for the report, its line."""

from __future__ import annotations

import argparse


def log(message: str) -> None:
    print(f"[loadtest] {message}", flush=True)


def command_line(args: argparse.Namespace) -> str:
    """The command, reconstructed from the arguments that matter (for the report)."""
    parts = ["e2v loadtest"]
    for name in (
        "url",
        "protocol",
        "model",
        "repo",
        "configs",
        "profile",
        "users",
        "duration",
        "ramp",
        "step_duration",
        "price_per_hour",
        "device",
    ):
        value = getattr(args, name)
        skip = (name == "device" and value == "cpu") or (name == "step_duration" and not args.ramp)
        if value is not None and not skip:
            parts.append(
                f"--{name.replace('_', '-')} {value:g}"
                if isinstance(value, float)
                else f"--{name.replace('_', '-')} {value}"
            )
    if args.url:
        parts = [p for p in parts if not p.startswith("--model") or args.compare]
    if getattr(args, "live", False):
        parts = [p for p in parts if not p.startswith(("--users", "--profile"))]
        parts += ["--live", f"--channels {args.channels}", f"--frame-ms {args.frame_ms:g}"]
        parts += [f"--calls {args.calls}", f"--call-s {args.call_s:g}"]
        if getattr(args, "bus", False):
            parts += [f"--replicas {args.replicas}", "--bus", f"--rounds {args.rounds}"]
        if getattr(args, "protocols", "live") != "live":
            parts.append(f"--protocols {args.protocols}")
        if getattr(args, "cpu_profile", False):
            parts.append("--cpu-profile")
    if args.gateway:
        parts.append("--gateway")
        if args.gateway_rounds != 2:
            parts.append(f"--gateway-rounds {args.gateway_rounds}")
    return " ".join(parts + (["--compare"] if args.compare else []))
