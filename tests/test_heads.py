"""Custom heads: `e2v train-head`, the exported head and ensemble, `e2v serve --hot-add`,
and `--labels`, against a real tritonserver (`e2v serve`) on real WAV files.

The served model is synthetic:tiny (seeded random weights). The labelled sets are sound
classes that its embeddings separate (hum, noise, clicks, formant speech:
loadtest/sounds.py), so a head trained on them must beat chance by far; no test asserts
an emotion.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from e2v.client.heads.cache import Embedded, EmbeddingCache
from e2v.client.heads.embed import parse_span, plan_rows
from e2v.client.results import resolve_labels, restrict_scores
from e2v.export.heads import (
    BaseModel,
    HeadExportError,
    check_labels,
    check_name,
    export_head,
    from_sklearn,
    head_onnx,
    parse_config,
    render_ensemble_config,
    render_head_config,
)
from e2v.loadtest.sounds import CLASSES, sound, write_labelled_set, write_wav
from servers import free_ports

from e2v.contract import ADMIN_KEY_HEADER, HEAD_EMBEDDING_OUTPUT

BOOTSTRAP = "100"
CHANCE = 1 / len(CLASSES)


def e2v(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "e2v", *args], capture_output=True, text=True, timeout=timeout
    )


def fitted(kind: str, classes: int, dim: int = 16, seed: int = 0, activation: str = "relu"):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    y = np.array([f"c{i % classes}" for i in range(120)])
    x = rng.standard_normal((120, dim)) + (np.arange(120) % classes)[:, None] * 0.7
    model = (
        LogisticRegression(max_iter=1000)
        if kind == "logistic"
        else MLPClassifier((8,), activation=activation, max_iter=200, random_state=0)
    )
    return Pipeline([("scale", StandardScaler()), ("head", model)]).fit(x, y), x


def tiny_base(repo: Path) -> BaseModel:
    """The BaseModel of the tiny cpu export in `repo`, read from its config file."""
    config = parse_config((repo / "emotion2vec" / "config.pbtxt").read_text())
    params = {k: v.string_value for k, v in config.parameters.items()}
    return BaseModel(
        name="emotion2vec",
        version=1,
        embed_dim=int(config.output[-1].dims[0]),
        max_batch_size=config.max_batch_size,
        synthetic=params["synthetic"] == "true",
        source=params["source"],
        checkpoint_sha256=params["checkpoint_sha256"],
        length_buckets_s=params["length_buckets_s"],
        backend=config.backend,
    )


def numpy_head(onnx_path: Path, embeddings: np.ndarray) -> np.ndarray:
    """The exported head applied in numpy, from the arrays inside its ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h = (embeddings.astype(np.float64) - arrays["mean"]) / arrays["scale"]
    layers = sum(name.startswith("w") for name in arrays)
    for i in range(layers):
        h = h @ arrays[f"w{i}"] + arrays[f"b{i}"]
        if i < layers - 1:
            h = np.maximum(h, 0.0)
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------- offline


@pytest.mark.parametrize(
    "kind,classes,activation",
    [("logistic", 2, ""), ("logistic", 4, ""), ("mlp", 2, "relu"), ("mlp", 5, "tanh")],
)
def test_onnx_head_equals_scikit_learn(kind, classes, activation):
    import onnxruntime as ort

    pipeline, x = fitted(kind, classes, activation=activation or "relu")
    weights = from_sklearn(pipeline, kind)
    assert weights.labels == tuple(pipeline.classes_)
    np.testing.assert_allclose(weights.predict_proba(x), pipeline.predict_proba(x), atol=1e-12)
    session = ort.InferenceSession(head_onnx(weights).SerializeToString())
    x32 = x.astype(np.float32)
    scores, passed = session.run(None, {"EMBEDDING": x32})
    assert np.abs(scores - pipeline.predict_proba(x32.astype(np.float64))).max() <= 1e-6
    assert np.array_equal(passed, x32)  # EMBEDDING_OUT is the input, bit for bit
    assert [o.name for o in session.get_outputs()] == ["SCORES", HEAD_EMBEDDING_OUTPUT]


