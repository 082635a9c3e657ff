"""`e2v evaluate`: labelled-set reader, label matching, vote aggregation, metrics, and the
whole command against a real tritonserver on real encoded files.

The served model is synthetic (random weights), so no test asserts what it predicts:
every metric is checked against scikit-learn recomputed from the report's own
predictions.csv, and every prediction against `e2v classify` on the same files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import audio_fixtures as fx
import numpy as np
import pytest
from e2v.client.evaluation import DatasetError, read_labelled
from e2v.client.evaluation.labels import LabelError, LabelMatcher, parse_map
from e2v.client.evaluation.metrics import evaluate_method, intervals
from e2v.client.evaluation.report import csv_safe
from e2v.client.evaluation.run import parse_methods
from e2v.client.results import FileResult, SegmentResult, by_vote
from e2v.export.config_template import PUBLISHED_LABELS
from servers import free_ports
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
)

BOOTSTRAP = "200"
# Scores of one clip differ by up to 1e-5 with the other clips Triton batches it with.
BATCH_TOL = 2e-5
MAP = "scared=fearful"
REPORT_FILES = (
    "report.md",
    "metrics.json",
    "predictions.csv",
    "confusion_matrix.png",
    "reliability.png",
    "thresholds.png",
)


def e2v(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "e2v", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def calm(seconds: float, seed: int) -> np.ndarray:
    return fx.speech_like(seconds, seed=seed)


def tense(seconds: float, seed: int) -> np.ndarray:
    """Speech with a loud high tone: still speech to the VAD, scored differently by the
    synthetic model, so predictions vary and the bootstrap has something to resample."""
    return (
        0.5 * fx.speech_like(seconds, seed=seed) + fx.tone(seconds, 5000, amplitude=0.2)
    ).astype(np.float32)


# ---------------------------------------------------------------------------- data set


def write_manifest(path: Path, rows: list[list[str]], bom: bool = True) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    path.write_text(("\ufeff" if bom else "") + buffer.getvalue(), encoding="utf-8")
    return path


def test_csv_manifest_bom_crlf_extra_columns_and_row_problems(tmp_path):
    (tmp_path / "clips").mkdir()
    fx.write_audio(tmp_path / "clips" / "a.wav", fx.tone(0.5))
    os.mkfifo(tmp_path / "clips" / "pipe.wav")
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            ["Path", " LABEL ", "speaker"],
            ["clips/a.wav", " Angry ", "s1"],
            ["clips/missing.wav", "sad", "s2"],
            ["clips/pipe.wav", "sad", "s2"],
            ["", "sad", "s2"],
            ["clips/a.wav", "", "s1"],
            ["./clips/a.wav", "happy", "s3"],
            ["", "", ""],  # blank line: skipped
            ["clips/b.wav", "", "s1"],
            ["clips/b.wav", "sad", "s1"],  # the first usable row of b.wav
        ],
    )
    fx.write_audio(tmp_path / "clips" / "b.wav", fx.tone(0.5))
    data = read_labelled(manifest)  # the FIFO row must not block
    assert data.kind == "csv" and data.columns == ["path", "label", "speaker"]
    first, missing, pipe, no_path, no_label, again, b_empty, b_good = data.items
    assert b_empty.error == "empty label cell" and b_good.usable and b_good.row == 8
    assert first.row == 1 and first.label == "Angry" and first.usable
    assert first.path == str(tmp_path / "clips" / "a.wav") and first.fields["speaker"] == "s1"
    assert missing.error_kind == "not_found" and "missing.wav" in missing.error
    assert pipe.error_kind == "unreadable" and "not a regular file" in pipe.error
    assert no_path.error == "empty path cell" and no_label.error == "empty label cell"
    assert again.duplicate_of == 1 and not again.usable and again.error is None


def test_jsonl_manifest_and_folders(tmp_path):
    fx.write_audio(tmp_path / "x.wav", fx.tone(0.5))
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"path": "x.wav", "label": "happy", "speaker": 7},
        {},
        {"path": str(tmp_path / "x.wav"), "label": "sad", "meta": {"a": 1}},
    ]
    manifest.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n")
    data = read_labelled(manifest)
    assert [i.label for i in data.items] == ["happy", "sad"]
    assert data.items[0].fields["speaker"] == "7" and data.items[1].fields["meta"] == '{"a": 1}'
    assert data.items[1].duplicate_of == 1

    root = tmp_path / "folders"
    for label, name in (("angry", "a.wav"), ("angry", "sub/b.flac"), ("Neutral", "c.wav")):
        (root / label / name).parent.mkdir(parents=True, exist_ok=True)
        fx.write_audio(root / label / name, fx.tone(0.5))
    (root / "sad").mkdir()
    fx.write_audio(root / "stray.wav", fx.tone(0.5))
    (root / "angry" / "notes.txt").write_text("not audio")
    folders = read_labelled(root)
    assert folders.kind == "folders"
    assert [(i.label, i.fields["path"]) for i in folders.items] == [
        ("Neutral", "Neutral/c.wav"),
        ("angry", "angry/a.wav"),
        ("angry", "angry/sub/b.flac"),
    ]
    assert any("'sad' has no audio" in w for w in folders.warnings)
    assert any("stray.wav" in w for w in folders.warnings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"path,label\r\n", "no rows"),
        (b"path,emotion\nx.wav,angry\n", "no 'label' column (found: 'path', 'emotion')"),
        (b"file,label\nx.wav,angry\n", "no 'path' column"),
        (b"path,label\nx.wav,caf\xe9\n", "not UTF-8 (byte 0xe9"),
        (b"path,label\nx.wav,angry,extra\n", "line 2: 3 fields, the header has 2"),
        (b"path,label\nx.wav,an\x00gry\n", "NUL bytes"),
        (b"path,path,label\nx,y,angry\n", "repeated column"),
    ],
)
def test_unusable_csv_manifests_say_why(tmp_path, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_labelled(manifest)


def test_unusable_sources_and_limits(tmp_path):
    bad_json = tmp_path / "m.jsonl"
    bad_json.write_text('{"path": "a.wav", "label": "x"}\n{"path": \n')
    with pytest.raises(DatasetError, match="line 2: not valid JSON"):
        read_labelled(bad_json)
    bad_json.write_text('["a.wav", "x"]\n')
    with pytest.raises(DatasetError, match="line 1: expected a JSON object"):
        read_labelled(bad_json)
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(DatasetError, match="not a regular file"):
        read_labelled(tmp_path / "fifo.csv")  # must not block
    with pytest.raises(DatasetError, match="must end in .csv or .jsonl"):
        read_labelled(Path("/dev/null"))
    with pytest.raises(DatasetError, match="no such manifest"):
        read_labelled(tmp_path / "nope.csv")
    big = write_manifest(tmp_path / "big.csv", [["path", "label"]] + [["a.wav", "x"]] * 50)
    with pytest.raises(DatasetError, match="larger than"):
        read_labelled(big, max_bytes=100)
    with pytest.raises(DatasetError, match="50 rows exceed the limit of 10"):
        read_labelled(big, max_rows=10)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="no label sub-folders"):
        read_labelled(tmp_path / "empty_dir")


# ---------------------------------------------------------------------------- labels


def test_labels_match_in_every_model_form_and_map():
    matcher = LabelMatcher(
        list(PUBLISHED_LABELS) + ["unuse_0"], parse_map(" Anger = 生气 ,joy=HAPPY")
    )
    assert "<unk>" not in matcher.labels and "unuse_0" not in matcher.labels
    for text in ("angry", "ANGRY", "生气/angry", "生气", " Angry "):
        assert matcher(text) == "angry"
    assert matcher("anger") == "angry" and matcher("Joy") == "happy"
    assert matcher("<unk>") is None and matcher("unuse_0") is None and matcher("fury") is None
    with pytest.raises(LabelError, match="unknown --map target 'furious'"):
        LabelMatcher(list(PUBLISHED_LABELS), parse_map("anger=furious"))
    with pytest.raises(LabelError, match="unknown --map target '<unk>'"):
        LabelMatcher(list(PUBLISHED_LABELS), parse_map("x=<unk>"))
    for bad in ("anger", "=angry", "anger="):
        with pytest.raises(LabelError, match="expected SRC=DST"):
            parse_map(bad)


def test_parse_methods():
    names = [m.name for m in parse_methods("vad, fixed:1.5", "both")]
    assert names == ["vad/mean", "vad/vote", "fixed:1.5/mean", "fixed:1.5/vote"]
    assert parse_methods("fixed:1.5", "vote")[0].slug == "fixed1p5_vote"
    for segments, aggregate in (("", "mean"), ("vad", "median"), ("fixed:0", "mean")):
        with pytest.raises(ValueError):
            parse_methods(segments, aggregate)


# ---------------------------------------------------------------------------- vote


def _file(segment_scores: list[dict[str, float]]) -> FileResult:
    segments = [
        SegmentResult(float(i), float(i + 1), scores, np.zeros(4))
        for i, scores in enumerate(segment_scores)
    ]
    labels = list(segment_scores[0])
    mean = {k: float(np.mean([s[k] for s in segment_scores])) for k in labels}
    best = max((k for k in labels if k != "<unk>"), key=mean.get)
    return FileResult("f.wav", 3.0, best, mean[best], mean, segments)


def test_vote_is_the_majority_of_segments_and_ties_go_to_the_higher_mean():
    fear = {"angry": 0.3, "fearful": 0.4, "<unk>": 0.3}
    rage = {"angry": 0.95, "fearful": 0.05, "<unk>": 0.0}
    result = _file([fear, fear, rage])
    assert result.emotion == "angry"  # the mean favours the one strong segment
    voted = by_vote(result)
    assert voted.emotion == "fearful" and voted.votes == {"fearful": 2, "angry": 1}
    assert voted.confidence == result.scores["fearful"]
    assert voted.to_json()["votes"] == {"fearful": 2, "angry": 1}
    assert "votes" not in result.to_json()

    tie = by_vote(_file([fear, rage]))  # one vote each: the higher mean score wins
    assert tie.emotion == "angry" and tie.votes == {"angry": 1, "fearful": 1}

    unk = {"angry": 0.2, "fearful": 0.1, "<unk>": 0.7}
    assert by_vote(_file([unk, unk, fear])).votes == {"angry": 2, "fearful": 1}
    error = FileResult("x.wav", error="boom")
    assert by_vote(error) is error


# ---------------------------------------------------------------------------- metrics


def test_metrics_equal_sklearn_and_the_bootstrap_follows_the_seed():
    rng = np.random.default_rng(5)
    order = ["angry", "fearful", "happy", "neutral", "sad"]
    y_true = rng.choice(order[:4], 60).tolist()
    y_pred = [t if rng.random() < 0.6 else rng.choice(order) for t in y_true]
    confidence = rng.uniform(0.3, 1.0, 60).round(6).tolist()
    m = evaluate_method(y_true, y_pred, confidence, order, resamples=200, seed=0)
    classes = order[:4]
    assert m["classes"] == classes
    assert m["wa"]["value"] == accuracy_score(y_true, y_pred)
    assert m["ua"]["value"] == recall_score(y_true, y_pred, labels=classes, average="macro")
    assert m["macro_f1"]["value"] == f1_score(y_true, y_pred, labels=classes, average="macro")
    assert list(m["per_class"]) == order  # "sad" only predicted: support 0
    assert m["per_class"]["sad"]["support"] == 0

    t, p = np.array(y_true, dtype=object), np.array(y_pred, dtype=object)
    again = intervals(t, p, classes, order, 200, seed=0)
    other = intervals(t, p, classes, order, 200, seed=1)
    assert (
        again["wa"] == m["wa"]["ci"]
        and again["per_class"]["angry"]["f1"] == (m["per_class"]["angry"]["f1"]["ci"])
    )
    assert other["wa"] != again["wa"] or other["ua"] != again["ua"]
    assert m["wa"]["ci"][0] < m["wa"]["value"] < m["wa"]["ci"][1]


def test_csv_safe_neutralises_formulas():
    for cell in ("=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert csv_safe(cell) == "'" + cell
    for cell in ("angry", "0.5", "clips/a.wav", ""):
        assert csv_safe(cell) == cell


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, Path]:
    """A labelled set as a call centre would send it: a manifest with mixed-case and
    `中文/english` labels, a missing, a corrupt and a FIFO file, a label the model lacks,
    a duplicate, an empty label, a formula; and the same kind of set as label folders."""
    root = tmp_path_factory.mktemp("labelled")
    clips = root / "clips"
    clips.mkdir()
    signals = {
        "a0": calm(2.2, 0),
        "a1": calm(3.4, 1),
        "a2": tense(1.6, 2),
        "f0": tense(2.5, 3),
        "f1": tense(3.6, 4),
        "f2": calm(1.8, 5),
        "n0": calm(2.0, 6),
        "n1": tense(2.8, 7),
        "x0": calm(1.5, 8),
        "x1": tense(1.5, 9),
    }
    for name, wav in signals.items():
        fx.write_audio(clips / f"{name}.wav", wav)
    fx.write_audio(clips / "quiet.wav", fx.silence(2.0))
    fx.write_random_bytes(clips / "bad.wav")
    os.mkfifo(clips / "pipe.wav")
    rows = [
        ["path", "label", "speaker"],
        ["clips/a0.wav", "Angry", "spk0"],
        ["clips/a1.wav", "生气/angry", "spk1"],
        ["clips/a2.wav", "ANGRY", "spk0"],
        ["clips/f0.wav", "fearful", "spk1"],
        ["clips/f1.wav", "恐惧/Fearful", "spk0"],
        ["clips/f2.wav", "Scared", "spk1"],  # --map scared=fearful
        ["clips/n0.wav", "neutral", "spk0"],
        ["clips/n1.wav", "中立/neutral", "spk1"],
        ["clips/x0.wav", "frustrated", "spk0"],  # the model lacks it
        ["clips/bad.wav", "angry", "spk1"],
        ["clips/missing.wav", "sad", "spk0"],
        ["clips/pipe.wav", "sad", "spk1"],
        ["clips/a0.wav", "angry", "spk0"],  # duplicate of row 1
        ["clips/n0.wav", "", "spk0"],  # empty label
        ["clips/x1.wav", "=1+2", "spk1"],  # a formula, and a label the model lacks
        ["clips/quiet.wav", "sad", "spk0"],  # no speech: left out, not invented
    ]
    manifest = write_manifest(root / "manifest.csv", rows)

    folders = root / "folders"
    for label, name, wav in (
        ("angry", "a.wav", calm(2.0, 10)),
        ("angry", "b.flac", tense(2.0, 11)),
        ("FEARFUL", "c.wav", tense(2.2, 12)),
        ("neutral", "d.ogg", calm(1.7, 13)),
    ):
        (folders / label).mkdir(parents=True, exist_ok=True)
        fx.write_audio(folders / label / name, wav)
    return {"root": root, "manifest": manifest, "folders": folders}


@pytest.fixture(scope="module")
def report(tiny_server, labelled, tmp_path_factory) -> dict:
    """`e2v evaluate` on the manifest with every aggregation method (the default)."""
    out = tmp_path_factory.mktemp("report") / "report"
    result = e2v(
        "evaluate",
        str(labelled["manifest"]),
        "--url",
        tiny_server.config.grpc_url,
        "--map",
        MAP,
        "--group-by",
        "speaker",
        "--report",
        str(out),
        "--bootstrap",
        BOOTSTRAP,
        "--seed",
        "0",
    )
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    return {
        "result": result,
        "dir": out,
        "metrics": json.loads((out / "metrics.json").read_text(encoding="utf-8")),
        "predictions": predictions,
        "markdown": (out / "report.md").read_text(encoding="utf-8"),
    }


def test_evaluate_writes_every_artefact_and_lists_every_problem(report):
    result, metrics, rows = report["result"], report["metrics"], report["predictions"]
    assert result.returncode == 4, result.stderr  # files failed: classify's bit flag
    for name in REPORT_FILES:
        data = (report["dir"] / name).read_bytes()
        assert data, name
        if name.endswith(".png"):
            assert data.startswith(b"\x89PNG")
    first_line = report["markdown"].splitlines()[0]
    assert "SYNTHETIC" in first_line and "meaningless" in first_line
    assert metrics["synthetic"] is True and "meaningless" in metrics["note"]
    assert "SYNTHETIC" in result.stdout.splitlines()[0]

    assert [int(r["row"]) for r in rows] == list(range(1, 17))  # one row per manifest row
    assert rows[0]["speaker"] == "spk0"  # extra columns kept
    by_row = {int(r["row"]): r for r in rows}
    assert {by_row[n]["label_model"] for n in (1, 2, 3)} == {"angry"}
    assert {by_row[n]["label_model"] for n in (4, 5, 6)} == {"fearful"}
    failed = {n: by_row[n]["error"] for n in (10, 11, 12, 14)}
    assert "cannot decode" in failed[10] and "file not found" in failed[11]
    assert "not a regular file" in failed[12] and failed[14] == "empty label cell"
    assert "label not in the model: 'frustrated'" in by_row[9]["excluded"]
    assert by_row[13]["excluded"].startswith("duplicate of row 1")
    assert by_row[15]["label"] == "'=1+2"  # neutralised for spreadsheets
    assert by_row[16]["excluded"] == "no speech found"
    data = metrics["data"]
    assert (data["rows"], data["scored"], data["failed"], data["excluded"]) == (16, 8, 4, 4)
    assert data["unknown_labels"] == {"frustrated": 1, "=1+2": 1}
    markdown = report["markdown"]
    for text in ("bad.wav", "missing.wav", "pipe.wav", "empty label cell", "`frustrated` (1)"):
        assert text in markdown
    for method in ("vad/mean", "vad/vote", "fixed:3/mean", "fixed:3/vote"):
        assert f"| `{method}` | 8 |" in markdown
    assert "## By speaker" in markdown and "| spk0 |" in markdown


def _recompute(rows, labels, prediction, confidence):
    scored = [r for r in rows if not r["excluded"] and not r["error"]]
    y_true = [r["label_model"] for r in scored]
    y_pred = [r[prediction] for r in scored]
    conf = np.array([float(r[confidence]) for r in scored])
    classes = [label for label in labels if label in set(y_true)]
    shown = classes + [label for label in labels if label in set(y_pred) - set(y_true)]
    return y_true, y_pred, conf, classes, shown


@pytest.mark.parametrize(
    ("method", "prediction", "confidence"),
    [
        ("vad/mean", "prediction", "confidence"),
        ("vad/vote", "prediction_vad_vote", "confidence_vad_vote"),
        ("fixed:3/mean", "prediction_fixed3_mean", "confidence_fixed3_mean"),
        ("fixed:3/vote", "prediction_fixed3_vote", "confidence_fixed3_vote"),
    ],
)
def test_metrics_equal_sklearn_recomputed_from_predictions_csv(
    report, method, prediction, confidence
):
    m = report["metrics"]["methods"][method]
    y_true, y_pred, conf, classes, shown = _recompute(
        report["predictions"], report["metrics"]["labels"], prediction, confidence
    )
    assert m["files"] == len(y_true) == 8 and m["classes"] == classes
    assert m["wa"]["value"] == accuracy_score(y_true, y_pred)
    assert m["ua"]["value"] == recall_score(
        y_true, y_pred, labels=classes, average="macro", zero_division=0
    )
    assert m["macro_f1"]["value"] == f1_score(
        y_true, y_pred, labels=classes, average="macro", zero_division=0
    )
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=shown, zero_division=0
    )
    for i, label in enumerate(shown):
        got = m["per_class"][label]
        assert (got["precision"]["value"], got["recall"]["value"], got["f1"]["value"]) == (
            precision[i],
            recall[i],
            f1[i],
        )
        assert got["support"] == support[i]
        assert got["recall"]["ci"] is not None
    assert m["confusion"]["counts"] == confusion_matrix(y_true, y_pred, labels=shown).tolist()
    for row in m["thresholds"]:
        kept = conf >= row["threshold"]
        assert row["coverage"] == kept.mean()
        if kept.any():
            expected = accuracy_score(np.array(y_true)[kept], np.array(y_pred)[kept])
            assert row["accuracy"] == expected
    correct = np.array(y_true) == np.array(y_pred)
    bins = np.digitize(conf, np.linspace(0, 1, 11)[1:-1], right=True)
    ece = sum(
        (bins == b).mean() * abs(correct[bins == b].mean() - conf[bins == b].mean())
        for b in set(bins.tolist())
    )
    assert m["calibration"]["ece"] == pytest.approx(ece, abs=1e-12)


def test_bootstrap_is_not_degenerate_and_groups_are_scored(report):
    """The synthetic model's predictions vary within a class here, so the seed matters."""
    m = report["metrics"]["methods"]["vad/mean"]
    assert m["wa"]["ci"][0] < m["wa"]["ci"][1]
    groups = report["metrics"]["groups"]
    rows = [r for r in report["predictions"] if not r["excluded"] and not r["error"]]
    for speaker in ("spk0", "spk1"):
        mine = [r for r in rows if r["speaker"] == speaker]
        assert groups[speaker]["files"] == len(mine)
        assert groups[speaker]["wa"]["value"] == accuracy_score(
            [r["label_model"] for r in mine], [r["prediction"] for r in mine]
        )


