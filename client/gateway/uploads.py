"""Request bodies in, spooled uploads out: every limit enforced while the bytes arrive.

A body is read from the ASGI channel piece by piece. The size cap is checked on each
piece (a declared Content-Length over the cap is refused before reading anything), a
silent client times out, and a trickling one (slowloris) must keep up a minimum average
rate. At most `--max-uploads` bodies arrive at once (`UploadPool`); when every place is
taken, the slowest body under the minimum rate gives way (408), so trickling clients
cannot keep others out; with no such body the newcomer gets 429. Multipart bodies are
parsed as they stream (python-multipart's push parser) with bounded parts and part
headers. Each file goes to an anonymous temporary file that holds the first MiB in memory
and the rest on disk without a name, so nothing an upload wrote can outlive its request,
even when the process is killed.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from e2v.client.gateway.errors import (
    BAD_REQUEST,
    BUSY,
    READ_TIMEOUT,
    TOO_LARGE,
    UNAVAILABLE,
    UNSUPPORTED_MEDIA,
    GatewayError,
)
from e2v.client.names import display_name

# Uploads up to this size stay in memory; larger ones continue in an unnamed disk file.
SPOOL_MEMORY_BYTES = 1 << 20
# After the first read timeout, a body must average at least this rate (slowloris guard).
MIN_UPLOAD_BYTES_PER_S = 16 * 1024
# A body this young is never pushed out of the pool (its rate is not known yet).
EVICT_AFTER_S = 1.0
# Per part: at most this many header lines, each at most this long (a filename fits).
MAX_PART_HEADERS = 8
MAX_PART_HEADER_BYTES = 4096
# Raw bodies: what may be audio. Anything else (JSON, text, forms) is refused with 415.
RAW_MEDIA_PREFIXES = ("audio/", "video/")
RAW_MEDIA_TYPES = ("application/octet-stream", "application/ogg")
FIELD = "file"

Receive = Callable[[], Awaitable[dict]]


@dataclass
class Upload:
    """One received file: its display-safe `name`, the spooled bytes and their count."""

    name: str
    file: IO[bytes]
    size: int = 0

    def write(self, data: bytes) -> None:
        """Append `data`; 503 (retry later) when the spool directory is full."""
        try:
            self.file.write(data)
        except OSError as exc:
            raise GatewayError(
                503, UNAVAILABLE, f"no room to spool the upload ({exc.strerror}); retry later"
            ) from None
        self.size += len(data)

    def close(self) -> None:
        self.file.close()


@dataclass
class Uploads:
    """The files of one request; `close()` frees them (always, also after failures)."""

    files: list[Upload] = field(default_factory=list)
    received: int = 0  # body bytes read

    def close(self) -> None:
        for upload in self.files:
            upload.close()


class BodyReader:
    """The request body as chunks, within `limit` bytes and the timing rules."""

    def __init__(self, receive: Receive, limit: int, read_timeout_s: float, uploads: Uploads):
        self.receive, self.limit, self.read_timeout_s = receive, limit, read_timeout_s
        self.uploads = uploads
        self.start = time.monotonic()
        self._evicted: asyncio.Future = asyncio.get_running_loop().create_future()

    def rate(self, now: float) -> float:
        """Average body bytes per second so far."""
        return self.uploads.received / max(now - self.start, 1e-3)

    def evict(self, error: GatewayError | None = None) -> None:
        """Give this body's place to another: its next read raises `error` (None: 408)."""
        if not self._evicted.done():
            self._evicted.set_result(error)

    async def chunks(self) -> AsyncIterator[bytes]:
        start = self.start = time.monotonic()
        while True:
            message = await self._next(start)
            if message["type"] == "http.disconnect":
                raise GatewayError(400, BAD_REQUEST, "the client closed the connection mid-body")
            body = message.get("body", b"")
            self.uploads.received += len(body)
            if self.uploads.received > self.limit:
                raise GatewayError(413, TOO_LARGE, too_large_message(self.limit))
            if body:
                yield body
            if not message.get("more_body", False):
                return

    async def _next(self, start: float) -> dict:
        """The next ASGI message, or 408 when the client is silent or too slow."""
        deadline = start + self.read_timeout_s + self.uploads.received / MIN_UPLOAD_BYTES_PER_S
        wait = min(self.read_timeout_s, deadline - time.monotonic())
        if wait > 0 and not self._evicted.done():
            receive = asyncio.ensure_future(self.receive())
            try:
                pending = (receive, self._evicted)
                await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if receive.done():
                    return receive.result()
            finally:
                receive.cancel()  # no-op once done; never left waiting after a timeout
        if self._evicted.done() and self._evicted.result() is not None:
            raise self._evicted.result()
        raise GatewayError(
            408,
            READ_TIMEOUT,
            f"request body too slow: {self.uploads.received} bytes in "
            f"{time.monotonic() - start:.0f} s (at most {self.read_timeout_s:g} s of silence, "
            f"at least {MIN_UPLOAD_BYTES_PER_S // 1024} KiB/s on average"
            + (", required while every upload place is taken)" if self._evicted.done() else ")"),
        )


