"""Parties of a call: one channel each (`--channels split`), and the conversation figures.

    parse_parties("customer,agent") -> ("customer", "agent")
    conversation({"customer": segs, "agent": segs}, duration_s) -> speech, overlap, silence

A dual-channel call-centre recording has the customer on one channel and the agent on
the other; `e2v classify --channels split` and live calls (client/live/session.py) both
treat each channel as a party and summarise it with the functions here, so a recorded
call and a live one give the same figures. Speech is where a party's segments are (the
VAD's regions as classify cuts them: padded, close ones merged); overlap is where two or
more parties speak at once, silence where none does.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept out of `e2v --help`'s imports (the CLIs add our flags)
    from e2v.client.results import FileResult, SegmentResult
    from e2v.client.triton import ModelInfo

CHANNEL_MODES = ("mix", "split")  # --channels: averaged to mono, or a party per channel
# `e2v classify --channels split` without --parties: the call-centre convention.
DEFAULT_PARTIES = ("customer", "agent")
MAX_PARTIES = 64  # client.audio.MAX_CHANNELS: one name per channel at most
MAX_PARTY_CHARS = 64
# Names appear in alert rules (`customer:angry=0.7`), CSV cells and URLs: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_parties(text: str | None) -> tuple[str, ...]:
    """`customer,agent` -> ("customer", "agent"); ValueError for empty, repeated or odd
    names (letters, digits, `_`, `.`, `-`, at most 64 characters each)."""
    if text is None:
        return DEFAULT_PARTIES
    names = tuple(name.strip() for name in text.split(","))
    if not 1 <= len(names) <= MAX_PARTIES:
        raise ValueError(f"--parties takes 1 to {MAX_PARTIES} names, not {len(names)}")
    for name in names:
        if not name or len(name) > MAX_PARTY_CHARS or not _NAME.match(name):
            raise ValueError(
                f"--parties {text!r}: party names are 1-{MAX_PARTY_CHARS} letters, digits, "
                f"'_', '.' or '-', separated by commas"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"--parties {text!r}: party names must differ")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--channels mix|split` and `--parties NAME,...` (shared by classify, evaluate and
    train-head)."""
    parser.add_argument(
        "--channels",
        choices=CHANNEL_MODES,
        help="mix: channels averaged to mono (the default); split: each channel its own "
        "party (own decode, VAD, segments and result)",
    )
    parser.add_argument(
        "--parties",
        metavar="NAME,...",
        help="names of the channels in order (implies --channels split; default "
        + ",".join(DEFAULT_PARTIES)
        + "); a file with more channels than names is an error row",
    )


