"""The query parameters of POST /predict, as the OpenAPI document states them and as the
gateway enforces them: one pattern each, published as it is checked, so the two cannot
drift apart.

The shared parsers (client/segment.py, client/results.py, client/parties.py) are more
lenient than what is published (exponents, tabs, any prefix before a label's `/`); a
value that they take but its pattern does not is refused too (400), so that a client
generated from the document never meets a refusal it could not know of, and the document
never refuses what the gateway takes. What a pattern cannot express (rules across two
parameters) is named in the parameter's description and checked by the parsers.
"""

from __future__ import annotations

import functools
import re

from e2v.client.alerts import MAX_RULES
from e2v.client.parties import DEFAULT_PARTIES, MAX_PARTIES, MAX_PARTY_CHARS
from e2v.client.results import short_label

from e2v.contract import MAX_SEGMENT_S, MIN_SAMPLES, SAMPLE_RATE

MAX_QUERY_CHARS = 1024  # alert, parties, filename
MAX_SEGMENT_CHARS = 64
MAX_ALERT_ITEMS = MAX_RULES  # live alerts' bound, here for every mode

# Plain decimals only (no sign, exponent or `_`): 0.025 <= SECONDS <= 30 (MIN_SAMPLES and
# MAX_SEGMENT_S: tests/test_gateway_openapi.py checks both bounds) and 0 <= P <= 1.
SECONDS = (
    r"0*(?:30(?:\.0*)?|[12][0-9](?:\.[0-9]*)?|[1-9](?:\.[0-9]*)?"
    r"|\.(?:[1-9]|0[3-9]|02[5-9])[0-9]*)"
)
PROBABILITY = r"(?:0*1(?:\.0*)?|0*\.[0-9]+|0+(?:\.[0-9]*)?)"
PARTY = rf"[A-Za-z0-9_.-]{{1,{MAX_PARTY_CHARS}}}"


def _anycase(word: str) -> str:
    """`word` as a pattern that matches it in any ASCII case (JSON Schema has no flags)."""
    out = []
    for char in word:
        if char.isascii() and char.isalpha():
            out.append(f"[{char.upper()}{char.lower()}]")
        else:
            out.append(re.escape(char) if char in r"\^$.|?*+()[]{}" else char)
    return "".join(out)


SEGMENT_PATTERN = rf"^ *(?:{_anycase('vad')}|{_anycase('none')}|{_anycase('fixed')}: *{SECONDS}) *$"
PARTIES_PATTERN = rf"^ *{PARTY} *(?:, *{PARTY} *){{0,{MAX_PARTIES - 1}}}$"

SEGMENT_DESCRIPTION = (
    "`vad` (speech regions), `none` (the whole file as one segment, at most "
    f"{MAX_SEGMENT_S:g} s) or `fixed:SECONDS` (windows of SECONDS, "
    f"{MIN_SAMPLES / SAMPLE_RATE:g} to {MAX_SEGMENT_S:g}, a plain decimal); any case"
)
PARTIES_DESCRIPTION = (
    f"channel names in channel order, 1 to {MAX_PARTIES}, comma-separated, each 1 to "
    f"{MAX_PARTY_CHARS} letters, digits, `_`, `.` or `-`; implies `channels=split`. "
    "Not expressed by the pattern: the names must differ; a file with more channels than "
    f"names is refused (422, `channels`). Default with `channels=split`: "
    f"{','.join(DEFAULT_PARTIES)}"
)

SEGMENT_EXAMPLES = ["vad", "fixed:3", "none"]
PARTIES_EXAMPLES = [",".join(DEFAULT_PARTIES), "caller"]
SEGMENT_FORM = (
    f"vad, none or fixed:SECONDS (a plain decimal from {MIN_SAMPLES / SAMPLE_RATE:g} to "
    f"{MAX_SEGMENT_S:g})"
)
PARTIES_FORM = f"NAME,... (1 to {MAX_PARTIES} names of letters, digits, _ . -)"
ALERT_FORM = "LABEL=P,... (P a plain decimal from 0 to 1; PARTY:LABEL=P with split channels)"


