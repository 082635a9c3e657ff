"""The gateway's OpenAPI document states what the gateway enforces, checked by schemathesis.

schemathesis (`--checks all`, a fixed seed) runs every operation of a real `e2v gateway` in
front of the real tritonserver: requests the document calls valid must be served, those it
calls invalid refused, every answer must match the document, and every 405 must carry
`Allow`. tests/schemathesis_hooks.py gives it real recordings as bodies and the rules
across parameters that the descriptions name. The patterns are also checked against the
parsers behind them directly: every value a pattern allows is taken by its parser.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import audio_fixtures as fx
import pytest
from e2v.client.gateway import parameters
from e2v.loadtest.gateway_process import GatewayProcess
from hypothesis import given, settings
from hypothesis import strategies as st

from e2v.contract import MAX_SEGMENT_S, MIN_SAMPLES, SAMPLE_RATE

pytest.importorskip("fastapi", reason="the gateway extra is not installed")

TESTS = Path(__file__).resolve().parent
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
SEED = 20261208
EXAMPLES = 100  # per operation: every query parameter is drawn with several values
LABELS = ("生气/angry", "厌恶/disgusted", "开心/happy", "中立/neutral", "难过/sad", "<unk>")


@pytest.fixture(scope="module")
def gateway(tiny_server):
    """A subscription to a call that never comes ends after 0.5 s, not 30 s: schemathesis
    opens many."""
    process = GatewayProcess(tiny_server.config.grpc_url, "--live-subscribe-wait-s", "0.5")
    with process.start(ready=True):
        yield process


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    """One mono second of speech-like audio in the containers the body's media types name."""
    folder = tmp_path_factory.mktemp("recordings")
    wav = fx.speech_like(1.0, seed=1)
    fx.write_audio(folder / "call.wav", wav)
    fx.write_audio(folder / "call.webm", wav, video=True)
    fx.write_audio(folder / "call.ogg", wav, codec="libopus")
    return folder


def test_schemathesis_finds_nothing(gateway, recordings, tmp_path):
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "E2V_SCHEMATHESIS_AUDIO": str(recordings),
    }
    command = [str(SCHEMATHESIS), "run", f"{gateway.url}/openapi.json", "--checks", "all"]
    command += ["--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1"]
    command += ["--generation-database", "none", "--request-timeout", "60", "--no-color"]
    # No stateful phase: its one link (GET /v1/calls -> a call's events) only ever finds no
    # live call here, a 0.5 s wait per scenario (3.5 min); test_fleet.py follows real calls.
    command += ["--phases", "examples,coverage,fuzzing"]
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    print(run.stdout[-3000:], run.stderr[-2000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    (generated, passed) = re.search(r"(\d+) generated, (\d+) passed", run.stdout).groups()
    assert generated == passed and int(generated) >= 2 * EXAMPLES, run.stdout[-2000:]
    assert "Operations:       5 selected / 5 total" in run.stdout


def _status(url: str, method: str = "GET") -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("TRACE", "/health", "GET"),
        ("POST", "/ready", "GET"),
        ("DELETE", "/predict", "POST"),
        ("PUT", "/v1/calls/c-1/events", "GET"),
    ],
)
def test_every_405_says_which_methods_are_allowed(gateway, method, path, allowed):
    status, headers = _status(gateway.url + path, method)
    assert status == 405 and headers.get("allow") == allowed, headers


def test_the_document_names_the_model_s_labels_and_the_limits(gateway):
    with urllib.request.urlopen(gateway.url + "/openapi.json", timeout=10) as response:
        document = json.load(response)
    predict = document["paths"]["/predict"]["post"]
    query = {p["name"]: p["schema"] for p in predict["parameters"]}
    assert "生气/" in query["alert"]["pattern"] and "angry" in query["alert"]["description"]
    assert query["segment"]["pattern"] == parameters.SEGMENT_PATTERN
    assert all("anyOf" not in schema for schema in query.values())  # a query is never null
    files = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert files["properties"]["file"]["maxItems"] == 16 and not files["additionalProperties"]
    events = document["paths"]["/v1/calls/{call_id}/events"]["get"]
    assert events["parameters"][0]["schema"]["pattern"] == "^[A-Za-z0-9._:-]{1,128}$"
    assert "422" not in events["responses"]  # validation errors are 400 here
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_a_form_the_parsers_take_but_the_document_does_not_is_refused(gateway):
    """Exponents and prefixes before a label's `/` parse, but are not what is published."""
    audio = {"Content-Type": "audio/wav"}
    for query, name in (("segment=fixed:1e1", "segment"), ("alert=x/angry=0.7", "alert")):
        request = urllib.request.Request(
            f"{gateway.url}/predict?{query}", b"RIFF", audio, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        body = refused.value.read().decode()
        assert refused.value.code == 400 and f'"error":"{name} ' in body, body


# ----------------------------------------------------------- patterns against the parsers


def _matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern.removeprefix("^").removesuffix("$"), value) is not None


def test_the_segment_pattern_has_the_contract_s_bounds():
    low, high = MIN_SAMPLES / SAMPLE_RATE, MAX_SEGMENT_S
    inside = [f"fixed:{low}", f"fixed:{high:g}", "fixed:030.", "FIXED: 2.5 ", " vad", "None"]
    outside = [f"fixed:{low - 1e-4:.4f}", f"fixed:{high + 1e-4}", "fixed:0", "fixed:-1"]
    outside += ["fixed:3e1", "fixed:1_0", "fixed:nan", "vadx", "fixed :3"]
    assert all(_matches(parameters.SEGMENT_PATTERN, value) for value in inside)
    assert not any(_matches(parameters.SEGMENT_PATTERN, value) for value in outside)


@settings(max_examples=300, deadline=None, database=None)
@given(st.from_regex(parameters.SEGMENT_PATTERN, fullmatch=True))
def test_every_segment_the_pattern_allows_is_parsed(value):
    from e2v.client.segment import parse_segment_mode

    parse_segment_mode(value)


@settings(max_examples=300, deadline=None, database=None)
@given(st.from_regex(parameters.PARTIES_PATTERN, fullmatch=True))
def test_every_parties_value_the_pattern_allows_is_parsed_once_names_differ(value):
    from e2v.client.parties import parse_parties

    names = [name.strip() for name in value.split(",")]
    if len(set(names)) == len(names):
        assert parse_parties(value) == tuple(names)


@settings(max_examples=300, deadline=None, database=None)
@given(st.from_regex(parameters.alert_pattern(LABELS), fullmatch=True))
def test_every_alert_the_pattern_allows_is_parsed_in_either_mode(value):
    """Bare items in mix mode; with split channels, PARTY named among the parties."""
    from e2v.client.alerts import parse_live_alerts
    from e2v.client.results import parse_alerts, resolve_alerts

    prefixed = re.compile(rf"^ *({parameters.PARTY}) *:")
    parties = tuple(dict.fromkeys(m[1] for item in value.split(",") if (m := prefixed.match(item))))
    if parties:
        parse_live_alerts(value, parties, list(LABELS))
    else:
        resolve_alerts(parse_alerts(value), list(LABELS))
        parse_live_alerts(value, ("customer", "agent"), list(LABELS))