def from_arguments(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The party names of `--channels split` / `--parties`, or None for a mix."""
    return party_names(args.channels, args.parties)


def party_names(channels: str | None, parties: str | None) -> tuple[str, ...] | None:
    """The party names of `channels` ("mix", "split" or None) and `parties` (names, comma
    separated, or None: implies split), or None for a mix."""
    if parties is not None:
        if channels == "mix":
            raise ValueError("--parties names the channels of --channels split, not of a mix")
        return parse_parties(parties)
    return DEFAULT_PARTIES if channels == "split" else None


def party_thresholds(
    text: str | None, parties: tuple[str, ...], labels: list[str]
) -> dict[str, dict[str, float]]:
    """`--alert customer:angry=0.7,sad=0.8` -> {party: {label: threshold}} (a bare item is
    every party's), parsed by the live calls' parser: unknown parties and labels refused."""
    from e2v.client.alerts import parse_live_alerts

    thresholds: dict[str, dict[str, float]] = {party: {} for party in parties}
    try:
        rules = parse_live_alerts(text, parties, labels)
    except ValueError as exc:
        raise ValueError(f"--alert: {exc}") from None
    for rule in rules:
        thresholds[rule.party][rule.label] = rule.threshold
    return thresholds


MANIFEST_COLUMNS = ("party", "channel")  # e2v evaluate / train-head: whose speech a row labels


def manifest_parties(args: argparse.Namespace, columns: list[str]) -> tuple[str, ...] | None:
    """The parties for a labelled set: --channels / --parties, and a manifest with a
    `party` or `channel` column is split even without them (its labels are per party)."""
    parties = from_arguments(args)
    per_party = [c for c in MANIFEST_COLUMNS if c in columns]
    if per_party and args.channels == "mix":
        raise ValueError(f"the manifest's {per_party[0]!r} column needs --channels split")
    if per_party and parties is None:
        return DEFAULT_PARTIES
    return parties


def manifest_channel(fields: Mapping[str, str], parties: tuple[str, ...]) -> int | None:
    """The channel a manifest row's label is about: its `party` (one of `parties`) or
    `channel` (0-based) cell; None when neither is set (the file's first party).
    ValueError, one line, for a name or number that is neither."""
    party = (fields.get("party") or "").strip()
    channel = (fields.get("channel") or "").strip()
    if party and party not in parties:
        raise ValueError(f"party {party!r} is not one of --parties: " + ", ".join(parties))
    index = parties.index(party) if party else None
    if channel:
        if not channel.isdigit() or int(channel) >= len(parties):
            raise ValueError(f"channel {channel!r}: 0 to {len(parties) - 1} (0-based)")
        if index is not None and index != int(channel):
            raise ValueError(f"party {party!r} is channel {index}, not {channel}")
        index = int(channel)
    return index


def party_result(result: FileResult, channel: int | None) -> FileResult:
    """One channel's part of a split result (None: the first party's; a mixed result or
    an error row is itself); an error row when the file has no such channel."""
    if result.parties is None:
        return result
    channel = channel or 0
    if channel >= len(result.parties):
        from e2v.client.results import FileResult

        return FileResult(
            file=result.file,
            error=f"the file has {len(result.parties)} channel(s), the row names channel "
            f"{channel} (0-based)",
            error_kind="channels",
            model=result.model,
            synthetic=result.synthetic,
        )
    return result.parties[channel].result


def speech_s(segments: Iterable[SegmentResult]) -> float:
    """Seconds of one party's speech (its segments never overlap each other)."""
    return sum(s.duration_s for s in segments)


def overlap_s(parties: Iterable[Iterable[SegmentResult]]) -> float:
    """Seconds during which at least two parties speak (their segments overlap)."""
    edges = sorted(
        (t, d) for segs in parties for s in segs for t, d in ((s.start_s, 1), (s.end_s, -1))
    )
    total, talking, last = 0.0, 0, 0.0
    for t, delta in edges:
        if talking >= 2:
            total += t - last
        talking, last = talking + delta, t
    return total


def silences(parties: Iterable[Iterable[SegmentResult]], duration_s: float) -> list[float]:
    """The lengths of the stretches of [0, duration_s] where no party speaks, in order."""
    spans = sorted((s.start_s, s.end_s) for segs in parties for s in segs)
    gaps, covered = [], 0.0
    for start, end in spans:
        if start > covered:
            gaps.append(start - covered)
        covered = max(covered, end)
    if duration_s > covered:
        gaps.append(duration_s - covered)
    return gaps


def conversation(parties: Mapping[str, list[SegmentResult]], duration_s: float) -> dict:
    """`speech_s` per party, `overlap_s`, `silence_s` and `longest_silence_s` of a call."""
    gaps = silences(parties.values(), duration_s)
    return {
        "speech_s": {party: _r(speech_s(segs)) for party, segs in parties.items()},
        "overlap_s": _r(overlap_s(parties.values())),
        "silence_s": _r(sum(gaps)),
        "longest_silence_s": _r(max(gaps, default=0.0)),
    }


def split_result(
    file: str,
    duration_s: float,
    channels: list[tuple[str, list[SegmentResult]]],
    info: ModelInfo,
    thresholds: Mapping[str, Mapping[str, float]],
) -> FileResult:
    """A `--channels split` file's result: per party (in channel order) what `aggregate`
    gives for that channel alone, with that party's alert thresholds, and the
    conversation figures of the whole call."""
    from e2v.client.results import FileResult, PartyResult, aggregate, with_parties

    parties = [
        PartyResult(
            party, i, aggregate(file, duration_s, segs, info, dict(thresholds.get(party, {})))
        )
        for i, (party, segs) in enumerate(channels)
    ]
    result = FileResult(
        file=file,
        duration_s=duration_s,
        model=info.name,
        synthetic=info.synthetic,
        parties=parties,
        conversation=conversation(dict(channels), duration_s),
    )
    return with_parties(result)


def _r(value: float) -> float:
    return round(float(value), 6)


__all__ = [
    "CHANNEL_MODES",
    "DEFAULT_PARTIES",
    "add_arguments",
    "from_arguments",
    "manifest_channel",
    "manifest_parties",
    "party_names",
    "party_result",
    "party_thresholds",
    "conversation",
    "overlap_s",
    "parse_parties",
    "silences",
    "speech_s",
    "split_result",
]