def test_same_seed_same_intervals_over_http(report, tiny_server, labelled, tmp_path):
    """A rerun with one method, over HTTP, reproduces that method's numbers exactly."""
    result = e2v(
        "evaluate",
        str(labelled["manifest"]),
        "--url",
        tiny_server.config.http_url,
        "--protocol",
        "http",
        "--segment",
        "vad",
        "--aggregate",
        "mean",
        "--map",
        MAP,
        "--group-by",
        "speaker",
        "--report",
        str(tmp_path),
        "--bootstrap",
        BOOTSTRAP,
        "--seed",
        "0",
    )
    assert result.returncode == 4, result.stderr
    again = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert list(again["methods"]) == ["vad/mean"]
    mine, theirs = again["methods"]["vad/mean"], report["metrics"]["methods"]["vad/mean"]
    # Everything computed from labels is identical, intervals included ...
    for key in ("wa", "ua", "macro_f1", "per_class", "confusion", "classes", "files"):
        assert mine[key] == theirs[key], key
    assert again["groups"] == report["metrics"]["groups"]
    # ... and confidences agree to the batching tolerance.
    assert mine["calibration"]["ece"] == pytest.approx(theirs["calibration"]["ece"], abs=BATCH_TOL)


@pytest.mark.parametrize(
    ("options", "suffix"),
    [((), ""), (("--segment", "fixed:3", "--aggregate", "vote"), "_fixed3_vote")],
)
def test_predictions_equal_classify_json(report, tiny_server, options, suffix):
    """Same files through `e2v classify --json` give the same labels and confidences."""
    rows = [r for r in report["predictions"] if "not a regular file" not in r["error"]]
    files = sorted({r["file"] for r in rows})  # a FIFO would block any reader: left out
    result = e2v(
        "classify",
        *files,
        "--url",
        tiny_server.config.grpc_url,
        "--json",
        "--no-progress",
        *options,
    )
    classified = {row["file"]: row for row in map(json.loads, result.stdout.splitlines())}
    for row in rows:
        theirs = classified[row["file"]]
        if "error" in theirs:
            assert row["error"] and not row["prediction" + suffix]
            continue
        assert row["prediction" + suffix] == (theirs["emotion"] or "")  # None: no speech
        if theirs["confidence"] is None:
            assert row["confidence" + suffix] == ""
        else:
            ours = float(row["confidence" + suffix])
            assert ours == pytest.approx(theirs["confidence"], abs=BATCH_TOL)
    assert any("votes" in row for row in classified.values()) == bool(options)


