"""Where recordings come from: local paths, directories, globs, URIs and lists of them.

Local inputs are walked in sorted order; URIs (`s3://`, `gs://`, `az://`, `https://`...)
go through fsspec, whose S3, GCS and Azure back ends read the standard credentials
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `~/.aws/config`, `GOOGLE_APPLICATION_CREDENTIALS`
...), so MinIO and Ceph work unchanged. Listing streams: an S3 prefix is read page by
page in key order, other stores directory by directory, and `--from-list` line by line,
so millions of objects are never held in memory at once.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from e2v.client.audio import AUDIO_SUFFIXES, AudioError, open_regular_file
from e2v.client.names import display_name
from e2v.client.results import FileResult

# Read-ahead of remote objects: large enough for few requests per file, small enough that
# many files in flight stay cheap.
REMOTE_BLOCK_BYTES = 4 * 2**20
# fsspec protocol -> the extra that installs it (for the error message).
PROTOCOL_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure"}
PROTOCOL_EXTRAS |= {"abfs": "azure", "abfss": "azure", "http": "storage", "https": "storage"}


class InputError(ValueError):
    """An input that cannot be listed at all (bad URI, unknown protocol): one line."""


def is_uri(name: str) -> bool:
    """True for `scheme://...` other than `file://` (which is a local path)."""
    scheme, sep, _ = name.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").isalnum() and scheme != "file"


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for `uri`, with install hints on failure."""
    try:
        import fsspec
    except ImportError:
        raise InputError(
            f"{uri}: URIs need fsspec: pip install './[storage]' in the clone"
        ) from None
    protocol = uri.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as exc:
        extra = PROTOCOL_EXTRAS.get(protocol, "storage")
        raise InputError(
            f"{uri}: {protocol}:// needs its fsspec back end: "
            f"pip install './[{extra}]' in the clone ({exc})"
        ) from None
    except ValueError as exc:
        raise InputError(f"{uri}: {exc}") from None


def iter_inputs(items: Iterable[str]) -> Iterator[str | FileResult]:
    """Each input name to classify, or an error row for an input that yields nothing.

    Files, directories (recursive, audio/video suffixes, sorted), globs and URIs (objects,
    prefixes, globs). Directory walks keep entries with an audio suffix that are not
    regular files (broken links, FIFOs, devices), so they get an error row.
    """
    for item in items:
        found = False
        try:
            for name in _remote(item) if is_uri(item) else _local(item):
                found = True
                yield name
        except InputError as exc:
            yield FileResult(file=display_name(item), error=str(exc), error_kind="storage")
            continue
        except (OSError, ValueError) as exc:  # a listing that failed half way
            kind = "not_found" if isinstance(exc, FileNotFoundError) else "storage"
            yield FileResult(file=display_name(item), error=_reason(item, exc), error_kind=kind)
            continue
        if not found:
            yield _nothing_found(item)


def read_list(path: str) -> Iterator[str]:
    """Inputs from a file (or URI) with one path or URI per line; `#` starts a comment."""
    opener = filesystem(path)[0].open(filesystem(path)[1]) if is_uri(path) else None
    try:
        stream = opener or open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"--from-list {display_name(path)}: {exc.strerror}") from None
    with stream:
        for number, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"--from-list {path}: line {number} is not UTF-8") from None
            if line and not line.startswith("#"):
                yield line


def open_input(name: str) -> BinaryIO:
    """A binary file object for a local path or a URI; AudioError when it cannot be read."""
    if not is_uri(name):
        return open_regular_file(name)
    try:
        fs, path = filesystem(name)
        return fs.open(path, "rb", block_size=REMOTE_BLOCK_BYTES)
    except FileNotFoundError:
        raise AudioError("not_found", f"no such object: {display_name(name)}") from None
    except IsADirectoryError:
        raise AudioError(
            "unreadable", f"is a prefix, not an object: {display_name(name)}"
        ) from None
    except PermissionError as exc:
        raise AudioError("unreadable", f"access denied: {display_name(name)} ({exc})") from None
    except (InputError, OSError, ValueError) as exc:
        raise AudioError("storage", _reason(name, exc)) from None


def _local(item: str) -> Iterator[str]:
    path = Path(item)
    if path.is_dir():
        yield from _walk_audio(path)
    elif path.exists() or path.is_symlink():
        yield item
    elif glob.has_magic(item):
        yield from sorted(p for p in glob.glob(item, recursive=True) if not Path(p).is_dir())
    else:
        raise FileNotFoundError(item)


def _walk_audio(root: Path) -> Iterator[str]:
    for directory, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                yield os.path.join(directory, name)


def _remote(uri: str) -> Iterator[str]:
    fs, path = filesystem(uri)
    protocol = uri.split("://", 1)[0]
    if glob.has_magic(path):
        yield from (_unstrip(fs, protocol, p) for p in sorted(fs.glob(path)))
        return
    try:
        kind = fs.info(path).get("type")
    except FileNotFoundError:
        kind = None
    if kind == "file":
        yield uri
        return
    if kind is None and not _has_children(fs, path):
        raise FileNotFoundError(uri)
    for name in _list_prefix(fs, path):
        if Path(name).suffix.lower() in AUDIO_SUFFIXES:
            yield _unstrip(fs, protocol, name)


def _has_children(fs, path: str) -> bool:
    try:
        return bool(fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def _list_prefix(fs, path: str) -> Iterator[str]:
    """Every object under `path`, streamed, in a deterministic order."""
    if hasattr(fs, "_iterdir") and "s3" in fs.protocol:
        yield from _s3_keys(fs, path)
        return
    for directory, dirs, names in fs.walk(path, detail=False):
        dirs.sort()  # fsspec's walk descends into `dirs` after yielding: sorted order
        for name in sorted(names):
            yield f"{directory.rstrip('/')}/{name}"


def _s3_keys(fs, path: str) -> Iterator[str]:
    """S3 ListObjectsV2 page by page (keys come in lexicographic order), no delimiter."""
    from fsspec.asyn import sync

    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    pages = fs._iterdir(bucket, prefix=prefix, delimiter="")
    while True:
        try:
            entry = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        if entry.get("type") == "file":
            yield entry["name"]


def _unstrip(fs, protocol: str, path: str) -> str:
    return fs.unstrip_protocol(path) if protocol not in ("http", "https") else path


def _nothing_found(item: str) -> FileResult:
    name = display_name(item)
    if not is_uri(item) and Path(item).is_dir():
        return FileResult(
            file=name, error=f"no audio files in directory {name}", error_kind="empty_directory"
        )
    if glob.has_magic(item):
        return FileResult(file=name, error=f"no files match {name}", error_kind="not_found")
    return FileResult(
        file=name, error=f"no audio objects under {name}", error_kind="empty_directory"
    )


def _reason(name: str, exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {display_name(name)}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{display_name(name)}: {type(exc).__name__}: {text[:300]}"
