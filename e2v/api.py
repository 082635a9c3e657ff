"""The Python API: `e2v classify` in Python, with the same results.

    from e2v import classify_file
    result = classify_file("call.wav", url="localhost:8001", alert="angry=0.7")
    result.emotion, result.confidence, result.scores, result.alerts
    result.to_json()  # exactly the line `e2v classify --json` writes for the file

`classify_file` and `classify_files` connect, classify and disconnect, and block. In async
code (a Jupyter notebook included), or to keep one connection for many calls, use
`Classifier`:

    async with Classifier(url="localhost:8001") as classifier:
        results = await classifier.classify_files(["calls/"], channels="split")

The options are `e2v classify`'s, with its names and defaults (`Options`); they go through
the same checks (client/options.py) and the same pipeline (client/classify.py). A bad
option raises ValueError, naming it as the command line does (`--alert ...`); an
unreachable server raises ServerUnavailable. A file that cannot be classified is not an
exception: its result has `error` and `error_kind`, as in `e2v classify`'s output.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from e2v.client.classify import classify_files as run_pipeline
from e2v.client.inputs import iter_inputs
from e2v.client.names import display_name
from e2v.client.options import ClassifyRequest, classify_request
from e2v.client.results import FileResult
from e2v.client.triton import ModelInfo, ServerUnavailable, TritonEmotionClient
from e2v.contract import MODEL_NAME, TRITON_RETRIES, TRITON_URL

if TYPE_CHECKING:
    from typing_extensions import Unpack

PathLike = str | os.PathLike[str]
T = TypeVar("T")


class Options(TypedDict, total=False):
    """What to classify and report: `e2v classify`'s options of the same names."""

    segment: str  # "vad" (default) | "fixed:SECONDS" | "none"
    channels: Literal["mix", "split"]  # split: a party per channel (default: mix)
    parties: str | Sequence[str]  # names of the channels in order; implies split
    alert: str | Mapping[str, float]  # "angry=0.7,customer:sad=0.8" or {"angry": 0.7}
    labels: str | Sequence[str]  # answer among these of the model's labels only
    aggregate: Literal["mean", "vote"]  # the file's label from its segments
    concurrency: int  # requests in flight
    max_duration_s: float  # longer recordings get a too_long error result


class Classifier:
    """One connection to the emotion2vec model on a Triton server (async)."""

    def __init__(
        self,
        url: str = TRITON_URL,
        protocol: Literal["grpc", "http"] = "grpc",
        model: str = MODEL_NAME,
        *,
        retries: int = TRITON_RETRIES,
    ) -> None:
        self._client = TritonEmotionClient(url, protocol, model, retries=retries)

    async def __aenter__(self) -> Classifier:
        await self.connect()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> ModelInfo:
        """Wait (with retries) for the model; ServerUnavailable when it never answers."""
        return await self._client.connect()

    async def close(self) -> None:
        await self._client.close()

    @property
    def info(self) -> ModelInfo | None:
        """The served model (name, labels, embedding size) once connected."""
        return self._client.info

    async def classify_file(self, path: PathLike, **options: Unpack[Options]) -> FileResult:
        """One file's (or object's) result, as `e2v classify PATH --json` reports it."""
        name = os.fspath(path)
        # in a thread: a URI is looked up in its storage
        found = await asyncio.to_thread(lambda: list(islice(iter_inputs([name]), 2)))
        if len(found) != 1 or (isinstance(found[0], str) and found[0] != name):
            raise ValueError(
                f"{display_name(name)} names a directory, glob or prefix, not one file: "
                "use classify_files"
            )
        return (await self._classify(found, options))[0]

    async def classify_files(
        self, paths: Iterable[PathLike], **options: Unpack[Options]
    ) -> list[FileResult]:
        """A result per file, in listing order, of files, directories (recursively),
        globs and URIs, as `e2v classify PATH... --json` reports them; a name listed twice
        is classified once."""
        items = _unique(iter_inputs(os.fspath(p) for p in paths))
        return await self._classify(items, options)

    async def _classify(
        self, items: Iterable[str | FileResult], options: Options
    ) -> list[FileResult]:
        """The results of `items` (names unique) in their order: the pipeline reports
        them as they finish, and lists `items` lazily."""
        request = self._request(options)
        job, _ = request.resolve(self._client.info or await self.connect())
        order: dict[str, int] = {}
        results: dict[int, FileResult] = {}

        def listed() -> Iterator[str | FileResult]:
            for item in items:
                order[_name(item)] = len(order)
                yield item

        def on_result(result: FileResult) -> None:
            results[order[result.file]] = request.finish(result)

        await run_pipeline(listed(), self._client, job, on_result)
        return [results[i] for i in range(len(order))]

    def _request(self, options: Options) -> ClassifyRequest:
        unknown = sorted(set(options) - set(Options.__annotations__))
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}")
        given: dict[str, Any] = {key: _text(key, value) for key, value in options.items()}
        client = self._client
        return classify_request(
            url=client.url,
            protocol=client.protocol,
            model=client.model,
            retries=client.retries,
            **given,
        )


