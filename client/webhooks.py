"""Signed webhooks: JSON POSTs of live alerts and summaries, and of `e2v classify` files that
crossed an --alert threshold.

Each delivery is signed with HMAC-SHA256 over f"{timestamp}.{body}" and the signature sent
as `X-E2V-Signature: t=TIMESTAMP,v1=HEX` (contract WEBHOOK_SIGNATURE_HEADER); receivers
check it with `verify` and may drop duplicates by `X-E2V-Webhook-Id`, which every retry of
a delivery repeats. Deliveries are retried on connection errors, timeouts, 408, 425, 429
and 5xx with doubling backoff capped at `backoff_cap_s` (Retry-After is honoured up to the
cap); other statuses fail at once; redirects are not followed.

`post` never blocks: it queues the body (bounded in deliveries and bytes) and returns; a
full queue drops the delivery and counts it. The counters `delivered`, `failed` and
`dropped` are what /metrics exports. aiohttp is the client: the project already depends on
it for https:// inputs (fsspec's HTTP filesystem), it is asyncio-native with per-request
timeouts and a pooled connector, so the gateway and classify need no second HTTP stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from e2v.client.secrets import read_secret_file

from e2v.contract import EVENT_FILE_ALERT, WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER

if TYPE_CHECKING:  # an optional dependency (the webhooks extra), imported when started
    import aiohttp

log = logging.getLogger("e2v.webhooks")

WEBHOOK_QUEUE = 1000  # deliveries waiting...
WEBHOOK_QUEUE_BYTES = 16 << 20  # ...and their bodies' bytes, in flight included
WEBHOOK_RETRIES = 6
WEBHOOK_TIMEOUT_S = 5.0  # per attempt, connect to response
WEBHOOK_WORKERS = 4  # deliveries in flight: one slow receiver response holds one of them
BACKOFF_S = 0.5  # first retry delay; doubles, capped at BACKOFF_CAP_S
BACKOFF_CAP_S = 10.0
DRAIN_S = 10.0  # how long `e2v classify` waits for queued webhooks at exit
SIGNATURE_TOLERANCE_S = 300
MAX_BODY_BYTES = 1 << 20
MAX_URL_CHARS = 2048
MIN_SECRET_BYTES = 16
MAX_HEADER_CHARS = 1024
_RETRIED = frozenset({408, 425, 429})
_INSTALL = "pip install './[webhooks]' in the clone"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp` (Unix seconds)."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def verify(
    secret: bytes,
    header: str | None,
    body: bytes,
    tolerance_s: int = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether `header` signs `body` with `secret` and its timestamp is within `tolerance_s`
    of `now` (replays of old deliveries fail). Several v1= values may be given (rotation)."""
    if not header or len(header) > MAX_HEADER_CHARS:
        return False
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for key, _, value in fields if key == "t"]
    signatures = [value for key, _, value in fields if key == "v1"]
    if len(stamps) != 1 or not re.fullmatch(r"[0-9]{1,12}", stamps[0]) or not signatures:
        return False
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, body).encode()
    return any(hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in signatures)


