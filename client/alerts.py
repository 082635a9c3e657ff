"""Live alerts: per-party thresholds with hysteresis over a session's result windows.

    alerts = "customer:angry=0.7,sad=0.8"   # sad=0.8 watches every party

A rule fires once its party's score for its label is at or above the threshold for
`windows` consecutive windows; it stays quiet until the score falls below the threshold
minus `rearm_margin(threshold)` (one window is enough), then it is armed again. A rule
for a named party overrides a bare rule for the same label on that party. Labels are
matched like `e2v classify --alert` (client/results.py); unknown labels and parties are
refused, never silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from e2v.client.results import parse_alerts, resolve_alerts

from e2v.contract import EVENT_ALERT

# Re-arm below threshold - 0.1 (probability); thresholds under 0.2 re-arm below half of it,
# so even a low threshold can re-arm. Without a margin a score hovering at the threshold
# would fire on every other window.
REARM_MARGIN = 0.1
ALERT_WINDOWS = 2
MAX_ALERT_WINDOWS = 100
MAX_RULES = 64
MAX_ALERTS_CHARS = 4096


@dataclass(frozen=True)
class AlertRule:
    party: str
    label: str  # the model's short label (client.results.short_label)
    threshold: float

    @property
    def rearm_below(self) -> float:
        return self.threshold - rearm_margin(self.threshold)


def rearm_margin(threshold: float) -> float:
    return min(REARM_MARGIN, threshold / 2)


def parse_live_alerts(
    text: str | None, parties: tuple[str, ...], labels: list[str]
) -> list[AlertRule]:
    """`customer:angry=0.7,sad=0.8` -> one rule per (party, label); a bare `label=P` is a
    rule for every party. ValueError (one line, naming the item) for anything else."""
    if not text or not text.strip():
        return []
    if len(text) > MAX_ALERTS_CHARS:
        raise ValueError(f"alerts: longer than {MAX_ALERTS_CHARS} characters")
    items = [item.strip() for item in text.split(",")]
    if len(items) > MAX_RULES:
        raise ValueError(f"alerts: more than {MAX_RULES} items")
    bare: dict[str, float] = {}
    named: dict[tuple[str, str], float] = {}
    for item in items:
        party, label, threshold = _parse_item(item, parties, labels)
        if party is None:
            bare[label] = threshold
        else:
            named[(party, label)] = threshold
    rules = {(party, label): t for label, t in bare.items() for party in parties}
    rules |= named
    return [AlertRule(party, label, t) for (party, label), t in rules.items()]


def _parse_item(
    item: str, parties: tuple[str, ...], labels: list[str]
) -> tuple[str | None, str, float]:
    named, sep, rest = item.partition(":")
    party: str | None = named.strip()
    if not sep:
        party, rest = None, item
    elif party not in parties:
        raise ValueError(
            f"alerts item {item!r}: party {party!r} is not one of this stream's: "
            + ", ".join(parties)
        )
    try:
        if not rest.strip():
            raise ValueError("bad --alert item '': expected LABEL=P with 0 <= P <= 1")
        (label, threshold), *_ = resolve_alerts(parse_alerts(rest), labels).items()
    except ValueError as exc:
        # client/results.py words its messages for the --alert flag.
        raise ValueError(f"alerts item {item!r}: " + _unflagged(str(exc))) from None
    return party, label, threshold


def _unflagged(message: str) -> str:
    return re.sub(r"^bad --alert item .*?: ", "", message).replace("--alert label", "label")


@dataclass
class _State:
    armed: bool = True
    streak: int = 0
    streak_start_s: float = 0.0
    peak: float = 0.0


class AlertTracker:
    """One session's alert state: `update` with each result window of a party, in order;
    it returns the alert events that window fires (usually none)."""

    def __init__(self, rules: list[AlertRule], windows: int = ALERT_WINDOWS):
        if not 1 <= windows <= MAX_ALERT_WINDOWS:
            raise ValueError(f"alert_windows must be in 1-{MAX_ALERT_WINDOWS}, not {windows}")
        self.windows = windows
        self._rules: dict[str, list[AlertRule]] = {}
        for rule in rules:
            self._rules.setdefault(rule.party, []).append(rule)
        self._states = {rule: _State() for rule in rules}

    def update(
        self, party: str, scores: dict[str, float], start_s: float, end_s: float
    ) -> list[dict]:
        fired = []
        for rule in self._rules.get(party, ()):
            event = self._step(rule, scores.get(rule.label, 0.0), start_s, end_s)
            if event is not None:
                fired.append(event)
        return fired

    def _step(self, rule: AlertRule, score: float, start_s: float, end_s: float) -> dict | None:
        state = self._states[rule]
        if not state.armed:
            state.armed = score < rule.rearm_below
            return None
        if not score >= rule.threshold:  # NaN never counts
            state.streak = 0
            return None
        if state.streak == 0:
            state.streak_start_s, state.peak = start_s, score
        state.streak += 1
        state.peak = max(state.peak, score)
        if state.streak < self.windows:
            return None
        state.armed, state.streak = False, 0
        return {
            "type": EVENT_ALERT,
            "party": rule.party,
            "start_s": round(state.streak_start_s, 3),
            "end_s": round(end_s, 3),
            "label": rule.label,
            "score": round(state.peak, 6),  # the highest score of the windows that fired it
            "threshold": rule.threshold,
            "windows": self.windows,
            "rearm_below": round(rule.rearm_below, 6),
        }
