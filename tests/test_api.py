"""The Python API (`from e2v import classify_file`) against a real tritonserver.

Each result equals the line `e2v classify --json` writes for the same file with the same
options (numbers within 1e-6): segmentation, aggregation, label restriction, alerts, and
a stereo call split into parties. Bad options raise ValueError naming the option, an
unreachable server ServerUnavailable, and a file that cannot be read gives the CLI's
error row. The synthetic model's labels are meaningless.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import e2v
from e2v import Classifier, ServerUnavailable, classify_file, classify_files

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
MONO = SAMPLES / "complaint.mp3"
STEREO = SAMPLES / "call-8k-stereo.wav"
# JSON numbers have 6 decimals: two runs whose batches differ (float32 sums in another
# order) may round to neighbours, one unit of the 6th decimal apart.
TOL = 1e-6 + 1e-12
FOUR = "angry,happy,neutral,sad"

# (e2v classify flags, the same options as keyword arguments)
CASES = {
    "defaults": ([], {}),
    "fixed-vote": (
        ["--segment", "fixed:3", "--aggregate", "vote"],
        {"segment": "fixed:3", "aggregate": "vote"},
    ),
    "labels-alerts": (
        ["--labels", FOUR, "--alert", "angry=0.0,sad=0.3"],
        {"labels": FOUR.split(","), "alert": {"angry": 0.0, "sad": 0.3}},
    ),
    "parties": (
        ["--parties", "caller,callee", "--alert", "caller:angry=0.0,sad=0.0", "--labels", FOUR],
        {"parties": ("caller", "callee"), "alert": "caller:angry=0.0,sad=0.0", "labels": FOUR},
    ),
    "split-none": (
        ["--channels", "split", "--segment", "none"],
        {"channels": "split", "segment": "none"},
    ),
}


def cli_rows(server, paths, *flags: str, protocol: str = "grpc") -> list[dict]:
    """`e2v classify --json` (the real CLI), its rows in output order."""
    command = [sys.executable, "-m", "e2v", "classify", "--no-progress", "--json"]
    command += ["--url", server.config.grpc_url if protocol == "grpc" else server.config.http_url]
    command += ["--protocol", protocol, *flags, *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 4, 8, 12), done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def same(ours, theirs, where: str = "row") -> None:
    """Equal JSON values, numbers within TOL."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), where
        for key in theirs:
            same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert ours == pytest.approx(theirs, abs=TOL), where
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("case", CASES)
def test_results_equal_e2v_classify_json(tiny_server, case):
    flags, options = CASES[case]
    url = tiny_server.config.grpc_url
    expected = {row["file"]: row for row in cli_rows(tiny_server, [MONO, STEREO], *flags)}
    for path in (MONO, STEREO):
        result = classify_file(path, url=url, **options)
        assert isinstance(result, e2v.FileResult) and result.ok
        same(result.to_json(), expected[str(path)], f"{case}:{path.name}")
    # the options took effect (the CLI and the API share their handling)
    if case == "parties":
        assert [p.party for p in result.parties] == ["caller", "callee"]
        assert {a["party"] for a in result.alerts} == {"caller", "callee"}
    if "alert" in options:
        assert result.alerts
    if "labels" in options:
        assert list(result.scores) == FOUR.split(",")
    if options.get("aggregate") == "vote":
        assert result.votes
    if options.get("segment") == "fixed:3":
        assert [s.end_s - s.start_s for s in result.segments[:2]] == [3.0, 3.0]


def test_many_files_in_listing_order_as_the_cli(tiny_server, tmp_path):
    folder = tmp_path / "calls"
    folder.mkdir()
    for source in sorted(SAMPLES.iterdir()):
        shutil.copy(source, folder / source.name)
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    missing = tmp_path / "missing.wav"
    paths = [folder, missing, folder / "complaint.mp3"]  # the last is listed twice: once
    expected = cli_rows(tiny_server, paths, "--segment", "fixed:2")
    results = classify_files(paths, url=tiny_server.config.grpc_url, segment="fixed:2")
    names = [r.file for r in results]
    assert names == [str(folder / n) for n in sorted(p.name for p in folder.iterdir())] + [
        str(missing)
    ]
    by_file = {row["file"]: row for row in expected}
    assert sorted(by_file) == sorted(names)
    for result in results:
        same(result.to_json(), by_file[result.file], result.file)
    errors = {r.file: r.error_kind for r in results if not r.ok}
    assert errors == {str(folder / "broken.wav"): "decode", str(missing): "not_found"}