def test_head_and_ensemble_configs_parse_for_both_targets(tiny_cpu_repo):
    pipeline, _ = fitted("logistic", 3, dim=64)
    weights = from_sklearn(pipeline, "logistic")
    base = tiny_base(tiny_cpu_repo)
    cpu = parse_config(render_head_config("head_x", weights, base, "cpu", "emotion2vec_x", "f"))
    gpu = parse_config(render_head_config("head_x", weights, base, "gpu", "emotion2vec_x", "f"))
    assert (cpu.backend, cpu.instance_group[0].kind) == ("python", 2)  # KIND_CPU
    assert (gpu.backend, gpu.instance_group[0].kind) == ("onnxruntime", 1)  # KIND_GPU
    assert gpu.default_model_filename == "model.onnx"
    assert cpu.parameters["onnx_file"].string_value == "model.onnx"
    assert [list(o.dims) for o in cpu.output] == [[3], [64]]
    ensemble = parse_config(render_ensemble_config("emotion2vec_x", "head_x", weights, base, "vad"))
    assert ensemble.platform == "ensemble"
    assert ensemble.max_batch_size == base.max_batch_size <= cpu.max_batch_size
    scores, embedding = ensemble.output
    assert (scores.name, scores.label_filename, list(scores.dims)) == ("SCORES", "labels.txt", [3])
    assert (embedding.name, list(embedding.dims)) == ("EMBEDDING", [64])
    first, second = ensemble.ensemble_scheduling.step
    assert (first.model_name, first.model_version) == ("emotion2vec", 1)
    assert dict(second.output_map) == {"SCORES": "SCORES", HEAD_EMBEDDING_OUTPUT: "EMBEDDING"}
    params = {k: v.string_value for k, v in ensemble.parameters.items()}
    assert params["synthetic"] == "true"  # what clients read, as from the base model
    assert params["length_buckets_s"] == base.length_buckets_s
    assert params["checkpoint_sha256"] == base.checkpoint_sha256


def test_names_and_labels_are_checked():
    for bad in ("", "Upper", "has space", "../up", "-dash", "x" * 49):
        with pytest.raises(HeadExportError):
            check_name(bad)
    check_name("calls_v2-fr")
    for labels in (["one"], ["a/b", "c"], ["ok", "<unk>"], ["ok", "line\nbreak"], ["ok", " pad"]):
        with pytest.raises(HeadExportError):
            check_labels(labels)
    check_labels(["frustrated", "satisfied", "escalation risk"])


def test_export_refuses_a_head_for_another_embedding_size(tiny_cpu_repo, tmp_path):
    pipeline, x = fitted("logistic", 2, dim=16)
    with pytest.raises(HeadExportError, match="16-dim"):
        export_head(
            tmp_path,
            "x",
            from_sklearn(pipeline, "logistic"),
            tiny_base(tiny_cpu_repo),
            "cpu",
            "vad",
            {},
            x,
        )
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_labels_restriction_is_a_renormalised_softmax():
    labels = ["生气/angry", "厌恶/disgusted", "开心/happy", "中立/neutral", "难过/sad", "<unk>"]
    keep = resolve_labels("Sad, angry,中立,happy", labels)
    assert keep == ("angry", "happy", "neutral", "sad")  # the model's order
    logits = np.array([1.5, -0.3, 0.2, 2.0, -1.0, 0.1])
    p = np.exp(logits) / np.exp(logits).sum()
    restricted = restrict_scores(
        {
            "angry": p[0],
            "disgusted": p[1],
            "happy": p[2],
            "neutral": p[3],
            "sad": p[4],
            "<unk>": p[5],
        },
        keep,
    )
    sub = logits[[0, 2, 3, 4]]
    np.testing.assert_allclose(list(restricted.values()), np.exp(sub) / np.exp(sub).sum())
    assert restrict_scores({"angry": 0.0, "sad": 0.0}, ("angry", "sad")) == {
        "angry": 0.5,
        "sad": 0.5,
    }
    with pytest.raises(ValueError, match="joy.*its labels: angry, disgusted"):
        resolve_labels("angry,joy", labels)
    with pytest.raises(ValueError, match="at least two"):
        resolve_labels("angry,ANGRY", labels)
    with pytest.raises(ValueError):
        resolve_labels("angry,<unk>", labels)