def classify_file(
    path: PathLike,
    *,
    url: str = TRITON_URL,
    protocol: Literal["grpc", "http"] = "grpc",
    model: str = MODEL_NAME,
    retries: int = TRITON_RETRIES,
    **options: Unpack[Options],
) -> FileResult:
    """One file's result, as `e2v classify PATH --json` reports it (blocks)."""

    async def run() -> FileResult:
        async with Classifier(url, protocol, model, retries=retries) as classifier:
            return await classifier.classify_file(path, **options)

    return _blocking(run(), "classify_file")


def classify_files(
    paths: Iterable[PathLike],
    *,
    url: str = TRITON_URL,
    protocol: Literal["grpc", "http"] = "grpc",
    model: str = MODEL_NAME,
    retries: int = TRITON_RETRIES,
    **options: Unpack[Options],
) -> list[FileResult]:
    """A result per file of `paths` (files, directories, globs, URIs), in listing order,
    as `e2v classify PATH... --json` reports them (blocks). For long jobs, with resume
    and outputs written as files finish, use `e2v classify`."""

    async def run() -> list[FileResult]:
        async with Classifier(url, protocol, model, retries=retries) as classifier:
            return await classifier.classify_files(paths, **options)

    return _blocking(run(), "classify_files")


def _blocking(work: Coroutine[Any, Any, T], name: str) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    work.close()
    raise RuntimeError(
        f"{name}() blocks, and this thread runs an event loop (async code, Jupyter): "
        f"use `async with Classifier(...) as c: await c.{name}(...)`"
    )


def _name(item: str | FileResult) -> str:
    """The name a result of `item` has (its `file`)."""
    return item.file if isinstance(item, FileResult) else display_name(item)


def _unique(items: Iterable[str | FileResult]) -> Iterator[str | FileResult]:
    """Each listed name once, as `e2v classify` lists them."""
    seen: set[str] = set()
    for item in items:
        if _name(item) not in seen:
            seen.add(_name(item))
            yield item


def _text(option: str, value: object) -> object:
    """A list or mapping option as the command line's text, parsed by the same code."""
    if isinstance(value, Mapping):
        items = [f"{_item(option, key)}={float(threshold)!r}" for key, threshold in value.items()]
        return ",".join(items)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ",".join(_item(option, item) for item in value)
    return value


def _item(option: str, item: object) -> str:
    text = str(item)
    if "," in text or "=" in text:
        raise ValueError(f"{option}: {text!r} cannot hold ',' or '='")
    return text


__all__ = [
    "Classifier",
    "FileResult",
    "Options",
    "ServerUnavailable",
    "classify_file",
    "classify_files",
]
