"""schemathesis extensions for tests/test_gateway_openapi.py, loaded through SCHEMATHESIS_HOOKS.

Two things the OpenAPI document cannot say, taught to the generator of POST /predict:

- What decodes as audio. Bodies and multipart parts of the media types the document lists
  are real recordings (E2V_SCHEMATHESIS_AUDIO: a folder with call.wav, call.webm with a
  video track, call.ogg), so that the query parameters, not undecodable bytes, decide the
  status: a schema-valid query must get 200, an invalid one a 4xx of its own.
- The rules across parameters that the descriptions name, for schema-valid queries only:
  party names differ, and an alert item `PARTY:LABEL=P` needs split channels and one of
  the parties as PARTY.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import schemathesis
from e2v.client.gateway.parameters import PARTY
from e2v.client.parties import DEFAULT_PARTIES
from hypothesis import strategies as st

AUDIO = Path(os.environ["E2V_SCHEMATHESIS_AUDIO"])
for media_type, name in (
    ("audio/wav", "call.wav"),
    ("video/webm", "call.webm"),
    ("application/ogg", "call.ogg"),
    ("application/octet-stream", "call.wav"),
):
    schemathesis.openapi.media_type(media_type, st.just((AUDIO / name).read_bytes()))

PARTY_PREFIX = re.compile(rf"^( *)({PARTY})( *:)")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.operation.path == "/predict" and case.query and _query_is_positive(case):
        _apply_cross_parameter_rules(case.query)


def _query_is_positive(case) -> bool:
    if case.meta is None:
        return False
    modes = {str(getattr(loc, "value", loc)): c.mode for loc, c in case.meta.components.items()}
    return "query" in modes and modes["query"].is_positive


def _apply_cross_parameter_rules(query: dict) -> None:
    """Only values that break a rule are changed: schemathesis validates a changed query
    again, in its wire form."""
    if isinstance(query.get("parties"), str):
        names = [name.strip() for name in query["parties"].split(",")]
        if len(set(names)) < len(names):
            query["parties"] = ",".join(dict.fromkeys(names))
    alert = query.get("alert")
    if not isinstance(alert, str) or not any(PARTY_PREFIX.match(i) for i in alert.split(",")):
        return
    if "parties" in query:
        parties = [name.strip() for name in query["parties"].split(",")]
    else:
        parties = list(DEFAULT_PARTIES)
        query["channels"] = "split"
    items = alert.split(",")
    for i, item in enumerate(items):
        items[i] = PARTY_PREFIX.sub(lambda m: m[1] + parties[len(m[2]) % len(parties)] + m[3], item)
    query["alert"] = ",".join(items)