def _digest(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def validate_url(url: str) -> str:
    """`url` if it is a plain http(s) URL without credentials; ValueError otherwise. Any host
    is allowed, loopback included: the operator chooses the receiver."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"--webhook URL is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ValueError("--webhook is not a valid URL") from None
    if "@" in parts.netloc:
        # Never echo it: the URL holds a password.
        raise ValueError(
            "--webhook must not carry credentials (user:password@): deliveries are "
            "authenticated by their signature (--webhook-secret-file)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--webhook must be an http:// or https:// URL with a host, not {url!r}")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("--webhook URL must not contain spaces or control characters")
    return url


def read_secret(path: Path) -> bytes:
    """The signing secret in `path`, read like the gateway's --api-key-file, at least
    MIN_SECRET_BYTES long; ValueError with a one-line reason."""
    return read_secret_file(path, "--webhook-secret-file", "secret", MIN_SECRET_BYTES)


def webhook_options(url: str | None, secret_file: Path | None) -> tuple[str, bytes] | None:
    """The checked `--webhook URL --webhook-secret-file FILE` pair, or None without them."""
    if url is None and secret_file is None:
        return None
    if url is None:
        raise ValueError("--webhook-secret-file needs --webhook URL")
    if secret_file is None:
        raise ValueError("--webhook needs --webhook-secret-file FILE: webhooks are always signed")
    url = validate_url(url)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ValueError(f"--webhook needs aiohttp: {_INSTALL}") from None
    return url, read_secret(secret_file)


def file_alert(row: Mapping) -> dict:
    """`e2v classify --webhook` body for one finished file with alerts: its --json row
    without the segments (a long call has hundreds; each alert names its peak's times)."""
    return {"type": EVENT_FILE_ALERT} | {k: v for k, v in row.items() if k != "segments"}


class WebhookSender:
    """Delivers `post`ed payloads to one URL in the background of the running event loop.
    Use it from that loop: `await start()`, `post(...)`, `await stop(drain_s)`."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        queue: int = WEBHOOK_QUEUE,
        retries: int = WEBHOOK_RETRIES,
        timeout_s: float = WEBHOOK_TIMEOUT_S,
        *,
        workers: int = WEBHOOK_WORKERS,
        backoff_s: float = BACKOFF_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        queue_bytes: int = WEBHOOK_QUEUE_BYTES,
    ):
        if not secret:
            raise ValueError("the webhook secret is empty")
        if queue < 1 or retries < 0 or workers < 1 or not timeout_s > 0:
            raise ValueError("webhook queue and workers must be >= 1, retries >= 0, timeout > 0")
        self.url = validate_url(url)
        self.secret = secret
        self.retries, self.timeout_s, self.workers = retries, timeout_s, workers
        self.backoff_s, self.backoff_cap_s = backoff_s, backoff_cap_s
        self.delivered = self.failed = self.dropped = 0
        self.queue_bytes, self.queued_bytes = queue_bytes, 0
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue)
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._open = False

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.workers),
            headers={"User-Agent": "e2v-webhooks"},
        )
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        self._open = True

    def post(self, payload: Mapping, body: bytes | None = None) -> bool:
        """Queue `payload` as one delivery; False (counted as dropped) when the queue is full,
        the sender is not running, or the payload is not JSON or over MAX_BODY_BYTES.
        `body`: the payload's JSON already made (live events are serialised once)."""
        if body is not None and len(body) > MAX_BODY_BYTES:
            body = None
        elif body is None and self._open:
            body = self._encode(payload)
        body = body if self._open else None
        if body is None:
            self._drop("sender not running" if not self._open else "not JSON or too large")
            return False
        if self.queued_bytes + len(body) > self.queue_bytes or self._queue.full():
            self._drop(f"queue full ({self._queue.qsize()} deliveries, {self.queued_bytes} bytes)")
            return False
        self._queue.put_nowait((uuid.uuid4().hex, body))
        self.queued_bytes += len(body)
        return True

    async def send(self, delivery_id: str, body: bytes) -> str | None:
        """Deliver `body` now (after `start`), signed, with the retries a posted delivery gets,
        under `delivery_id` (the bus's event id: the same on each redelivery, so receivers
        drop duplicates); counted like them. None once delivered, else why it failed."""
        error = await self._deliver(delivery_id, body)
        self._count(error, delivery_id)
        return error

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop taking deliveries, wait up to `drain_s` for the queued ones, then give up on
        the rest: still queued counts as dropped, interrupted in flight as failed."""
        self._open = False
        if self._tasks and drain_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.join(), drain_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        left = self._queue.qsize()
        while not self._queue.empty():
            self.queued_bytes -= len(self._queue.get_nowait()[1])
            self._queue.task_done()
        if left:
            self.dropped += left
            log.warning("webhooks: %d still queued after the %g s drain, dropped", left, drain_s)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _encode(self, payload: Mapping) -> bytes | None:
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            return None
        data = body.encode()
        return data if len(data) <= MAX_BODY_BYTES else None

    def _drop(self, why: str) -> None:
        self.dropped += 1
        # The first drop and then every 100th: a dead receiver must not flood the log.
        if self.dropped % 100 == 1:
            log.warning("webhook dropped (%s); %d dropped so far", why, self.dropped)

    async def _work(self) -> None:
        while True:
            delivery_id, body = await self._queue.get()
            try:
                self._count(await self._deliver(delivery_id, body), delivery_id)
            except asyncio.CancelledError:
                self.failed += 1
                raise
            finally:
                self.queued_bytes -= len(body)
                self._queue.task_done()

    def _count(self, error: str | None, delivery_id: str) -> None:
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        log.warning("webhook %s to %s failed: %s", delivery_id, _origin(self.url), error)

    async def _deliver(self, delivery_id: str, body: bytes) -> str | None:
        """None once delivered, else why it failed (after the retries it deserved)."""
        for attempt in range(self.retries + 1):
            error, retry, retry_after = await self._attempt(delivery_id, body)
            if error is None or not retry or attempt == self.retries:
                return error
            await asyncio.sleep(self.backoff(attempt, retry_after))
        return error

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry `attempt + 1`: doubling from backoff_s, capped."""
        delay = self.backoff_s * 2**attempt
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_cap_s)

    async def _attempt(
        self, delivery_id: str, body: bytes
    ) -> tuple[str | None, bool, float | None]:
        """(error or None, whether to retry, the receiver's Retry-After in seconds)."""
        import aiohttp

        headers = {
            "Content-Type": "application/json",
            WEBHOOK_SIGNATURE_HEADER: sign(self.secret, int(time.time()), body),
            WEBHOOK_ID_HEADER: delivery_id,
        }
        session = self._session
        assert session is not None, "start() opens the session before any delivery"
        try:
            async with session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status, retry_after = response.status, response.headers.get("Retry-After")
        except asyncio.TimeoutError:
            return f"no response in {self.timeout_s:g} s", True, None
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}", True, None
        if 200 <= status < 300:
            return None, False, None
        return f"HTTP {status}", status in _RETRIED or status >= 500, _seconds(retry_after)


def _seconds(value: str | None) -> float | None:
    """A Retry-After in seconds (the HTTP-date form is ignored: the backoff applies)."""
    if value is None or not re.fullmatch(r"[0-9]{1,6}", value.strip()):
        return None
    return float(value.strip())


def _origin(url: str) -> str:
    """scheme://host:port of `url`: logs name the receiver, not its path or query (tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
