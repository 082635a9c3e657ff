"""A gateway replica's bus, alone in a process: the tests kill it (SIGKILL) to see what the
fleet does when a replica dies.

    python tests/bus_peer.py NATS_URL CALL_ID EVENTS [--summary] [--claim-ttl-s S]

Claims CALL_ID, publishes EVENTS events (a final every 4th, the rest interims; an alert,
then the summary with --summary), prints `published N` once they are on the bus, then
sleeps until killed (or exits at once with --exit).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from e2v.client.live.bus import to_json
from e2v.client.live.nats_bus import NatsBus, NatsOptions, parse_servers


def peer_event(call_id: str, seq: int, kind: str) -> dict:
    """The events the peer publishes (the tests rebuild the same ones to compare)."""
    event = {
        "type": kind,
        "call_id": call_id,
        "seq": seq,
        "party": "customer",
        "start_s": float(seq),
        "end_s": seq + 0.5,
    }
    if kind in ("utterance.end", "result"):
        event |= {"emotion": "angry", "confidence": 0.5 + seq / 1000}
    if kind == "alert":
        event |= {"label": "angry", "score": 0.9, "threshold": 0.7}
    return event


def peer_kinds(events: int, summary: bool) -> list[str]:
    kinds = ["utterance.end" if i % 4 == 3 else "result" for i in range(events)]
    return kinds + (["alert", "summary"] if summary else [])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("call_id")
    parser.add_argument("events", type=int)
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--exit", action="store_true")
    parser.add_argument("--claim-ttl-s", type=float, default=10.0)
    args = parser.parse_args()
    bus = NatsBus(NatsOptions(parse_servers(args.url), claim_ttl_s=args.claim_ttl_s))
    await bus.start()
    claim = await bus.claim(args.call_id, "live", ["customer"])
    kinds = peer_kinds(args.events, args.summary)
    for seq, kind in enumerate(kinds, 1):
        event = peer_event(args.call_id, seq, kind)
        claim.publish(event, to_json(event))
    await bus.flushed(args.call_id, 30)
    print(f"published {len(kinds)}", flush=True)
    if args.exit:
        sys.exit(0)  # no release, no stop: as if the process died here
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