def test_label_folders_end_to_end(tiny_server, labelled, tmp_path):
    result = e2v(
        "evaluate",
        str(labelled["folders"]),
        "--url",
        tiny_server.config.grpc_url,
        "--segment",
        "vad",
        "--aggregate",
        "mean",
        "--bootstrap",
        "0",
        "--report",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["data"]["kind"] == "folders" and metrics["data"]["scored"] == 4
    assert metrics["methods"]["vad/mean"]["wa"]["ci"] is None
    assert "vad/mean" in result.stdout


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the manifest is empty"),
        (b"path,label\n", "the manifest has no rows"),
        (b"path,emotion\nclip.wav,angry\n", "no 'label' column"),
        (b"path,label\nclip.wav,w\xfctend\n", "not UTF-8"),
    ],
)
def test_unusable_manifest_exits_2_before_connecting(tmp_path, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    port = free_ports(1)[0]
    result = e2v("evaluate", str(manifest), "--url", f"127.0.0.1:{port}", timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_arguments_exit_2(tiny_server, labelled):
    url = tiny_server.config.grpc_url
    manifest = str(labelled["manifest"])
    cases = [
        (("--map", "scared=terrified"), "unknown --map target 'terrified'"),
        (("--map", "scared"), "expected SRC=DST"),
        (("--group-by", "region"), "--group-by 'region': no such column"),
        (("--segment", "fixed:0"), "fixed window"),
        (("--bootstrap", "-1"), "--bootstrap must be"),
    ]
    unknown = write_manifest(
        labelled["root"] / "unknown.csv", [["path", "label"], ["clips/a0.wav", "frustrated"]]
    )
    result = e2v("evaluate", str(unknown), "--url", url, timeout=120)
    assert result.returncode == 2 and "none of the data's labels (frustrated)" in result.stderr
    for options, message in cases:
        result = e2v("evaluate", manifest, "--url", url, *options, timeout=120)
        assert result.returncode == 2, (options, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr


def test_unreachable_server_exits_3(labelled):
    port = free_ports(1)[0]
    result = e2v(
        "evaluate",
        str(labelled["manifest"]),
        "--url",
        f"127.0.0.1:{port}",
        "--retries",
        "1",
        timeout=120,
    )
    assert result.returncode == 3
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
