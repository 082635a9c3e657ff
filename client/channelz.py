"""Requests per replica of one gRPC channel, read from gRPC's own channelz statistics.

With `round_robin` the channel picks a replica (a subchannel) per request and the caller
never learns which. gRPC counts calls per subchannel for its channelz debug service; this
reads those counters in-process, so gRPC keeps the balancing and we still get the count per
replica. It calls the functions that grpcio-channelz's servicer wraps (that package pins a
protobuf that tritonclient does not accept) and parses their JSON.

A subchannel's counters go when gRPC drops it (its address left DNS, the channel closed):
`ChannelRequests` keeps the last value read for each, so totals never go back; read it
at each scrape and before the channel closes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

from e2v.client.targets import subchannel_address

log = logging.getLogger("e2v.client")


def top_channel_ids() -> set[int]:
    """Every gRPC client channel of this process (channelz pages through them)."""
    try:
        from grpc._cython import cygrpc
    except ImportError:  # pragma: no cover - a gRPC without channelz: no counts
        return set()
    ids, start = set(), 0
    while True:
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        channels = page.get("channel", [])
        ids |= {int(c["ref"]["channelId"]) for c in channels}
        if page.get("end", True) or not channels:
            return ids
        start = max(ids) + 1


class ChannelRequests:
    """Calls started per replica address on one channel, from its channelz id."""

    def __init__(self, channel_id: int | None):
        self.channel_id = channel_id
        self._calls: dict[int, tuple[str, int]] = {}  # subchannel id -> (address, calls)
        self._states: dict[str, str] = {}

    @classmethod
    def of_new_channel(cls, before: set[int]) -> ChannelRequests:
        """The channel created since `before` was read (None when it cannot be told)."""
        new = top_channel_ids() - before
        if len(new) != 1:
            log.debug("channelz: %d new channels, no per-replica counts", len(new))
            return cls(None)
        return cls(new.pop())

    def read(self) -> Counter:
        """Requests started per replica address, since the channel opened."""
        self._refresh()
        totals: Counter = Counter()
        for address, calls in self._calls.values():
            totals[address] += calls
        return totals

    def states(self) -> dict[str, str]:
        """Connectivity per replica address at the last read: READY, TRANSIENT_FAILURE..."""
        self._refresh()
        return dict(self._states)

    def _refresh(self) -> None:
        if self.channel_id is None:
            return
        from grpc._cython import cygrpc

        try:
            channel = json.loads(cygrpc.channelz_get_channel(self.channel_id))["channel"]
        except (ValueError, KeyError):  # closed: keep the last values
            return
        states = {}
        for ref in channel.get("subchannelRef", []):
            sub_id = int(ref["subchannelId"])
            try:
                data = json.loads(cygrpc.channelz_get_subchannel(sub_id))["subchannel"]["data"]
            except (ValueError, KeyError):  # dropped between the two reads
                continue
            address = subchannel_address(data.get("target", "?"))
            self._calls[sub_id] = (address, int(data.get("callsStarted", 0)))
            states[address] = data.get("state", {}).get("state", "UNKNOWN")
        self._states = states
