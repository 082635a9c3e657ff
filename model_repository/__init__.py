"""Triton model-config templates and the Python-backend model, shipped as package data.

`e2v export` renders `templates/*.pbtxt` into `<repo>/<name>/config.pbtxt`; the `cpu`
target copies `python_backend/model.py` into `<repo>/<name>/1/`, the `torch` target
`python_backend/torch_model.py` (as `model.py`). Generated repositories
(with weights) live elsewhere and are never committed.
"""

from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
PYTHON_BACKEND_MODEL = Path(__file__).parent / "python_backend" / "model.py"
TORCH_BACKEND_MODEL = Path(__file__).parent / "python_backend" / "torch_model.py"
