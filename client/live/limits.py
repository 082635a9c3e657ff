"""The bounds of live sessions (docs/live.md, "Bounds"), set by `e2v gateway`'s flags, and
the rate limit of one stream's audio.

Apart from the hub so the gateway's config can hold them without importing the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from e2v.client.live.errors import LiveError

from e2v.contract import CLOSE_TOO_FAST

# How long a socket being closed may take to flush its events and send the close frame,
# and how long a client gets for its side of a close (AudioHook's close transaction).
CLOSE_WAIT_S = 5.0
# The longest wait for a client to take one message sent outside its event queue (an
# AudioHook `pong`): past it the client is not reading (CLOSE_SLOW_READER).
SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LiveLimits:
    """The bounds of live sessions (docs/live.md, "Bounds"); flags of `e2v gateway`."""

    sessions: int = 200  # --live-sessions: sockets admitted at once (handshakes included)
    handshake_s: float = 10.0  # --live-handshake-s: the first message within this
    max_message_bytes: int = 256 * 1024  # one WebSocket message
    max_speed: float = 2.0  # --live-max-speed: audio seconds per second, sustained...
    burst_s: float = 5.0  # ...after a burst of this many seconds of audio
    idle_s: float = 30.0  # --live-idle-s: longest time without audio
    max_duration_s: float = 4 * 3600.0  # --live-max-duration-s: longest session
    outbox_events: int = 256  # events queued for one socket or subscriber...
    outbox_bytes: int = 1 << 20  # ...and their JSON bytes
    drain_s: float = 30.0  # --live-drain-s: on SIGTERM, how long live sessions may go on
    subscribe_wait_s: float = 30.0  # --live-subscribe-wait-s: for a call not live yet

    def __post_init__(self) -> None:
        checks = {
            "--live-sessions": (self.sessions, 1, 100_000),
            "--live-handshake-s": (self.handshake_s, 0.1, 600),
            "live max message bytes": (self.max_message_bytes, 1024, 16 << 20),
            "--live-max-speed": (self.max_speed, 1.0, 1000),
            "live burst seconds": (self.burst_s, 0.1, 3600),
            "--live-idle-s": (self.idle_s, 0.1, 86_400),
            "--live-max-duration-s": (self.max_duration_s, 1, 7 * 86_400),
            "live outbox events": (self.outbox_events, 1, 1_000_000),
            "live outbox bytes": (self.outbox_bytes, 1024, 1 << 30),
            "--live-drain-s": (self.drain_s, 0, 3600),
            "--live-subscribe-wait-s": (self.subscribe_wait_s, 0.1, 3600),
        }
        for name, (value, low, high) in checks.items():
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], not {value:g}")

    @property
    def frame_limit_bytes(self) -> int:
        """uvicorn's ws_max_size: messages up to this reach the app, which refuses those
        over `max_message_bytes` with an error event; bigger ones the WebSocket layer
        closes with 1009 itself, before buffering them."""
        return 4 * self.max_message_bytes


class AudioPace:
    """Audio faster than real time beyond `max_speed` ends the session (CLOSE_TOO_FAST).

    A token bucket in audio seconds, filled at `max_speed` per second up to `burst_s`;
    each message takes its audio's length. A message is refused once the bucket is empty
    (not when it holds less than the message), so one large message paced in real time is
    never refused: the client may be ahead by the burst plus one message."""

    def __init__(self, max_speed: float, burst_s: float):
        self.rate, self.burst_s = max_speed, burst_s
        self.tokens = burst_s
        self._last = time.monotonic()

    def take(self, audio_s: float) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst_s, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens < 0:
            raise LiveError(
                CLOSE_TOO_FAST,
                "too_fast",
                f"audio arrives faster than {self.rate:g}x real time "
                f"(after a burst of {self.burst_s:g} s); pace it",
            )
        self.tokens -= audio_s