class UploadPool:
    """At most `size` bodies arriving at once (each holds up to SPOOL_MEMORY_BYTES of
    memory and --max-upload-mb of spool disk), shared fairly between client addresses.

    When every place is taken, a newcomer takes the place of the slowest upload of the
    address holding the most, if that address holds at least two more than the newcomer's
    (429 for the one pushed out); else of the slowest upload under the minimum rate (408);
    else it is refused (429). So trickling senders cannot keep others out unless they come
    from more addresses than there are places."""

    def __init__(self, size: int):
        self.size = size
        self.by_client: dict[str, set[BodyReader]] = {}
        self.count = 0
        self.evicted = 0

    @contextmanager
    def place(self, reader: BodyReader, client: str) -> Iterator[None]:
        if self.count >= self.size:
            self._make_room(client)
        self.by_client.setdefault(client, set()).add(reader)
        self.count += 1
        try:
            yield
        finally:
            self._remove(client, reader)

    def _remove(self, client: str, reader: BodyReader) -> None:
        mine = self.by_client.get(client)
        if mine is None or reader not in mine:
            return
        mine.discard(reader)
        self.count -= 1
        if not mine:
            del self.by_client[client]

    def _make_room(self, client: str) -> None:
        now = time.monotonic()
        fullest = max(self.by_client, key=lambda c: len(self.by_client[c]))
        if len(self.by_client[fullest]) >= len(self.by_client.get(client, ())) + 2:
            victim = min(self.by_client[fullest], key=lambda r: r.rate(now))
            self._push_out(fullest, victim, self._busy("another client's upload took its place"))
            return
        slow = [
            (client, reader)
            for client, readers in self.by_client.items()
            for reader in readers
            if now - reader.start >= EVICT_AFTER_S and reader.rate(now) < MIN_UPLOAD_BYTES_PER_S
        ]
        if not slow:
            raise self._busy("retry later")
        owner, victim = min(slow, key=lambda item: item[1].rate(now))
        self._push_out(owner, victim, None)

    def _push_out(self, client: str, victim: BodyReader, error: GatewayError | None) -> None:
        self._remove(client, victim)
        victim.evict(error)
        self.evicted += 1

    def _busy(self, why: str) -> GatewayError:
        return GatewayError(
            429, BUSY, f"busy: {self.size} uploads arriving (the gateway's --max-uploads); {why}"
        )


def too_large_message(limit: int) -> str:
    return f"upload larger than {limit / 2**20:g} MiB (the gateway's --max-upload-mb)"


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """`multipart/form-data; boundary=x` -> ("multipart/form-data", {"boundary": "x"})."""
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type.encode("latin-1", "replace"))
    return kind.decode("latin-1"), {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in options.items()
    }


def check_media(content_type: str | None) -> tuple[str, dict[str, str]]:
    """The body's media type, or 415 for types that cannot hold audio."""
    kind, options = media_type(content_type or "")
    if kind == "multipart/form-data" or kind.startswith(RAW_MEDIA_PREFIXES):
        return kind, options
    if kind in RAW_MEDIA_TYPES:
        return kind, options
    shown = display_name(kind) or "none"
    raise GatewayError(
        415,
        UNSUPPORTED_MEDIA,
        f"unsupported Content-Type {shown}: send multipart/form-data with field "
        f"'{FIELD}', or a raw body as audio/*, video/* or application/octet-stream",
    )


def new_spool(directory: str | None) -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(SPOOL_MEMORY_BYTES, mode="w+b", dir=directory)


async def read_raw(reader: BodyReader, name: str, spool_dir: str | None) -> None:
    """The whole body is one file called `name`."""
    upload = Upload(name, new_spool(spool_dir))
    reader.uploads.files.append(upload)
    async for chunk in reader.chunks():
        upload.write(chunk)


async def read_multipart(
    reader: BodyReader, boundary: str | None, max_files: int, spool_dir: str | None
) -> None:
    """Every part named `file` becomes an upload; anything else is a 400."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser

    if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
        raise GatewayError(400, BAD_REQUEST, "multipart body without a valid boundary")
    parts = _PartCollector(reader.uploads, max_files, spool_dir)
    try:
        parser = MultipartParser(
            boundary.encode("latin-1"),
            parts.callbacks(),
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        async for chunk in reader.chunks():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise GatewayError(400, BAD_REQUEST, f"malformed multipart body: {exc}") from None
    if not parts.ended:
        raise GatewayError(400, BAD_REQUEST, "incomplete multipart body (no closing boundary)")
    if not reader.uploads.files:
        raise GatewayError(400, BAD_REQUEST, f"no '{FIELD}' field in the multipart body")


class _PartCollector:
    """python-multipart callbacks that spool each `file` part as it streams in."""

    def __init__(self, uploads: Uploads, max_files: int, spool_dir: str | None):
        self.uploads, self.max_files, self.spool_dir = uploads, max_files, spool_dir
        self.parts, self.ended = 0, False
        self.headers: dict[bytes, bytes] = {}
        self.header_field, self.header_value = b"", b""
        self.current: Upload | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field_data,
            "on_header_value": self.header_value_data,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_files:
            raise GatewayError(
                400, BAD_REQUEST, f"too many parts: at most {self.max_files} files per request"
            )
        self.headers, self.current = {}, None

    def header_field_data(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def header_value_data(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.header_field.strip().lower()] = self.header_value.strip()
        self.header_field, self.header_value = b"", b""

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        disposition, options = parse_options_header(self.headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise GatewayError(400, BAD_REQUEST, "multipart part without form-data name")
        if name != FIELD.encode():
            shown = display_name(name.decode("utf-8", "surrogateescape"))
            raise GatewayError(
                400, BAD_REQUEST, f"unexpected form field '{shown}': send audio as '{FIELD}'"
            )
        raw = options.get(b"filename")
        label = display_name(raw.decode("utf-8", "surrogateescape")) if raw else ""
        self.current = Upload(label or "upload", new_spool(self.spool_dir))
        self.uploads.files.append(self.current)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current is not None:
            self.current.write(data[start:end])

    def part_end(self) -> None:
        self.current = None

    def end(self) -> None:
        self.ended = True