def test_spans_are_parsed_and_checked():
    assert parse_span("", " ") is None
    assert parse_span("1.5", "3") == (1.5, 3.0)
    for start, end in (("2", "1"), ("x", "1"), ("-1", "2"), ("0", "nan"), ("1", "1.01"), ("0", "")):
        with pytest.raises(ValueError):
            parse_span(start, end)


def test_cache_keys_roundtrip_corruption_and_bound(tmp_path):
    identity = {"name": "emotion2vec", "checkpoint_sha256": "abc", "embed_dim": 4}
    cache = EmbeddingCache(tmp_path, identity, max_bytes=10_000)
    key = cache.key("f" * 64, "vad", None)
    assert key != cache.key("e" * 64, "vad", None)  # other bytes
    assert key != cache.key("f" * 64, "fixed:3", None)  # other segmentation
    assert key != cache.key("f" * 64, "vad", (0.0, 1.0))  # a span
    other = EmbeddingCache(tmp_path, identity | {"checkpoint_sha256": "abd"})
    assert key != other.key("f" * 64, "vad", None)  # other weights
    entry = Embedded(np.ones((2, 4), np.float32), np.array([[0, 1], [1, 2.5]]), 2.5)
    assert cache.get(key, 4) is None
    cache.put(key, entry)
    got = cache.get(key, 4)
    assert np.array_equal(got.embeddings, entry.embeddings) and got.duration_s == 2.5
    path = next(tmp_path.glob("*/*.npz"))
    assert cache.get(key, 8) is None and cache.repaired == 1  # wrong shape: dropped
    assert not path.exists()
    for damage in (b"", b"PK\x03\x04 not a zip", None):
        cache.put(key, entry)
        if damage is None:  # a valid file stored under another key's name
            cache.put(cache.key("0" * 64, "vad", None), entry)
            shutil.copy(next(p for p in tmp_path.glob("*/*.npz") if p.stem != key), path)
        else:
            path.write_bytes(damage)
        assert cache.get(key, 4) is None and not path.exists()
    for i in range(40):  # ~1 KB each: the bound keeps about ten
        cache.put(cache.key(f"{i:064d}", "vad", None), entry)
    assert cache.prune() > 0
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.npz")) <= 10_000


def test_cross_validation_never_splits_a_group():
    from e2v.client.evaluation.dataset import LabelledItem
    from e2v.client.heads import train
    from e2v.client.heads.embed import Row

    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        label = CLASSES[i % 4]
        item = LabelledItem(i + 1, f"f{i}.wav", label, {"speaker": f"s{i % 5}"})
        vectors = rng.standard_normal((3, 8)) + CLASSES.index(label)
        embedded = Embedded(vectors.astype(np.float32), np.array([[0, 1], [1, 2], [2, 3]]), 3.0)
        rows.append(Row(item, label, embedded=embedded))
    data = train.samples(rows, "speaker")
    cv = train.cross_validate(data, "logistic", 5, "none", 0)
    for speaker in {f"s{i}" for i in range(5)}:
        folds = {
            cv.fold_of_row[i]
            for i, r in enumerate(data.rows)
            if r.item.fields["speaker"] == speaker
        }
        assert len(folds) == 1
    assert np.allclose(cv.probabilities.sum(axis=1), 1.0)
    with pytest.raises(train.TrainingError, match="at least 6 groups"):
        train.cross_validate(data, "logistic", 6, "none", 0)
    by_file = train.samples(rows, None)
    assert len(set(by_file.groups.tolist())) == 40


