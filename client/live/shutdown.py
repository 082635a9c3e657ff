"""uvicorn with a drain of live sessions before it stops (SIGTERM, Ctrl-C).

uvicorn 0.55's own shutdown does not wait for WebSockets: `Server.shutdown` closes the
listeners and calls every connection's `shutdown()`, which for a WebSocket sends close
1012 at once; `timeout_graceful_shutdown` then only bounds the wait for tasks, and the
app's lifespan shutdown comes after the connections are gone. So the drain runs first,
while the listener still answers: new live sockets get 1001 ("draining", reconnect
elsewhere) and /ready says 503, live sessions may end by themselves up to `drain_s`, then
each is scored and closed with 1001. Only then does uvicorn's shutdown run. The time
from SIGTERM to exit is at most drain_s + hub.DRAIN_FINISH_S + limits.CLOSE_WAIT_S +
uvicorn's graceful timeout: Kubernetes' terminationGracePeriodSeconds must exceed it.
"""

from __future__ import annotations

import uvicorn
from e2v.client.live.limits import LiveLimits

# WebSocket keepalive: a ping every 20 s, a peer silent for 20 s more is gone (uvicorn's
# defaults, stated here because the idle and drain arithmetic depends on them).
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0


def websocket_options(limits: LiveLimits) -> dict:
    """uvicorn.Config arguments for live sockets. permessage-deflate is off: it costs a
    zlib context per socket and CPU per event, for JSON events of a few hundred bytes."""
    return {
        "ws": "websockets-sansio",
        "ws_max_size": limits.frame_limit_bytes,
        "ws_per_message_deflate": False,
        "ws_ping_interval": PING_INTERVAL_S,
        "ws_ping_timeout": PING_TIMEOUT_S,
    }


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose shutdown drains the app's live hub first."""

    def __init__(self, config: uvicorn.Config, hub):
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets=None) -> None:
        if not self.force_exit:
            await self.hub.drain(self.hub.limits.drain_s)
        await super().shutdown(sockets)
