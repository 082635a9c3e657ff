"""Triton model-config templates and the Python-backend model, shipped as package data.

`e2v export` renders `templates/*.pbtxt` into `<repo>/<name>/config.pbtxt`; the `cpu`
target copies `python_backend/model.py` and the modules it imports into `<repo>/<name>/1/`;
the `torch` target copies `python_backend/torch_model.py` (as `model.py`) and the same
modules. Generated repositories (with weights) live elsewhere and are never committed.
"""

import shutil
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
PYTHON_BACKEND = Path(__file__).parent / "python_backend"
PYTHON_BACKEND_MODEL = PYTHON_BACKEND / "model.py"
TORCH_BACKEND_MODEL = PYTHON_BACKEND / "torch_model.py"
# Imported by every Python-backend model.py from its own directory.
PYTHON_BACKEND_SHARED = (PYTHON_BACKEND / "request_checks.py",)


def install_python_backend(version_dir: Path, model_file: Path = PYTHON_BACKEND_MODEL) -> None:
    """Copy `model_file` (as model.py) and the shared modules into a version directory."""
    shutil.copy(model_file, version_dir / "model.py")
    for module in PYTHON_BACKEND_SHARED:
        shutil.copy(module, version_dir / module.name)