def test_plan_rows_spans_and_duplicates(tmp_path):
    from e2v.client.evaluation import read_labelled

    write_wav(tmp_path / "a.wav", sound("hum", 0, 2.0))
    (tmp_path / "m.csv").write_text(
        "path,label,start,end\na.wav,hum,0,1\na.wav,hum,0,1\na.wav,hum,1,2\na.wav,hum,,\n"
        "a.wav,hum,2,1\nmissing.wav,hum,,\n"
    )
    rows = plan_rows(read_labelled(tmp_path / "m.csv"), {"hum": "low"})
    assert [r.label for r in rows] == ["low"] * 6
    assert [r.span for r in rows[:4]] == [(0.0, 1.0), (0.0, 1.0), (1.0, 2.0), None]
    assert rows[1].excluded == "duplicate of row 1"
    assert rows[4].error_kind == "bad_span" and rows[5].error_kind == "not_found"


# ---------------------------------------------------------------------------- served


class Serve:
    """`e2v serve --hot-add` as a user runs it, on free loopback ports."""

    def __init__(self, repo: Path):
        self.http, self.grpc, metrics = free_ports()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "e2v",
                "serve",
                "--repo",
                str(repo),
                "--hot-add",
                "--http-port",
                str(self.http),
                "--grpc-port",
                str(self.grpc),
                "--metrics-port",
                str(metrics),
                "--instances",
                "1",
                "--threads",
                "1",
                "--poll-secs",
                "0.5",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_line("ready:", 240)
        key_path = Path(self.wait_line("admin key", 10).rsplit(": ", 1)[1].strip())
        self.key = key_path.read_text().strip()
        self.log = key_path.parent / "tritonserver.log"  # the random key is in the run dir

    def loads(self, model: str) -> int:
        """How many times Triton loaded `model` (its own log)."""
        return self.log.read_text().count(f"loading: {model}:")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {prefix!r} line; output:\n{''.join(self.lines)}")

    def ready(self, model: str) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http}/v2/models/{model}/ready"
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, model: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready(model):
            assert time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.2)

    def success_count(self, model: str) -> int:
        url = f"http://127.0.0.1:{self.http}/v2/models/{model}/stats"
        with urllib.request.urlopen(url, timeout=10) as response:
            stats = json.load(response)["model_stats"]
        return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def head_repo(tiny_cpu_repo, tmp_path_factory) -> Path:
    """The tiny cpu repository plus a head present at start-up ("pre", random weights)."""
    repo = tmp_path_factory.mktemp("heads") / "repo"
    shutil.copytree(tiny_cpu_repo, repo)
    pipeline, x = fitted("logistic", 3, dim=64, seed=1)
    export_head(
        repo,
        "pre",
        from_sklearn(pipeline, "logistic"),
        tiny_base(repo),
        "cpu",
        "none",
        None,
        x,
    )
    return repo


@pytest.fixture(scope="module")
def served(head_repo):
    server = Serve(head_repo)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sound_sets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sounds")
    train = write_labelled_set(root / "train", per_class=10, seed=0, speakers=5)
    held = write_labelled_set(root / "held", per_class=5, seed=1)
    return train, held


def _infer(url: str, model: str, clip: np.ndarray, outputs: list[str]):
    import tritonclient.grpc as grpcclient

    from e2v.contract import bucket_samples

    wav = np.zeros((1, bucket_samples(len(clip))), np.float32)
    wav[0, : len(clip)] = clip
    inputs = [
        grpcclient.InferInput("WAV", list(wav.shape), "FP32"),
        grpcclient.InferInput("WAV_LENS", [1, 1], "INT64"),
    ]
    inputs[0].set_data_from_numpy(wav)
    inputs[1].set_data_from_numpy(np.array([[len(clip)]], np.int64))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer(
            model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs]
        )
        return [result.as_numpy(n) for n in outputs]


