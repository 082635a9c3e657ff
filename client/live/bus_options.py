"""`e2v gateway`'s bus flags: `add_bus_arguments(parser)`, `bus_settings(args)` (checked,
kept in the gateway's config), then `make_bus(settings, ...)` when the app is built.

Without `--bus` the gateway keeps its live calls in process (LocalBus): nothing to install,
nothing to run. `--bus nats://HOST:PORT[,...]` shares them through NATS JetStream; the
credentials come from a file, TLS from a `tls://` URL (and `--bus-ca-file` for a private CA).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from e2v.client.live.bus import BUFFER_BYTES, BUFFER_EVENTS, Bus, EventBuffer, LocalBus

from e2v.contract import (
    BUS_CALLS_BUCKET,
    BUS_CLAIM_TTL_S,
    BUS_EVENTS_PER_CALL,
    BUS_EVENTS_STREAM,
    BUS_MAX_AGE_S,
    BUS_MAX_BYTES,
    BUS_WEBHOOK_CONSUMER,
)

if TYPE_CHECKING:
    from e2v.client.live.bus_metrics import BusMetrics
    from e2v.client.live.nats_bus import NatsOptions
    from e2v.client.webhooks import WebhookSender

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # streams, buckets and consumers alike
CLAIM_TTL_RANGE_S = (2.0, 300.0)
_INSTALL = "pip install './[bus]' in the clone (nats-py)"


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "live calls across replicas (docs/deploy.md, 'Live calls across replicas')"
    )
    group.add_argument(
        "--bus",
        metavar="URL",
        help="NATS JetStream server(s), nats://HOST:PORT[,nats://HOST2:PORT] (tls:// for TLS): "
        "live events, the call registry and webhooks are shared by every replica. "
        "Default: in process, this gateway's calls only",
    )
    group.add_argument(
        "--bus-creds-file",
        type=Path,
        metavar="FILE",
        help="NATS credentials: a .creds file (user JWT and seed) or an NKey user seed",
    )
    group.add_argument(
        "--bus-ca-file", type=Path, metavar="FILE", help="CA bundle that signed the server's TLS"
    )
    for flag, default, what in (
        ("--bus-stream", BUS_EVENTS_STREAM, "JetStream stream of the events"),
        ("--bus-calls-bucket", BUS_CALLS_BUCKET, "KV bucket of the call registry"),
        ("--bus-webhook-consumer", BUS_WEBHOOK_CONSUMER, "durable consumer of the webhooks"),
    ):
        group.add_argument(flag, default=default, metavar="NAME", help=f"{what} (%(default)s)")
    group.add_argument(
        "--bus-max-age-s",
        type=float,
        default=BUS_MAX_AGE_S,
        help="events are kept this long for replays and late subscribers (%(default)g)",
    )
    group.add_argument(
        "--bus-max-bytes",
        type=int,
        default=BUS_MAX_BYTES,
        help="the stream's size; the oldest events leave first (%(default)d)",
    )
    group.add_argument(
        "--bus-events-per-call",
        type=int,
        default=BUS_EVENTS_PER_CALL,
        help="events kept per call and event type (%(default)d)",
    )
    group.add_argument(
        "--bus-claim-ttl-s",
        type=float,
        default=BUS_CLAIM_TTL_S,
        help="a call's claim expires this long after its replica stopped renewing it; "
        "subscribers of a dead replica's calls get replica_lost by then (%(default)g)",
    )
    group.add_argument(
        "--bus-webhook-ack-wait-s",
        type=float,
        default=30.0,
        help="a webhook a replica took and stopped working on goes to another after (%(default)g)",
    )
    group.add_argument(
        "--bus-replicas",
        type=int,
        default=1,
        choices=(1, 3, 5),
        help="JetStream replicas of the stream and bucket: 3 on a NATS cluster (%(default)d)",
    )
    group.add_argument(
        "--bus-buffer-events",
        type=int,
        default=BUFFER_EVENTS,
        help="events held while the bus is unreachable; past it interims go first (%(default)d)",
    )
    group.add_argument(
        "--bus-buffer-bytes", type=int, default=BUFFER_BYTES, help="...and bytes (%(default)d)"
    )


def nats_options(args: argparse.Namespace) -> NatsOptions | None:
    """The checked NATS options, or None without --bus; ValueError with a one-line reason."""
    if args.bus is None:
        for flag in ("bus_creds_file", "bus_ca_file"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --bus")
        return None
    try:
        from e2v.client.live.nats_bus import NatsOptions, credentials, parse_servers
    except ImportError:
        raise ValueError(f"--bus needs nats-py: {_INSTALL}") from None
    for flag in ("bus_stream", "bus_calls_bucket", "bus_webhook_consumer"):
        if not NAME.fullmatch(getattr(args, flag)):
            raise ValueError(f"--{flag.replace('_', '-')} must match {NAME.pattern}")
    low, high = CLAIM_TTL_RANGE_S
    if not low <= args.bus_claim_ttl_s <= high:
        raise ValueError(f"--bus-claim-ttl-s must be within {low:g}-{high:g} s")
    positive = ("bus_max_age_s", "bus_max_bytes", "bus_events_per_call", "bus_webhook_ack_wait_s")
    for flag in (*positive, "bus_buffer_events", "bus_buffer_bytes"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if args.bus_creds_file is not None:
        credentials(args.bus_creds_file)  # readable and of a known kind, or ValueError
    if args.bus_ca_file is not None and not args.bus_ca_file.is_file():
        raise ValueError(f"--bus-ca-file {args.bus_ca_file} is not a file")
    return NatsOptions(
        servers=parse_servers(args.bus),
        creds_file=args.bus_creds_file,
        ca_file=args.bus_ca_file,
        stream=args.bus_stream,
        bucket=args.bus_calls_bucket,
        webhook_consumer=args.bus_webhook_consumer,
        max_age_s=args.bus_max_age_s,
        max_bytes=args.bus_max_bytes,
        events_per_call=args.bus_events_per_call,
        claim_ttl_s=args.bus_claim_ttl_s,
        webhook_ack_wait_s=args.bus_webhook_ack_wait_s,
        replicas=args.bus_replicas,
    )


@dataclass(frozen=True)
class BusSettings:
    """The bus the flags ask for: NATS (`nats`) or in process (None), and the bounds of
    the local buffer of events waiting for it."""

    nats: NatsOptions | None = None
    buffer_events: int = BUFFER_EVENTS
    buffer_bytes: int = BUFFER_BYTES


def bus_settings(args: argparse.Namespace) -> BusSettings:
    """The checked settings of the --bus* flags; ValueError with a one-line reason."""
    return BusSettings(nats_options(args), args.bus_buffer_events, args.bus_buffer_bytes)


def make_bus(
    settings: BusSettings,
    *,
    webhook: WebhookSender | None = None,
    metrics: BusMetrics | None = None,
) -> Bus:
    """The bus of `settings` (the live hub starts and stops it)."""
    buffer = EventBuffer(settings.buffer_events, settings.buffer_bytes)
    if settings.nats is None:
        return LocalBus(webhook=webhook, metrics=metrics, buffer=buffer)
    from e2v.client.live.nats_bus import NatsBus

    return NatsBus(settings.nats, webhook=webhook, metrics=metrics, buffer=buffer)
