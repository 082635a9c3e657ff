"""Per-party labels in `e2v evaluate` and `e2v train-head` manifests (`party` / `channel`).

The stereo calls of tests/test_parties.py (espeak-ng voices, real files) against the real
tiny Triton server: each manifest row's prediction is `e2v classify --parties`'s result
for that row's party, the report groups by party, bad party cells and missing channels
are row errors; train-head's embeddings of a party's row equal those of that channel
extracted to a mono file. The synthetic model's labels are meaningless.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess

import numpy as np
import pytest
from e2v.client.classify import JobOptions
from e2v.client.evaluation import read_labelled
from e2v.client.heads.embed import embed_rows, plan_rows
from e2v.client.segment import SegmentMode
from e2v.client.triton import TritonEmotionClient
from test_parties import E2V, calls, classify  # noqa: F401 - `calls` is a fixture


def _manifest(path, rows: list[dict]) -> str:
    fields = ["path", "label", "party", "channel"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def labels(tiny_server, calls):  # noqa: F811
    rows, _ = classify(tiny_server, [calls["mono"]])
    return list(rows["mono.wav"]["scores"])


def test_evaluate_scores_each_row_on_its_party(tiny_server, calls, labels, tmp_path):  # noqa: F811
    a, b = labels[0], labels[1]
    manifest = _manifest(tmp_path / "m.csv", [
        {"path": calls["mulaw"], "label": a, "party": "customer"},
        {"path": calls["mulaw"], "label": b, "party": "agent"},
        {"path": calls["flac"], "label": a, "channel": "1"},
        {"path": calls["mono"], "label": b},  # no cell: the first party
        {"path": calls["three"], "label": a, "party": "customer"},  # 3 channels, 2 names
        {"path": calls["flac"], "label": a, "party": "boss"},
        {"path": calls["flac"], "label": a, "party": "customer", "channel": "1"},
    ])  # fmt: skip
    out = tmp_path / "report"
    done = subprocess.run(
        [*E2V, "evaluate", manifest, "--url", tiny_server.config.grpc_url, "--segment", "vad",
         "--aggregate", "mean", "--bootstrap", "0", "--group-by", "party", "--report", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 4, done.stderr  # rows failed
    with open(out / "predictions.csv", newline="") as f:
        predictions = {int(r["row"]): r for r in csv.DictReader(f)}
    split, _ = classify(tiny_server, [calls["mulaw"], calls["flac"], calls["mono"]],
                        "--parties", "customer,agent")  # fmt: skip
    expected = {
        1: split["call-mulaw.wav"]["parties"][0],
        2: split["call-mulaw.wav"]["parties"][1],
        3: split["call-flac.flac"]["parties"][1],
        4: split["mono.wav"]["parties"][0],
    }
    for row, party in expected.items():
        assert predictions[row]["prediction"] == party["emotion"]
        assert float(predictions[row]["confidence"]) == pytest.approx(party["confidence"], abs=1e-5)
    assert predictions[1]["prediction"] != "" and predictions[1]["party"] == "customer"
    assert predictions[5]["error_kind"] == "channels"
    assert "3 channels but 2 party name(s)" in predictions[5]["error"]
    assert predictions[6]["error_kind"] == "bad_party" and "'boss'" in predictions[6]["error"]
    assert (
        predictions[7]["error_kind"] == "bad_party"
        and "is channel 0, not 1" in predictions[7]["error"]
    )
    groups = json.loads((out / "metrics.json").read_text())["groups"]
    assert {k: v["files"] for k, v in groups.items()} == {"": 2, "agent": 1, "customer": 1}
    # the same manifest mixed is refused: its labels are per party
    mixed = subprocess.run([*E2V, "evaluate", manifest, "--channels", "mix", "--url",
                            tiny_server.config.grpc_url], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert mixed.returncode == 2 and "'party' column needs --channels split" in mixed.stderr


def test_train_head_embeds_the_party_of_each_row(tiny_server, calls, labels, tmp_path):  # noqa: F811
    """Whole-file and span rows of one party: the embeddings of that channel alone."""
    a, b = labels[0], labels[1]
    stereo = _manifest(tmp_path / "stereo.csv", [
        {"path": calls["mulaw"], "label": a, "party": "customer"},
        {"path": calls["mulaw"], "label": b, "party": "agent"},
        {"path": calls["flac"], "label": b, "channel": "1"},
    ])  # fmt: skip
    mono = _manifest(tmp_path / "mono.csv", [
        {"path": calls["mulaw-customer"], "label": a},
        {"path": calls["mulaw-agent"], "label": b},
        {"path": calls["flac-agent"], "label": b},
    ])  # fmt: skip
    parties = ("customer", "agent")
    split_rows = plan_rows(read_labelled(stereo), {}, parties)
    mono_rows = plan_rows(read_labelled(mono), {})
    assert [r.channel for r in split_rows] == [0, 1, 1]
    url = tiny_server.config.grpc_url

    async def run(rows, parties):
        async with TritonEmotionClient(url) as client:
            options = JobOptions(url=url, segment=SegmentMode("vad"), parties=parties)
            await embed_rows(rows, client, options, None)

    asyncio.run(run(split_rows, parties))
    asyncio.run(run(mono_rows, None))
    for mine, theirs in zip(split_rows, mono_rows):
        assert mine.error is None and theirs.error is None, (mine.error, theirs.error)
        assert mine.embedded.embeddings.shape == theirs.embedded.embeddings.shape
        assert len(mine.embedded.embeddings) > 1
        assert np.abs(mine.embedded.embeddings - theirs.embedded.embeddings).max() <= 1e-5
        assert np.allclose(mine.embedded.bounds, theirs.embedded.bounds, atol=1e-5)
    # a labelled span of the agent's channel is that span of the agent's file
    span = tmp_path / "span.csv"
    span.write_text(f"path,label,party,start,end\n{calls['mulaw']},{b},agent,2,9\n"
                    f"{calls['mono']},{b},agent,0,1\n")  # fmt: skip
    alone = tmp_path / "alone.csv"
    alone.write_text(f"path,label,start,end\n{calls['mulaw-agent']},{b},2,9\n")
    span_rows = plan_rows(read_labelled(span), {}, parties)
    alone_rows = plan_rows(read_labelled(alone), {})
    asyncio.run(run(span_rows, parties))
    asyncio.run(run(alone_rows, None))
    assert (
        np.abs(span_rows[0].embedded.embeddings - alone_rows[0].embedded.embeddings).max() <= 1e-5
    )
    assert span_rows[1].error_kind == "channels"  # a mono file has no agent channel