def test_head_present_at_start_is_served_and_labels_come_from_triton(served):
    import asyncio

    from e2v.client.triton import TritonEmotionClient

    async def info():
        async with TritonEmotionClient(f"127.0.0.1:{served.grpc}", model="emotion2vec_pre") as c:
            return c.info

    found = asyncio.run(info())
    assert found.labels == ["c0", "c1", "c2"] and found.embed_dim == 64 and found.synthetic
    assert found.buckets[-1] == 480_000


def test_train_head_end_to_end(served, head_repo, sound_sets, tmp_path):
    train, held = sound_sets
    url = f"127.0.0.1:{served.grpc}"
    cache = tmp_path / "cache"
    base_before = served.success_count("emotion2vec")
    run = e2v(
        "train-head",
        str(train),
        "--url",
        url,
        "--name",
        "sounds",
        "--repo",
        str(head_repo),
        "--segment",
        "none",
        "--group-by",
        "speaker",
        "--cv",
        "5",
        "--cache-dir",
        str(cache),
        "--bootstrap",
        BOOTSTRAP,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith("SYNTHETIC MODEL")
    assert "0 hit(s), 40 miss(es)" in run.stderr
    ensemble = head_repo / "emotion2vec_sounds"
    card = json.loads((ensemble / "model_card.json").read_text())
    report = (ensemble / "cv" / "report.md").read_text()
    assert report.startswith("> **SYNTHETIC MODEL") and "5-fold cross-validation" in report
    assert (ensemble / "MODEL_CARD.md").read_text().startswith("> **SYNTHETIC BASE MODEL")
    assert (ensemble / "labels.txt").read_text().split() == sorted(CLASSES)
    assert card["data"]["groups"] == 5 and card["base_model"]["version"] == 1
    cv_wa = card["cross_validation"]["metrics"]["wa"]["value"]
    assert cv_wa >= 2.5 * CHANCE, card["cross_validation"]
    # One request per clip (--segment none), plus the client's label probe at connect.
    assert served.success_count("emotion2vec") - base_before == 40 + 1

    served.wait_ready("emotion2vec_sounds")
    result = e2v(
        "classify",
        str(held.parent),
        "--url",
        url,
        "--model",
        "emotion2vec_sounds",
        "--segment",
        "none",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    truth = {p.split(",")[0]: p.split(",")[1] for p in held.read_text().splitlines()[1:]}
    right = [r["emotion"] == truth[Path(r["file"]).name] for r in rows if "emotion" in r]
    assert len(right) == 20 and set(rows[0]["scores"]) == set(CLASSES)
    assert np.mean(right) >= cv_wa - 0.2, (np.mean(right), cv_wa)  # as often as CV says
    # Loading the ensemble did not reload the base model (a reload resets its statistics).
    assert served.success_count("emotion2vec") >= base_before + 41 + 21

    # Retraining (another head kind, another name) re-encodes nothing.
    before = served.success_count("emotion2vec")
    again = e2v(
        "train-head",
        str(train),
        "--url",
        url,
        "--name",
        "sounds-mlp",
        "--head",
        "mlp",
        "--repo",
        str(head_repo),
        "--segment",
        "none",
        "--group-by",
        "speaker",
        "--cv",
        "5",
        "--class-weight",
        "balanced",
        "--cache-dir",
        str(cache),
        "--bootstrap",
        "0",
    )
    assert again.returncode == 0, again.stderr
    assert "40 hit(s), 0 miss(es)" in again.stderr
    assert served.success_count("emotion2vec") == before + 1  # the label probe only
    served.wait_ready("emotion2vec_sounds-mlp")


def test_ensemble_scores_equal_the_head_in_numpy(served, head_repo):
    url = f"127.0.0.1:{served.grpc}"
    onnx_path = head_repo / "head_pre" / "1" / "model.onnx"
    for seed, label in enumerate(CLASSES):
        clip = sound(label, 100 + seed)
        scores, embedding = _infer(url, "emotion2vec_pre", clip, ["SCORES", "EMBEDDING"])
        (base_embedding,) = _infer(url, "emotion2vec", clip, ["EMBEDDING"])
        assert np.array_equal(embedding, base_embedding)
        assert np.abs(scores - numpy_head(onnx_path, embedding)).max() <= 1e-6
        # Either output alone (Triton prunes ensemble steps by the outputs requested).
        (alone,) = _infer(url, "emotion2vec_pre", clip, ["SCORES"])
        assert np.array_equal(alone, scores)
        (alone,) = _infer(url, "emotion2vec_pre", clip, ["EMBEDDING"])
        assert np.array_equal(alone, embedding)


def test_loads_need_the_admin_key(served):
    """Model control answers only the admin key; a load of an unchanged model is a no-op."""
    url = f"http://127.0.0.1:{served.http}/v2/repository/models/emotion2vec_pre/load"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, data=b"{}"), timeout=10)
    assert refused.value.code == 403
    before = served.success_count("emotion2vec")
    keyed = urllib.request.Request(url, data=b"{}", headers={ADMIN_KEY_HEADER: served.key})
    with urllib.request.urlopen(keyed, timeout=60) as response:
        assert response.status == 200
    after = served.success_count("emotion2vec")
    assert after == before, (before, after, served.loads("emotion2vec"), served.lines[-5:])
    assert served.loads("emotion2vec") == 1 and served.loads("emotion2vec_pre") == 1