def test_an_unreadable_file_is_its_error_row(tiny_server, tmp_path):
    missing = tmp_path / "nope.wav"
    (expected,) = cli_rows(tiny_server, [missing])
    result = classify_file(missing, url=tiny_server.config.grpc_url)
    assert not result.ok and result.to_json() == expected


def test_async_classifier_and_http(tiny_server):
    """One connection for several calls; HTTP gives what gRPC gives."""

    async def run():
        async with Classifier(tiny_server.config.http_url, "http") as classifier:
            assert classifier.info is not None and classifier.info.labels
            one = await classifier.classify_file(MONO, segment="fixed:3")
            many = await classifier.classify_files([STEREO, MONO], channels="split")
            return one, many

    one, many = asyncio.run(run())
    expected = cli_rows(tiny_server, [MONO], "--segment", "fixed:3")
    same(one.to_json(), expected[0])
    split = {
        row["file"]: row for row in cli_rows(tiny_server, [STEREO, MONO], "--channels", "split")
    }
    assert [r.file for r in many] == [str(STEREO), str(MONO)]
    for result in many:
        same(result.to_json(), split[result.file])


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"segment": "fixed:x"}, ValueError, "SECONDS must be a number"),
        ({"segment": "fixed:99"}, ValueError, "fixed window must be between"),
        ({"labels": "angry,joy"}, ValueError, "its labels: angry, disgusted"),
        ({"labels": ["angry"]}, ValueError, "at least two"),
        ({"alert": "fury=0.5"}, ValueError, "not one of the model's"),
        ({"alert": {"angry": 2}}, ValueError, "expected LABEL=P with 0 <= P <= 1"),
        ({"alert": "customer:angry=0.5"}, ValueError, "needs --channels split"),
        ({"alert": "boss:angry=0.5", "channels": "split"}, ValueError, "party 'boss'"),
        ({"parties": ["a,b"]}, ValueError, "cannot hold ','"),
        ({"parties": "a,a"}, ValueError, "must differ"),
        ({"parties": "a", "channels": "mix"}, ValueError, "not of a mix"),
        ({"channels": "both"}, ValueError, "--channels 'both': mix or split"),
        ({"aggregate": "median"}, ValueError, "--aggregate 'median': mean or vote"),
        ({"concurrency": 0}, ValueError, "concurrency must be >= 1"),
        ({"max_duration_s": 0}, ValueError, "max duration"),
        ({"segments": "vad"}, TypeError, "unknown option"),
    ],
)
def test_bad_options_raise_clear_errors(tiny_server, options, error, message):
    with pytest.raises(error, match=message):
        classify_file(MONO, url=tiny_server.config.grpc_url, **options)


def test_bad_connections_raise(tiny_server, tmp_path):
    with pytest.raises(ValueError, match="protocol must be grpc or http"):
        classify_file(MONO, url=tiny_server.config.grpc_url, protocol="udp")
    with pytest.raises(ServerUnavailable):
        classify_file(MONO, url="127.0.0.1:1", retries=0)
    with pytest.raises(ValueError, match="use classify_files"):
        classify_file(SAMPLES, url=tiny_server.config.grpc_url)


def test_blocking_calls_refuse_a_running_loop(tiny_server):
    async def inside():
        classify_file(MONO, url=tiny_server.config.grpc_url)

    with pytest.raises(RuntimeError, match="async with Classifier"):
        asyncio.run(inside())


def test_the_readme_examples_run(tiny_server, capsys):
    """README's "Python API" snippets, on the samples (the names they use replaced)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    names = {
        "localhost:8001": tiny_server.config.grpc_url,
        '"call.wav"': repr(str(STEREO)),
        '"calls/"': repr(f"{SAMPLES}/"),
        '"s3://calls/2026/11/"': repr(str(MONO)),
    }
    for block in blocks:
        for name, value in names.items():
            block = block.replace(name, value)
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert '"file":' not in printed and "'file':" in printed  # to_json() is a dict
    assert f"{SAMPLES}/complaint.mp3" in printed and str(MONO) in printed


def test_the_package_exports_the_api_lazily():
    """`import e2v.contract` (every command) does not load the client library."""
    code = "import sys, e2v.contract; print('e2v.api' in sys.modules, 'numpy' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["False", "False"], done.stderr
    assert set(e2v.__all__) <= set(dir(e2v.api))
    with pytest.raises(AttributeError):
        e2v.nothing  # noqa: B018
