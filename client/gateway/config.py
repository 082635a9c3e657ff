"""The gateway's settings, checked once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from e2v.client.live.bus_options import BusSettings
from e2v.client.live.limits import LiveLimits
from e2v.client.secrets import read_secret_file
from e2v.client.targets import parse_target

from e2v.contract import GATEWAY_MAX_UPLOAD_MB, GATEWAY_PORT, MAX_DURATION_S, MODEL_NAME, TRITON_URL

if TYPE_CHECKING:  # server.py needs uvicorn (the gateway extra); config.py must not
    from e2v.client.gateway.server import ConnectionLimits

# Files per request: a form is a handful of recordings, not an archive.
MAX_FILES = 16


@dataclass(frozen=True)
class GatewayConfig:
    triton: str = TRITON_URL  # --url (alias --triton)
    protocol: str = "grpc"
    model: str = MODEL_NAME
    host: str = "127.0.0.1"
    port: int = GATEWAY_PORT
    max_upload_mb: float = GATEWAY_MAX_UPLOAD_MB
    max_duration_s: float = MAX_DURATION_S
    concurrency: int = 0  # requests being uploaded/decoded at once; 0: two per core
    queue: int = -1  # requests waiting for a slot; -1: as many as concurrency
    queue_wait_s: float = 2.0  # longest wait for a slot before 429
    read_timeout_s: float = 30.0  # longest silence while a body arrives (slow clients)
    max_files: int = MAX_FILES
    api_key: bytes | None = None
    spool_dir: str | None = None  # temporary upload files (None: the system's temp dir)
    live: LiveLimits = LiveLimits()  # live sessions (WebSocket), checked by LiveLimits
    max_uploads: int = 64  # bodies being received at once (client/gateway/uploads.py)
    # Connections (client/gateway/server.py): sockets, per client address, deadlines.
    max_connections: int = 1024
    max_connections_per_client: int = 32  # 0: no per-address cap (behind a proxy)
    header_timeout_s: float = 10.0  # request line and headers, from connect or last answer
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    webhook: str | None = None  # live alerts and summaries are POSTed here (client/webhooks.py)
    webhook_secret: bytes | None = None  # their signing secret (--webhook-secret-file)
    # AudioHook client secret (--audiohook-secret-file): upgrades must be signed with it.
    audiohook_secret: bytes | None = None
    # Live calls shared by replicas (--bus: NATS JetStream); default: in process.
    bus: BusSettings = BusSettings()

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"--protocol must be grpc or http, not {self.protocol!r}")
        parse_target(self.triton, self.protocol)  # a TargetError says what --url takes
        if not 0 < self.max_upload_mb <= 100_000:
            raise ValueError(f"--max-upload-mb must be in (0, 100000], not {self.max_upload_mb}")
        if not 0 < self.max_duration_s <= 10 * MAX_DURATION_S:
            raise ValueError(
                f"--max-duration-s must be in (0, {10 * MAX_DURATION_S:g}], "
                f"not {self.max_duration_s}"
            )
        if self.concurrency < 0 or self.queue < -1 or self.max_files < 1:
            raise ValueError("--concurrency, --queue and max files must not be negative")
        if not 0 < self.read_timeout_s <= 3600 or not 0 <= self.queue_wait_s <= 600:
            raise ValueError("--read-timeout-s must be in (0, 3600] and the queue wait <= 600 s")
        if self.max_uploads < 1:
            raise ValueError(f"--max-uploads must be >= 1, not {self.max_uploads}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key file is empty")
        if self.spool_dir is not None and not os.access(self.spool_dir, os.W_OK | os.X_OK):
            raise ValueError(f"--spool-dir {self.spool_dir} is not a writable directory")
        if (self.webhook is None) != (self.webhook_secret is None):
            raise ValueError("--webhook and --webhook-secret-file go together (always signed)")
        if self.webhook is not None:
            from e2v.client.webhooks import validate_url

            validate_url(self.webhook)

    @property
    def connection_limits(self) -> ConnectionLimits:
        """The connection guard's settings (ValueError when out of range)."""
        from e2v.client.gateway.server import ConnectionLimits

        return ConnectionLimits(
            self.max_connections,
            self.max_connections_per_client,
            self.header_timeout_s,
            self.keep_alive_s,
        )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def slots(self) -> int:
        """Requests processed at once (uploading, decoding, waiting for Triton)."""
        return self.concurrency or 2 * (os.cpu_count() or 1)

    @property
    def queue_size(self) -> int:
        return self.slots if self.queue < 0 else self.queue


def read_api_key(path: Path) -> bytes:
    """The key in `path` (surrounding whitespace removed); ValueError with a one-line reason."""
    return read_secret_file(path, "--api-key-file")


def read_audiohook_secret(path: Path) -> bytes:
    """The AudioHook client secret in `path`: base64, as Genesys shows it and the reference
    client takes it (`--client-secret`); ValueError with a one-line reason."""
    import base64
    import binascii

    try:
        text = read_api_key(path)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--api-key-file", "--audiohook-secret-file")) from None
    try:
        secret = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError(f"--audiohook-secret-file {path} must hold base64") from None
    if not secret:
        raise ValueError(f"--audiohook-secret-file {path} holds an empty secret")
    return secret