def test_hot_add_under_load_fails_no_request(served, head_repo):
    """Real concurrent requests to the base model and to a served ensemble, without client
    retries, while a new head is published and loaded: none fails, and the base model is
    never reloaded (its success count, which a reload would reset, only grows)."""
    import tritonclient.grpc as grpcclient

    url = f"127.0.0.1:{served.grpc}"
    clips = [sound(label, 200 + i) for i, label in enumerate(CLASSES)]
    stop = threading.Event()
    done: list[str] = []
    failures: list[str] = []
    models = ["emotion2vec", "emotion2vec_pre"]

    def load(worker: int) -> None:
        with grpcclient.InferenceServerClient(url) as client:
            i = worker
            while not stop.is_set():
                model, clip = models[i % len(models)], clips[i % len(clips)]
                wav = np.zeros((1, 48_000), np.float32)
                wav[0, : min(len(clip), 48_000)] = clip[:48_000]
                inputs = [
                    grpcclient.InferInput("WAV", [1, 48_000], "FP32"),
                    grpcclient.InferInput("WAV_LENS", [1, 1], "INT64"),
                ]
                inputs[0].set_data_from_numpy(wav)
                inputs[1].set_data_from_numpy(np.array([[min(len(clip), 48_000)]], np.int64))
                try:
                    client.infer(model, inputs, client_timeout=60)
                    done.append(model)
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    failures.append(f"{model}: {exc}")
                i += 1

    base_before = served.success_count("emotion2vec")
    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(3)
        during = len(done)
        pipeline, x = fitted("mlp", 4, dim=64, seed=3)
        export_head(
            head_repo,
            "late",
            from_sklearn(pipeline, "mlp"),
            tiny_base(head_repo),
            "cpu",
            "none",
            None,
            x,
        )
        served.wait_ready("emotion2vec_late", timeout=120)
        models.append("emotion2vec_late")  # the new model joins the load at once
        time.sleep(3)
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)
    assert failures == [], failures[:5]
    assert "emotion2vec_late" in done and len(done) > during > 0
    served.wait_line("hot-add: loaded emotion2vec_late", 5)
    base_requests = len(done)  # each request (base or ensemble) runs the base model once
    assert served.success_count("emotion2vec") >= base_before + base_requests
    assert served.loads("emotion2vec") == 1 and served.loads("head_late") == 1
    # The MLP head (ReLU hidden layer) is exact too.
    scores, embedding = _infer(url, "emotion2vec_late", clips[0], ["SCORES", "EMBEDDING"])
    onnx_path = head_repo / "head_late" / "1" / "model.onnx"
    assert np.abs(scores - numpy_head(onnx_path, embedding)).max() <= 1e-6


