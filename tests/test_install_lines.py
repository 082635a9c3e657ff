"""Every `pip install` line in README.md and docs/ names something installable from the clone:
a path, a wheel built from it, a git URL, or a published package the project depends on.
The project itself is not on PyPI, so `pip install emotion2vec-triton` must never be shown."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "emotion2vec-triton"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "loadtest" / "GPU.md"]


def install_lines() -> list[tuple[str, str]]:
    """(file, line) for each line of a document that runs `pip install`."""
    found = []
    for path in DOCS:
        for line in path.read_text().splitlines():
            command = line.split("#", 1)[0]
            if re.search(r"\bpip install\b", command) and "`pip install" not in line:
                found.append((path.name, command.strip()))
    return found


def requirement_name(token: str) -> str:
    return re.split(r"[\[<>=!~; @]", token, maxsplit=1)[0].lower().replace("_", "-")


def known_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {requirement_name(r) for r in requirements}


def check_target(token: str) -> str | None:
    """Why `token` (one pip install argument) would fail on a fresh machine, or None."""
    if token.startswith(("git+", "https://", "http://")):
        return None
    if token.startswith(("./", ".[", "/", "dist/")) or token == ".":
        path = token.split("[", 1)[0]
        if path.startswith("dist/"):
            return None if path.endswith(".whl") else f"{token}: dist/ holds wheels"
        return None if (ROOT / path / "pyproject.toml").is_file() else f"{token}: not the clone"
    name = requirement_name(token)
    if name == PROJECT:
        return f"{token}: {PROJECT} is not published on a package index"
    if name not in known_dependencies():
        return f"{token}: not a dependency named in pyproject.toml"
    return None


def test_readme_and_docs_install_lines_work_from_the_clone():
    lines = install_lines()
    assert lines, "README shows no install line at all"
    problems = []
    for source, line in lines:
        words = shlex.split(line)
        targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
        problems += [f"{source}: {p}" for t in targets if (p := check_target(t))]
    assert not problems, problems


def test_the_check_refuses_what_a_new_user_could_not_install():
    assert check_target("emotion2vec-triton[s3,parquet]")
    assert check_target("emotion2vec_triton")
    assert check_target("./no-such-dir[s3]")
    assert check_target("left-pad")
    assert check_target("./[s3,parquet]") is None
    assert check_target("torch==2.13.0") is None


def test_the_wheel_built_from_the_clone_holds_every_package(tmp_path):
    """The wheel README names (`python -m build --wheel`, here `pip wheel`, offline) carries
    every package and its data, so installing it is the same as installing the clone."""
    clone = tmp_path / "clone"  # the tracked files only, as a fresh clone has them
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        target = clone / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name.decode(), target)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(clone)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("emotion2vec_triton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in packages["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "e2v/client/silero/silero_vad_16k_sequence.onnx" in names
    assert "e2v/client/gateway/static/index.html" in names
    assert "e2v/model_repository/templates/cpu.pbtxt" in names
    # One import namespace: nothing else lands at the top of site-packages.
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"e2v"}