def label_forms(labels: list[str]) -> list[str]:
    """Every way an alert may name a label: its short form and its full form."""
    forms = {form for label in labels for form in (short_label(label), label)}
    return sorted(forms, key=lambda form: (-len(form), form))


@functools.lru_cache(maxsize=8)
def alert_pattern(labels: tuple[str, ...] | None) -> str:
    """`LABEL=P` items (P a plain decimal, 0 to 1), `PARTY:LABEL=P` with split channels,
    at most MAX_ALERT_ITEMS, spaces allowed around separators; or empty (no alert).
    Without the model's labels (not connected yet), any word stands for LABEL."""
    if labels:
        label = "(?:" + "|".join(_anycase(form) for form in label_forms(list(labels))) + ")"
    else:
        label = "[^ ,:=][^,:=]*"
    item = rf" *(?:{PARTY} *: *)?{label} *= *{PROBABILITY} *"
    return rf"^(?:{item}(?:,{item}){{0,{MAX_ALERT_ITEMS - 1}}})?$"


def alert_description(labels: tuple[str, ...] | None) -> str:
    known = ", ".join(dict.fromkeys(short_label(label) for label in labels)) if labels else None
    which = f"this model's: {known}" if known else "the served model's (GET /ready lists them)"
    return (
        "thresholds, e.g. `angry=0.7,sad=0.8`: `LABEL=P` items, comma-separated, at most "
        f"{MAX_ALERT_ITEMS}; LABEL one of {which} (short or full form, any case), P a plain "
        "decimal from 0 to 1. Not expressed by the pattern: `PARTY:LABEL=P` (one party's "
        "rule) needs `channels=split` or `parties`, and PARTY must be one of the parties"
    )


def check(name: str, value: str | None, pattern: str, form: str) -> str | None:
    """Why `value` does not match its published `pattern` (`form` in words), or None."""
    if value is None or re.fullmatch(pattern.removeprefix("^").removesuffix("$"), value):
        return None
    shown = value if len(value) <= 80 else value[:77] + "..."
    return f"{name} {shown!r}: expected {form} (the OpenAPI document at /openapi.json)"


def check_query(
    segment: str, alert: str | None, parties: str | None, labels: list[str]
) -> str | None:
    """Why one of the values is not in its published form, or None."""
    return (
        check("segment", segment, SEGMENT_PATTERN, SEGMENT_FORM)
        or check("parties", parties, PARTIES_PATTERN, PARTIES_FORM)
        or check("alert", alert, alert_pattern(tuple(labels)), ALERT_FORM)
    )


def alert_examples(labels: tuple[str, ...] | None) -> list[str]:
    first, second = [short_label(label) for label in labels[:2]] if labels else ("angry", "sad")
    party = DEFAULT_PARTIES[0]
    return [f"{first}=0.7", f"{first}=0.7,{second}=0.8", f"{party}:{first}=0.7,{second}=0.8"]


def publish(params: list[dict], labels: tuple[str, ...] | None) -> None:
    """Patterns, descriptions and examples of /predict's query parameters, in its OpenAPI
    operation. An optional one is absent, never null (a query cannot say null)."""
    published = {
        "segment": (SEGMENT_PATTERN, MAX_SEGMENT_CHARS, SEGMENT_DESCRIPTION, SEGMENT_EXAMPLES),
        "alert": (
            alert_pattern(labels),
            MAX_QUERY_CHARS,
            alert_description(labels),
            alert_examples(labels),
        ),
        "parties": (PARTIES_PATTERN, MAX_QUERY_CHARS, PARTIES_DESCRIPTION, PARTIES_EXAMPLES),
    }
    for param in params:
        schema = param["schema"]
        not_null = [s for s in schema.pop("anyOf", []) if s.get("type") != "null"]
        if not_null:
            (schema_of_value,) = not_null
            schema |= schema_of_value
        if param["name"] in published:
            pattern, max_length, description, examples = published[param["name"]]
            schema |= {"type": "string", "maxLength": max_length, "pattern": pattern}
            schema |= {"examples": examples}
            schema["description"] = param["description"] = description