def test_classify_labels_on_the_served_model(served, sound_sets):
    _, held = sound_sets
    url = f"127.0.0.1:{served.grpc}"
    clip = str(held.parent / "hum_1_0000.wav")
    full = e2v("classify", clip, "--url", url, "--segment", "none", "--json")
    part = e2v(
        "classify",
        clip,
        "--url",
        url,
        "--segment",
        "none",
        "--json",
        "--labels",
        "angry,Happy,neutral,sad",
        "--alert",
        "sad=0.99",
    )
    assert full.returncode == 0 and part.returncode in (0, 8), part.stderr
    p, q = json.loads(full.stdout)["scores"], json.loads(part.stdout)["scores"]
    keep = ["angry", "happy", "neutral", "sad"]
    assert list(q) == keep
    total = sum(p[k] for k in keep)
    np.testing.assert_allclose([q[k] for k in keep], [p[k] / total for k in keep], atol=2e-6)
    bad = e2v("classify", clip, "--url", url, "--labels", "angry,joy")
    assert bad.returncode == 2 and "its labels: angry, disgusted" in bad.stderr
    outside = e2v("classify", clip, "--url", url, "--labels", "angry,sad", "--alert", "happy=0.5")
    assert outside.returncode == 2


def test_labelled_spans_embed_the_span(served, tmp_path):
    """A `start,end` row is the embedding of that stretch of the file, as if sent alone."""
    import asyncio

    from e2v.client.audio import load_audio
    from e2v.client.classify import JobOptions
    from e2v.client.evaluation import read_labelled
    from e2v.client.heads.embed import embed_rows
    from e2v.client.segment import SegmentMode
    from e2v.client.triton import TritonEmotionClient

    hum, noise = sound("hum", 1, 2.0), sound("noise", 2, 1.5)
    write_wav(tmp_path / "call.wav", np.concatenate([hum, noise]))
    (tmp_path / "m.csv").write_text("path,label,start,end\ncall.wav,hum,0,2\ncall.wav,noise,2,9\n")
    rows = plan_rows(read_labelled(tmp_path / "m.csv"), {})
    url = f"127.0.0.1:{served.grpc}"

    async def run():
        async with TritonEmotionClient(url) as client:
            await embed_rows(rows, client, JobOptions(url=url, segment=SegmentMode("none")), None)

    asyncio.run(run())
    assert [r.error for r in rows] == [None, None]
    assert rows[1].embedded.duration_s == pytest.approx(1.5, abs=1e-3)  # cut at the end
    assert rows[1].embedded.bounds.tolist() == [[2.0, 3.5]]
    audio = load_audio(tmp_path / "call.wav")
    for row, clip in zip(rows, (audio[:32_000], audio[32_000:])):
        (alone,) = _infer(url, "emotion2vec", clip, ["EMBEDDING"])
        assert np.abs(row.embedded.embeddings - alone).max() <= 2e-5  # batching noise


