"""emotion2vec on Triton: export, serve, classify, load-test.

The Python API (e2v/api.py), imported on first use so that `e2v.contract` stays light:

    from e2v import classify_file
    result = classify_file("call.wav", url="localhost:8001")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from e2v.api import (
        Classifier,
        FileResult,
        Options,
        ServerUnavailable,
        classify_file,
        classify_files,
    )

__all__ = [
    "Classifier",
    "FileResult",
    "Options",
    "ServerUnavailable",
    "classify_file",
    "classify_files",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from e2v import api

        return getattr(api, name)
    raise AttributeError(f"module 'e2v' has no attribute {name!r}")
