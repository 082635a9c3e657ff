"""`e2v gateway`: the upload API and web page in front of Triton (FastAPI on uvicorn).

    e2v gateway --url 127.0.0.1:8001             # then open http://127.0.0.1:8080/
    curl -F file=@call.wav http://127.0.0.1:8080/predict

Listens on loopback unless --host says otherwise. Needs the `gateway` extra
(pip install './[gateway]' in the clone). Exit status: 0 after SIGTERM/Ctrl-C, 2 for
bad arguments or a missing extra, 1 when the server cannot start (e.g. port taken).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e2v.client.arguments import add_triton_arguments

from e2v.contract import EXIT_USAGE, GATEWAY_MAX_UPLOAD_MB, GATEWAY_PORT, MAX_DURATION_S

GRACEFUL_SHUTDOWN_S = 30


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="HTTP upload API + web page in front of Triton (decoding and VAD here)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_triton_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="listen address (0.0.0.0 exposes it; default loopback)"
    )
    parser.add_argument("--port", type=int, default=GATEWAY_PORT)
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=GATEWAY_MAX_UPLOAD_MB,
        help="largest request body in MiB (413 beyond it, checked while it streams in)",
    )
    parser.add_argument(
        "--max-duration-s",
        type=float,
        default=MAX_DURATION_S,
        help="longest recording in seconds (422 too_long beyond it)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="requests processed at once (default: two per CPU core); more wait in --queue",
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=-1,
        help="requests that may wait up to 2 s for a slot (default: --concurrency); "
        "beyond it: 429 with Retry-After",
    )
    parser.add_argument(
        "--read-timeout-s",
        type=float,
        default=30.0,
        help="longest silence while a body arrives; slower clients get 408",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help="require this key (Authorization: Bearer KEY or X-API-Key) on /predict",
    )
    parser.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="where uploads past 1 MiB continue on disk, as unnamed files that vanish with "
        "the request (default: the temp dir, $TMPDIR)",
    )
    parser.add_argument(
        "--max-uploads",
        type=int,
        default=64,
        help="request bodies received at once; when all are taken, the slowest one under "
        "16 KiB/s gives way (408), else 429",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections; at the cap the oldest one holding no request is closed",
    )
    parser.add_argument(
        "--max-connections-per-client",
        type=int,
        default=32,
        help="open connections per client address (IPv6: per /64); 0: no cap (behind a "
        "proxy every client has the proxy's address)",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=10.0,
        help="request line and headers must arrive within this (408 and close)",
    )
    parser.add_argument(
        "--keep-alive-s",
        type=float,
        default=5.0,
        help="idle keep-alive connections are closed after this",
    )
    parser.add_argument(
        "--webhook",
        metavar="URL",
        help="POST live alerts and call summaries here, signed (queued and retried in the "
        "background: never delays audio)",
    )
    parser.add_argument(
        "--webhook-secret-file", type=Path, metavar="FILE", help="the webhook signing secret"
    )
    parser.add_argument(
        "--audiohook-secret-file",
        type=Path,
        metavar="FILE",
        help="AudioHook client secret (base64): /v1/audiohook upgrades must carry its HTTP "
        "message signature (with --api-key-file, X-API-KEY must match too)",
    )
    add_live_arguments(parser)
    from e2v.client.live.bus_options import add_bus_arguments

    add_bus_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.set_defaults(func=run_gateway)


def run_gateway(args: argparse.Namespace) -> int:
    from e2v.client.gateway.config import GatewayConfig, read_api_key, read_audiohook_secret
    from e2v.client.live.bus_options import bus_settings
    from e2v.client.webhooks import webhook_options

    try:
        webhook, secret = webhook_options(args.webhook, args.webhook_secret_file) or (None, None)
        config = GatewayConfig(
            triton=args.url,
            protocol=args.protocol,
            model=args.model,
            host=args.host,
            port=args.port,
            max_upload_mb=args.max_upload_mb,
            max_duration_s=args.max_duration_s,
            concurrency=args.concurrency,
            queue=args.queue,
            read_timeout_s=args.read_timeout_s,
            api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
            spool_dir=args.spool_dir,
            max_uploads=args.max_uploads,
            max_connections=args.max_connections,
            max_connections_per_client=args.max_connections_per_client,
            header_timeout_s=args.header_timeout_s,
            keep_alive_s=args.keep_alive_s,
            live=live_limits(args),
            webhook=webhook,
            webhook_secret=secret,
            audiohook_secret=read_audiohook_secret(args.audiohook_secret_file)
            if args.audiohook_secret_file
            else None,
            bus=bus_settings(args),
        )
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1-65535, not {args.port}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import uvicorn
        from e2v.client.gateway.app import create_app
        from e2v.client.gateway.server import MAX_HEADER_BYTES, guarded_protocol, raise_file_limit
        from e2v.client.live.shutdown import DrainingServer, websocket_options
    except ImportError as exc:
        print(
            f"error: the gateway needs its extra ({exc.name} is missing): "
            "pip install './[gateway]' in the clone",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        limits = config.connection_limits
        raise_file_limit(limits)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import logging

    logging.basicConfig(format="%(levelname)s:     %(message)s", level=args.log_level.upper())
    app = create_app(config)
    protocol = guarded_protocol(limits)
    app.state.gateway.metrics.bind_connections(protocol.guard, app.state.uploads)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            # Connection caps, header deadline and lingering close (server.py); uvicorn's
            # limit_concurrency is left off: it counts sockets, so idle ones refused everyone.
            http=protocol,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_keep_alive=limits.keep_alive_s,
            loop="asyncio",
            log_level=args.log_level,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            **websocket_options(config.live),
        ),
        app.state.gateway.live,
    )
    server.run()
    return 0 if server.started else 1


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    """The bounds of live sessions (WebSocket; docs/live.md, "Bounds")."""
    from e2v.client.live.limits import LiveLimits

    d = LiveLimits()
    group = parser.add_argument_group("live sessions (/v1/live, /v1/audiohook, /v1/twilio)")
    group.add_argument(
        "--live-sessions",
        type=int,
        default=d.sessions,
        help=f"live sockets at once, handshakes included (default {d.sessions}); "
        "beyond it: close 1013 with a retry hint",
    )
    group.add_argument(
        "--live-handshake-s",
        type=float,
        default=d.handshake_s,
        help=f"the first message within this (default {d.handshake_s:g}; else close 4408)",
    )
    group.add_argument(
        "--live-max-speed",
        type=float,
        default=d.max_speed,
        help=f"audio faster than this times real time, after a {d.burst_s:g} s burst, "
        f"is closed with 4429 (default {d.max_speed:g})",
    )
    group.add_argument(
        "--live-idle-s",
        type=float,
        default=d.idle_s,
        help=f"longest time without audio (default {d.idle_s:g}; else close 4408)",
    )
    group.add_argument(
        "--live-max-duration-s",
        type=float,
        default=d.max_duration_s,
        help=f"longest session (default {d.max_duration_s:g}; then close 4408)",
    )
    group.add_argument(
        "--live-drain-s",
        type=float,
        default=d.drain_s,
        help=f"on SIGTERM, how long live sessions may go on before they are closed with "
        f"1001 (default {d.drain_s:g})",
    )
    group.add_argument(
        "--live-subscribe-wait-s",
        type=float,
        default=d.subscribe_wait_s,
        help="how long an event subscription waits for a call that is not live yet "
        f"(default {d.subscribe_wait_s:g}; then an error event, 4408)",
    )


def live_limits(args: argparse.Namespace):
    from e2v.client.live.limits import LiveLimits

    return LiveLimits(
        sessions=args.live_sessions,
        handshake_s=args.live_handshake_s,
        max_speed=args.live_max_speed,
        idle_s=args.live_idle_s,
        max_duration_s=args.live_max_duration_s,
        drain_s=args.live_drain_s,
        subscribe_wait_s=args.live_subscribe_wait_s,
    )
