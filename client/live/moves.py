"""A live call's events across replicas: their numbering, and what moves with the call.

A call moves when the replica that holds it drains: an AudioHook client answers
`reconnect` by opening the conversation on another replica and closing this one (`close`
with reason `reconnect`); a `/v1/live` client retries elsewhere after the drain's 1001.
With a shared bus (`--bus`) the call goes on there, under the same id:

- The old replica finishes the utterances open at the cut from the audio it received
  (their finals end at the cut, as at a pause), publishes them, but not the summary: it
  hands the call over (bus.Claim.hand_over) with a *carry*: the call's time at the cut,
  each party's highest utterance number, and the summary so far.
- The new replica's session starts from the audio it receives: its VAD starts afresh, so
  speech cut by the move is two utterances, one final on each side. Its events are shifted
  onto the call (times by the cut, utterance numbers past the carried ones) and numbered
  after the last `seq`; its summary merges the carried one (duration-weighted score means
  over every final of the call, as one replica's summary would be, to rounding).
- Events the new session makes before the hand-over completes wait here (bounded:
  interims go first) and are numbered then.

`CallEvents` does the numbering for the hub: one per call; `hand_over` moves a call away.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from e2v.client.live.outbox import event_json

from e2v.contract import EVENT_RESULT, EVENT_SUMMARY, is_answer_label

if TYPE_CHECKING:
    from e2v.client.live.bus import Claim

log = logging.getLogger("e2v.live")

# Events a successor holds until the hand-over (a second or two of a call: a few dozen).
HELD_EVENTS = 1000
# The summary's fields a carry keeps (the rest is the event's own).
CARRIED = ("parties", "overlap_s", "duration_s", "coalesced", "stale")


class CallEvents:
    """Numbers one call's events (`seq`), shifted onto the call when it moved here."""

    def __init__(self, claim: Claim):
        self.claim = claim
        self.seq = claim.last_seq
        self.offset_s = 0.0  # the call's time when this replica's audio starts
        self.utterances_before: dict[str, int] = {}  # per party, numbered elsewhere
        self.prior: dict | None = None  # the summary so far, from the previous replicas
        self.utterances: dict[str, int] = {}  # per party, the highest published here
        self.held: list[dict] | None = None if claim.taken.done() else []
        self.dropped = 0  # held events dropped past HELD_EVENTS

    @property
    def waiting(self) -> bool:
        """Events are held: the call has not been handed over yet."""
        return self.held is not None

    def number(self, event: dict) -> dict | None:
        """`event` numbered (and shifted), or None while the hand-over is awaited."""
        if self.held is None:
            return self._numbered(event)
        if len(self.held) >= HELD_EVENTS:
            interim = next((i for i, e in enumerate(self.held) if e["type"] == EVENT_RESULT), 0)
            if event["type"] == EVENT_RESULT:
                self.dropped += 1
                return None
            del self.held[interim]
            self.dropped += 1
        self.held.append(event)
        return None

    def take_over(self) -> list[dict]:
        """The call is ours (the claim was taken): continue where the previous replica
        stopped; the held events, numbered."""
        carry = (self.claim.previous or {}).get("carry") or {}
        self.seq = self.claim.last_seq
        self.offset_s = float(carry.get("offset_s") or 0.0)
        self.utterances_before = dict(carry.get("utterances") or {})
        self.prior = carry.get("summary")
        held, self.held = self.held or [], None
        return [self._numbered(event) for event in held]

    def _numbered(self, event: dict) -> dict:
        self.seq += 1
        event["seq"] = self.seq
        if event["type"] == EVENT_SUMMARY:
            return self.whole(event)
        if self.offset_s:
            for key in ("start_s", "end_s"):
                if isinstance(event.get(key), (int, float)):
                    event[key] = round(event[key] + self.offset_s, 6)
        party, utterance = event.get("party"), event.get("utterance")
        if isinstance(utterance, int) and isinstance(party, str):
            utterance += self.utterances_before.get(party, 0)
            event["utterance"] = utterance
            self.utterances[party] = max(self.utterances.get(party, 0), utterance)
        return event

    def whole(self, summary: dict) -> dict:
        """`summary` of this replica's part as the whole call's (the carried part merged)."""
        if self.prior is not None:
            summary |= merged_summary(summary, self.prior, self.offset_s)
        return summary

    def carry(self, summary: dict) -> dict:
        """What the next replica continues from, given this replica's summary (not
        published: the call goes on)."""
        whole = self.whole(dict(summary))
        utterances = dict(self.utterances_before) | {
            party: max(n, self.utterances_before.get(party, 0))
            for party, n in self.utterances.items()
        }
        return {
            "offset_s": whole["duration_s"],
            "utterances": utterances,
            "summary": {key: whole[key] for key in CARRIED},
        }


async def hand_over(claim: Claim, events: CallEvents, summary: dict, wait_s: float) -> None:
    """Offer the call (its finals published here, `summary` not) to its next replica; if
    none takes it within `wait_s`, the call ends here: its summary, the whole call's, is
    published. The claim is released either way."""
    try:
        if await claim.hand_over(events.carry(summary), wait_s):
            return
        log.info("call %s: not taken over; its summary ends it here", claim.call_id)
        event = events.number({"type": summary["type"], "call_id": claim.call_id} | summary)
        if event is not None:
            claim.publish(event, event_json(event))
    except Exception as exc:  # noqa: BLE001 - the claim is released below anyway
        log.warning("call %s: hand-over failed: %r", claim.call_id, exc)
    await claim.release()


def merged_summary(summary: dict, prior: dict, offset_s: float) -> dict:
    """The fields of `summary` (one replica's part, from `offset_s` on) merged with
    `prior` (the part before): per party the duration-weighted mean of the scores (a
    party's weight is its speech), segments and speech added; overlap, coalesced and
    stale added; the duration is the whole call's."""
    before = {p["party"]: p for p in prior.get("parties") or []}
    parties = [_merged_party(p, before.pop(p["party"], None)) for p in summary["parties"]]
    parties += list(before.values())  # a party heard only before the move
    duration_s = round(offset_s + summary["duration_s"], 6)
    return {
        "parties": parties,
        "start_s": 0.0,
        "end_s": duration_s,
        "duration_s": duration_s,
        "overlap_s": round(summary["overlap_s"] + (prior.get("overlap_s") or 0.0), 6),
        "coalesced": summary["coalesced"] + (prior.get("coalesced") or 0),
        "stale": summary["stale"] + (prior.get("stale") or 0),
    }


def _merged_party(now: dict, before: dict | None) -> dict:
    if before is None:
        return now
    weight_now, weight_before = now.get("speech_s") or 0.0, before.get("speech_s") or 0.0
    scores_now, scores_before = now.get("scores") or {}, before.get("scores") or {}
    if scores_now and scores_before and weight_now + weight_before > 0:
        total = weight_now + weight_before
        scores = {
            label: round(
                (weight_now * p + weight_before * scores_before.get(label, 0.0)) / total, 6
            )
            for label, p in scores_now.items()
        }
    else:
        scores = scores_now or scores_before
    candidates = [label for label in scores if is_answer_label(label)]
    emotion = max(candidates, key=scores.get) if candidates else None
    return now | {
        "emotion": emotion,
        "confidence": scores[emotion] if emotion is not None else None,
        "scores": scores,
        "segments": now.get("segments", 0) + before.get("segments", 0),
        "speech_s": round(weight_now + weight_before, 6),
        "no_speech": bool(now.get("no_speech")) and bool(before.get("no_speech")),
    }