def test_train_head_refuses_bad_input(served, head_repo, sound_sets, tmp_path):
    train, _ = sound_sets
    url = f"127.0.0.1:{served.grpc}"
    common = [
        "--url",
        url,
        "--repo",
        str(head_repo),
        "--segment",
        "none",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    cases = [
        (["--name", "Bad Name"], 2, "--name"),
        (["--name", "x", "--group-by", "nope"], 2, "no such column"),
        (["--name", "x", "--cv", "1"], 2, "at least 2"),
        (["--name", "x", "--group-by", "speaker", "--cv", "6"], 2, "at least 6 groups"),
        (["--name", "x", "--map", "hum=a/b"], 2, "cannot be served"),
        (["--name", "x", "--url", "127.0.0.1:1", "--retries", "0"], 3, "unreachable"),
    ]
    for extra, code, message in cases:
        args = [*common, *extra] if "--url" not in extra else [*common[2:], *extra]
        run = e2v("train-head", str(train), *args)
        assert run.returncode == code and message in run.stderr, (extra, run.stderr)
    assert not (head_repo / "emotion2vec_x").exists()


def test_hot_add_waits_reports_failures_and_retries_changed_files(served, head_repo):
    """An ensemble whose head is missing waits; a head that fails to load is reported while
    the server keeps serving, and loads once its files change."""
    import tritonclient.grpc as grpcclient

    pipeline, x = fitted("logistic", 2, dim=64, seed=4)
    export_head(head_repo, "fix", from_sklearn(pipeline, "logistic"), tiny_base(head_repo),
                "cpu", "none", None, x)  # fmt: skip
    # Taken back before the server looks twice, then put back broken, as by hand.
    good = head_repo / "head_fix" / "1" / "model.onnx"
    saved = good.read_bytes()
    broken = head_repo / ".broken"
    (head_repo / "head_fix").rename(broken)
    served.wait_line("hot-add: emotion2vec_fix waits for head_fix", 30)
    (broken / "1" / "model.onnx").write_bytes(b"not onnx")
    broken.rename(head_repo / "head_fix")
    served.wait_line("hot-add: head_fix not loaded", 60)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc}") as client:
        assert client.is_model_ready("emotion2vec") and not client.is_model_ready("head_fix")
    good.write_bytes(saved)
    served.wait_ready("emotion2vec_fix", timeout=60)
    assert served.loads("emotion2vec") == 1


def test_bench_heads_smoke(served, head_repo, tmp_path):
    """`e2v bench heads` against the running server, on a few clips."""
    from e2v.loadtest.heads_bench import benchmark, report

    figures = benchmark(
        f"127.0.0.1:{served.grpc}", f"127.0.0.1:{served.http}", head_repo, tmp_path, 40, 10
    )
    text = report(figures)
    assert text.startswith("SYNTHETIC MODEL") and "head adds" in text
    assert set(figures["latency"]) == {"emotion2vec", "emotion2vec_bench"}
    assert figures["training"]["logistic"]["cv_accuracy"] > CHANCE


def test_hot_add_flags_and_overlay(tiny_cpu_repo, tmp_path):
    from e2v.contract import HOT_ADD_FLAGS, MODEL_CONTROL_NONE
    from e2v.serve import PYCACHE_PLACEHOLDER, ServerConfig, runtime_repository, server_args

    plain = server_args(tiny_cpu_repo, ServerConfig(tiny_cpu_repo), None, "k" * 20)
    hot = server_args(tiny_cpu_repo, ServerConfig(tiny_cpu_repo, hot_add=True), None, "k" * 20)
    assert MODEL_CONTROL_NONE in plain and not set(HOT_ADD_FLAGS) & set(plain)
    assert MODEL_CONTROL_NONE not in hot and set(HOT_ADD_FLAGS) <= set(hot)
    overlay = runtime_repository(tiny_cpu_repo, ServerConfig(tiny_cpu_repo, hot_add=True), tmp_path)
    version = overlay / "emotion2vec" / "1"
    assert overlay != tiny_cpu_repo and not version.is_symlink()
    assert (version / PYCACHE_PLACEHOLDER).is_file()  # Python cannot make its bytecode dir
    assert all((version / f).is_symlink() for f in ("model.onnx", "model.py"))
