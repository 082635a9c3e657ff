"""Connection-level protection for the gateway's HTTP/1.1 server (uvicorn with h11).

uvicorn alone bounds neither how long request headers may take nor how many sockets one
address holds, and its `limit_concurrency` counts sockets, so a few hundred idle sockets
turn every request, /health included, into a 503. `guarded_protocol(limits)` returns a
subclass of uvicorn's `H11Protocol`, passed to uvicorn as its `http` implementation, that
adds three things on the hooks h11 exposes:

- Deadlines. A request's line and headers must be in within `header_timeout_s` of the
  connection opening or of the previous response ending (408, then close). An idle
  keep-alive connection is closed after `keep_alive_s` (uvicorn's own timer). A client
  that stops reading its answer (the send buffer stays full for `send_timeout_s`) is cut.
- Connection caps, total and per client address (IPv6: per /64), apart from the requests at
  work. Admission order guarantees that a new connection is served: at a cap, the oldest
  connection that holds no request (idle, still sending headers, or lingering after an
  answer) is closed to make room. A connection whose whole request head came with it holds
  a request from the start (looked at, not read: a burst of connections accepted before it
  is read cannot push it out). At the total cap with every connection at work, a newcomer
  from an address holding at least two fewer than the address holding the most takes the
  place of that address's newest request (WebSockets excepted), as uploads share their
  places (uploads.py). Otherwise the newcomer is not counted but held apart, among at most
  PROBE_ROOM such (a refused one, else the oldest, gives way), until its request line shows
  what it asks: a probe (GET /health, /ready or /metrics, e2v.contract.GATEWAY_PROBE_PATHS)
  is answered and the connection closed; any other request is refused (503, lingering
  close). So the probes answer whatever the caps hold, also from an address that holds its
  whole share (on one host every client is 127.0.0.1), and a request from an address below
  its cap gets in; one listener, so the probes test the port clients use.
- Lingering close. An answer sent before the request body is in (401, 413, 415, 429, 408)
  carries `Connection: close`; the gateway then shuts its sending side, reads and discards
  the rest of the body (at most LINGER_BYTES, for at most LINGER_S), and closes. Closing at
  once would make the kernel reset the connection, and clients that send the whole body
  before reading (urllib, Java's HttpURLConnection) would see the reset, not the answer.
  A lingering connection holds no request, so it gives way to newcomers like an idle one.

Why a subclass of uvicorn's own protocol rather than another server or a proxy: the
gateway's WebSocket routes run on uvicorn, a proxy is not part of the default install, and
h11 (uvicorn's pure-Python HTTP/1.1 parser) already bounds header bytes
(`h11_max_incomplete_event_size`). WebSocket upgrades pass through unchanged: uvicorn's
websockets protocol takes over the socket, which stays counted until it closes.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import resource
import socket
from collections import Counter, OrderedDict
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from e2v.contract import GATEWAY_PROBE_PATHS

log = logging.getLogger("e2v.gateway")

# After an early answer: bytes of the unread body discarded, and seconds allowed, before
# the connection is closed anyway (nginx: lingering_close, lingering_time).
LINGER_BYTES = 64 << 20
LINGER_S = 10.0
# Request line plus headers: h11 answers 400 beyond it (what one socket can make us buffer).
MAX_HEADER_BYTES = 16 << 10
# File descriptors kept apart from client sockets (spool files, Triton, logs, the listener).
SPARE_FILES = 256
# Connections over a cap held until their request line is in (only a probe is served).
PROBE_ROOM = 64
PROBE_LINES = frozenset(b"GET " + path.encode() for path in GATEWAY_PROBE_PATHS)
# A request line longer than this, on a connection held over a cap, is not a probe's.
MAX_PROBE_LINE = 1024


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024  # open sockets, WebSockets included
    per_client: int = 32  # per client address (0: no cap, e.g. behind a proxy)
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    # An answer the client does not read: its buffer must drain within this, else closed.
    send_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.per_client < 0:
            raise ValueError("--max-connections must be >= 1 and --max-connections-per-client >= 0")
        if not all(0 < t <= 600 for t in (self.header_timeout_s, self.keep_alive_s)):
            raise ValueError("--header-timeout-s and --keep-alive-s must be in (0, 600]")
        if not 0 < self.send_timeout_s <= 3600:
            raise ValueError("the send timeout must be in (0, 3600] seconds")


def client_key(client: tuple[str, int] | None) -> str:
    """The address a per-client cap counts: the IP, or its /64 for IPv6 (one host's share)."""
    host = client[0] if client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    return str(address)


def raise_file_limit(limits: ConnectionLimits) -> None:
    """Raise the soft open-files limit to fit every allowed connection; ValueError if the
    hard limit is too low."""
    needed = limits.max_connections + PROBE_ROOM + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(
                f"--max-connections {limits.max_connections} needs {needed} open files; "
                f"the hard limit is {hard} (ulimit -Hn): lower --max-connections"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class ConnectionGuard:
    """Counts connections, in total and per client; keeps those holding no request in
    age order, so the oldest can be closed when a newcomer needs room."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.count = 0
        self.per_client: Counter[str] = Counter()
        self.members: dict[str, dict[GuardedProtocol, None]] = {}  # counted, in admission order
        self.idle: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.idle_by_client: dict[str, OrderedDict[GuardedProtocol, None]] = {}
        # Over a cap: those waiting for their request line (the oldest gives way), and
        # those whose probe is being answered.
        self.held: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.probing = 0
        # Closed by the guard: to make room, over a cap (not a probe), headers too slow, and
        # answered early; a request at work given up for another address's (total cap).
        self.evicted = self.refused = self.header_timeouts = self.drained = 0
        self.pushed_out = 0
        self.slow_readers = 0  # closed: an answer not read within send_timeout_s

    def admit(self, conn: GuardedProtocol) -> bool:
        """Count `conn`; False when a cap is full of requests at work (`hold` it then)."""
        key, cap = conn.client_key, self.limits.per_client
        if (
            cap and self.per_client[key] >= cap and not self._evict(self.idle_by_client.get(key))
        ) or (
            self.count >= self.limits.max_connections
            and not self._evict(self.idle)
            and not self._push_out_for(key)
        ):
            return False
        self.count += 1
        self.per_client[key] += 1
        self.members.setdefault(key, {})[conn] = None
        self.set_idle(conn)
        return True

    def _push_out_for(self, key: str) -> bool:
        """Total cap, every connection at work: a newcomer whose address holds at least two
        fewer than the address holding the most takes the place of that address's newest
        request at work (as UploadPool shares upload places). WebSockets are never taken."""
        if not self.per_client:
            return False
        fullest = max(self.per_client, key=self.per_client.__getitem__)
        if self.per_client[fullest] < self.per_client[key] + 2:
            return False
        victims = [c for c in self.members.get(fullest, ()) if not c.upgraded]
        if not victims:
            return False
        victims[-1].push_out()  # releases it at once: the newcomer takes its place
        self.pushed_out += 1
        return True

    def hold(self, conn: GuardedProtocol) -> None:
        """Keep `conn` apart, uncounted; when PROBE_ROOM are held, one gives way: the oldest
        refused one (still lingering), else the one waiting longest for its request line."""
        if conn in self.held:
            return
        if len(self.held) >= PROBE_ROOM:
            refused = next((c for c in self.held if c.lingering), None)
            self._evict(OrderedDict({refused: None}) if refused else self.held)
        self.held[conn] = None

    def set_idle(self, conn: GuardedProtocol) -> None:
        self.idle[conn] = None
        self.idle_by_client.setdefault(conn.client_key, OrderedDict())[conn] = None

    def set_busy(self, conn: GuardedProtocol) -> None:
        self.idle.pop(conn, None)
        mine = self.idle_by_client.get(conn.client_key)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.idle_by_client[conn.client_key]

    def release(self, conn: GuardedProtocol) -> None:
        self.set_busy(conn)
        self.count -= 1
        self.per_client[conn.client_key] -= 1
        if self.per_client[conn.client_key] <= 0:
            del self.per_client[conn.client_key]
        mine = self.members.get(conn.client_key, {})
        mine.pop(conn, None)
        if not mine:
            self.members.pop(conn.client_key, None)

    def _evict(self, candidates: OrderedDict | None) -> bool:
        if not candidates:
            return False
        victim = next(iter(candidates))
        victim.evict()  # releases it at once: the newcomer takes its place
        self.evicted += 1
        return True


def _canned(status: int, reason: str, kind: str, message: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer written before (or without) h11: JSON like every refusal."""
    body = json.dumps({"error": message, "error_kind": kind}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


class _Transport:
    """The real transport, except that `close()` lingers when a request body is unread."""

    def __init__(self, raw: asyncio.Transport, protocol: GuardedProtocol):
        self._raw, self._protocol = raw, protocol

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    def close(self) -> None:
        self._protocol.close_or_linger()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._raw.is_closing()


@functools.cache
def _released_on_close(base: type) -> type:
    """`base` (uvicorn's WebSocket protocol) that frees its connection's place on close."""

    class Released(base):
        def __init__(self, *args, release, **kwargs):
            super().__init__(*args, **kwargs)
            self._e2v_release = release

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                self._e2v_release()

    return Released


class GuardedProtocol(H11Protocol):
    """uvicorn's H11Protocol with deadlines, connection caps and lingering close."""

    guard: ConnectionGuard  # set by guarded_protocol(): one per server

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_key = ""
        self.lingering = False
        self._counted = False
        self.held = False  # over a cap: only a probe is served (see the module's docstring)
        self.upgraded = False  # a WebSocket now
        self._line: bytes | None = b""  # a held connection's request line until it is in
        self._probing = False
        self._raw: asyncio.Transport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._linger_left = LINGER_BYTES
        self._partial = False  # bytes of the next request arrived
        self.app = self._closing_early(self.app)
        if self.ws_protocol_class is not None:
            self.ws_protocol_class = functools.partial(
                _released_on_close(self.ws_protocol_class), release=self._release
            )

    # -- connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw, self.transport = transport, _Transport(transport, self)
        self.client_key = client_key(self.client)
        self._counted = self.guard.admit(self)
        self.held = not self._counted
        self._arm_header_timer()
        # What came with the connection, as a prober's request does: looked at, not read,
        # so that a burst of connections accepted before it is read cannot push it out.
        waiting = self._waiting_bytes()
        if self._counted:
            if b"\r\n\r\n" in waiting:  # a whole request head: at work, never evicted
                self.guard.set_busy(self)
        elif b"\r\n" in waiting or len(waiting) > MAX_PROBE_LINE:
            self._line = None
            self._probe_or_refuse(waiting.split(b"\r\n", 1)[0])
        else:
            self.guard.hold(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)
        self._release()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.guard.release(self)
        self.guard.held.pop(self, None)
        if self._probing:
            self._probing = False
            self.guard.probing -= 1

    def shutdown(self) -> None:
        if self.lingering:  # the answer is out: nothing left to finish
            self._raw.close()
        else:
            super().shutdown()

    def push_out(self) -> None:
        """Give this connection's place, request and all, to another address's newcomer."""
        self._release()
        self._cancel_timers()
        self._raw.abort()

    def evict(self) -> None:
        """Make room for a newcomer: this connection holds no request."""
        self._release()
        self._cancel_timers()
        if self._partial and self.conn.their_state is h11.IDLE:
            self._raw.write(HEADER_TIMEOUT)
        self._raw.close()

    # -- reading

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discard(len(data))
            return
        if self.held and self._line is not None:
            data = self._probe_line(data)
            if data is None:
                return
        if self.conn.their_state is h11.IDLE:
            self._partial = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._header_timer.cancel()
            self._header_timer = None
            self._partial = False
            self.guard.set_busy(self)  # a request is at work: never evicted

    def _waiting_bytes(self) -> bytes:
        """The first bytes the client sent, left unread (empty when none came yet)."""
        sock = socket.socket(fileno=self._raw.get_extra_info("socket").fileno())
        try:
            return sock.recv(MAX_HEADER_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return b""
        finally:
            sock.detach()

    def _probe_line(self, data: bytes) -> bytes | None:
        """On a held connection: None until the request line is in, then everything read
        so far if it is a probe's (a refusal otherwise)."""
        self._line += data
        end = self._line.find(b"\r\n")
        if end < 0:
            if len(self._line) > MAX_PROBE_LINE:
                self._line = None
                self._probe_or_refuse(b"")
            return None
        data, self._line = self._line, None
        return data if self._probe_or_refuse(data[:end]) else None

    def _probe_or_refuse(self, line: bytes) -> bool:
        """Serve a probe's request line (True); refuse any other (503, lingering close)."""
        method_and_path = line.split(b"?", 1)[0].rsplit(b" HTTP/", 1)[0]
        if method_and_path in PROBE_LINES and self.guard.probing < PROBE_ROOM:
            self.guard.held.pop(self, None)  # at work now: never closed to make room
            self.guard.probing += 1
            self._probing = True
            return True
        self.guard.refused += 1
        self._cancel_timers()
        self._raw.write(REFUSED)
        self.lingering = True
        if self._raw.can_write_eof():
            self._raw.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self._raw.close)
        self.guard.hold(self)  # the rest of its request is drained, or it gives way
        return False

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        if self.held:  # a probe's path, but not a probe
            self._probe_or_refuse(b"")
            return
        self._cancel_timers()
        self.upgraded = True
        self.guard.set_busy(self)  # counted until the WebSocket closes (see __init__)
        self.transport = self._raw
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY:  # answered early without saying close
            self._unset_keepalive_if_required()
            self.close_or_linger()
        elif self.conn.their_state is h11.IDLE:  # keep-alive: waiting for the next request
            self.guard.set_idle(self)
            self._arm_header_timer()

    # -- deadlines

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.guard.limits.header_timeout_s, self._headers_too_slow
            )

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._raw.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._partial:
            self._raw.write(HEADER_TIMEOUT)
            self.guard.header_timeouts += 1
        self._raw.close()

    def pause_writing(self) -> None:
        """The client is not reading its answer: it gets send_timeout_s to catch up."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(
                self.guard.limits.send_timeout_s, self._reader_too_slow
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _reader_too_slow(self) -> None:
        self._send_timer = None
        self.guard.slow_readers += 1
        self._raw.abort()  # drops the unsent answer; the handler's send returns

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._linger_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._linger_timer = self._send_timer = None
        self._unset_keepalive_if_required()

    # -- lingering close

    def _closing_early(self, app):
        """The ASGI app, adding `Connection: close` to answers sent before the body is in,
        and to a probe's answer on a held connection."""

        async def app_closing_early(scope, receive, send):
            async def send_marked(message):
                if message["type"] == "http.response.start" and (
                    self.held or self.conn.their_state is h11.SEND_BODY
                ):
                    headers = [*message.get("headers", []), (b"connection", b"close")]
                    message = {**message, "headers": headers}
                await send(message)

            await app(scope, receive, send_marked)

        return app_closing_early

    def close_or_linger(self) -> None:
        """Close; but with a request body still arriving, first drain it (bounded)."""
        raw = self._raw
        if self.lingering or raw.is_closing():
            return
        if self.conn.their_state is not h11.SEND_BODY:
            raw.close()
            return
        self.lingering = True
        self.guard.drained += 1
        self.guard.set_idle(self)  # the answer is out: this connection holds no request
        self._cancel_timers()
        if raw.can_write_eof():
            raw.write_eof()  # the client reads the answer, then end of stream
        raw.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, raw.close)

    def _discard(self, size: int) -> None:
        self._linger_left -= size
        if self._linger_left < 0:
            self._raw.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A protocol class for uvicorn.Config(http=...) with its own guard (one per server)."""
    return type("GuardedH11Protocol", (GuardedProtocol,), {"guard": ConnectionGuard(limits)})


REFUSED = _canned(
    503,
    "Service Unavailable",
    "busy",
    "too many connections: every one carries a request; retry later",
    "retry-after: 1\r\n",
)
HEADER_TIMEOUT = _canned(
    408,
    "Request Timeout",
    "read_timeout",
    "request headers too slow (the gateway's --header-timeout-s)",
)
