"""Type-check the library and the Python API with mypy (scripts/test.sh runs it).

Checked: e2v's own modules of the Python API (`__init__`, `api`, `contract`) and every
library module of e2v.client (client/*.py; the application sub-packages are not). The
import namespace maps folders into `e2v` (pyproject's package-dir), which mypy cannot
follow through the editable install's import hook, so the modules are checked in a tree
of symbolic links with the installed layout (build/typecheck/e2v/client -> client/);
mypy's messages name the files of the clone.

    .venv/bin/python scripts/typecheck.py [MYPY OPTIONS]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
PACKAGE_MODULES = ("__init__.py", "api.py", "contract.py", "py.typed")


def link_tree() -> Path:
    """build/typecheck/e2v: e2v's checked modules and `client`, as links into the clone."""
    shutil.rmtree(TREE, ignore_errors=True)
    package = TREE / "e2v"
    package.mkdir(parents=True)
    for name in PACKAGE_MODULES:
        (package / name).symlink_to(ROOT / "e2v" / name)
    (package / "client").symlink_to(ROOT / "client", target_is_directory=True)
    return package


def checked_files(package: Path) -> list[str]:
    modules = [package / name for name in PACKAGE_MODULES if name.endswith(".py")]
    modules += sorted((package / "client").glob("*.py"))
    return [os.path.relpath(path, ROOT) for path in modules]


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    files = checked_files(link_tree())
    out, err, status = api.run(["--config-file", "pyproject.toml", *argv, *files])
    prefix = os.path.relpath(TREE / "e2v", ROOT) + os.sep
    for text, stream in ((out, sys.stdout), (err, sys.stderr)):
        text = text.replace(prefix + "client" + os.sep, "client" + os.sep)
        stream.write(text.replace(prefix, "e2v" + os.sep))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
