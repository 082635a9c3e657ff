"""What a protocol module gives the session path (connection.py): its wire format,
translated. A `Wire` reads the protocol's messages and writes its answers; everything else
(accept, slot, deadlines, message limits, pacing, the session, events out, finish, close)
is the path's, the same for every protocol.

    class MyWire(Wire):
        name, first, audio = "mine", "hello", "audio"
        async def handshake(self, message): ...  -> Opening | ENDED | None
        async def message(self, message, stream): ...  -> True at the client's end
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from e2v.client.live.errors import LiveError

if TYPE_CHECKING:
    from e2v.client.live.limits import LiveLimits
    from e2v.client.live.services import LiveServices
    from e2v.client.live.session import LiveSession, LiveSettings, StreamFormat
    from e2v.client.live.sockets import Socket

# `Wire.handshake`'s answer when the client ended before any session (AudioHook `close`).
ENDED = object()


@dataclass(frozen=True)
class Opening:
    """A session to open: what the protocol's first message asked for. `probe`: a
    connection check (AudioHook's null conversation) that gets no session and no events."""

    call_id: str | None
    fmt: StreamFormat
    settings: LiveSettings
    probe: bool = False


class AudioStream(Protocol):
    """The path's side of a started stream, as a protocol's `message` uses it."""

    async def audio(self, data: bytes, channel: int | None = None, paced: bool = True) -> None:
        """Interleaved frames (or one channel's), paced, counted against idle, fed."""

    def pause(self) -> None:
        """No audio expected until `resume` (not idle meanwhile)."""

    def resume(self) -> None: ...


class Wire:
    """One connection's protocol: translation only. Subclasses set the names and override
    the steps they need; the defaults are those of a protocol that says nothing back."""

    name = "live"  # the protocol's label in /metrics
    first = "start"  # the message that opens a session (the handshake bound names it)
    audio = "audio"  # what the idle bound names
    query_key = False  # `?key=` counts (browsers cannot set headers)
    drain_margin_s: float | None = None  # end our own session this long before the drain
    moving = False  # the client's end moves the call to another replica (moves.py)

    def __init__(self, socket: Socket, limits: LiveLimits, services: LiveServices):
        self.socket, self.limits, self.services = socket, limits, services

    def authenticate(self) -> None:
        """After the accept, before a slot is taken: LiveError unless the upgrade may
        proceed (a protocol whose key comes in a message checks it there)."""

    async def handshake(self, message: str | bytes) -> Opening | object | None:
        """A message before the session: the `Opening`, ENDED (the client closed first),
        or None (answered or ignored: read on)."""
        raise NotImplementedError

    async def opened(self, session: LiveSession | None, session_id: str | None) -> None:
        """The session has started (None for a probe): the protocol's answer."""

    async def message(self, message: str | bytes, stream: AudioStream) -> bool:
        """One message of the stream, audio handed to `stream`; True at the client's end
        (stop, close): the session is then finished."""
        raise NotImplementedError

    async def finished(self) -> None:
        """The client ended and its session is finished (finals and summary published)."""

    async def draining(self) -> None:
        """The gateway started draining (only for a protocol with a `drain_margin_s`)."""

    def frame(self, event: dict, text: str) -> str | None:
        """An event (and its JSON) as this protocol's text frame; None: not sent here."""
        return None

    def refusal(self, error: LiveError) -> dict | None:
        """The message that tells the client why, when no session published it."""
        return None

    async def farewell(self, error: LiveError | None) -> None:
        """After the events are flushed, before the close frame (AudioHook's close
        transaction)."""
