"""`--protocol http` with several replicas: the client takes them in turn, per request.

gRPC balances inside its channel (client/targets.py); tritonclient's HTTP client talks to
one URL, so this keeps one client per replica. A replica whose connection fails (refused,
reset, closed mid-answer) takes no request until a probe finds its model ready again; the
failed request is transient, and its retry goes to the next replica. The last replica in
turn is never taken out (one URL behaves as before: a dropped keep-alive connection costs
a retry, not a second out of turn); the caller's backoff waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter

# A down replica's model is asked this often whether it is ready again.
PROBE_S = 1.0
PROBE_TIMEOUT_S = 2.0


def connection_failure(exc: BaseException) -> bool:
    """The replica itself is gone: refused, reset or closed, not an answer from it."""
    import aiohttp

    return isinstance(exc, (OSError, aiohttp.ClientConnectionError)) and not isinstance(
        exc, asyncio.TimeoutError
    )


class HttpReplicas:
    """One tritonclient.http.aio client per replica URL, taken in turn per request."""

    def __init__(self, urls: tuple[str, ...], model: str, module):
        self.urls, self.model = urls, model
        self.clients = {url: module.InferenceServerClient(url=url) for url in urls}
        self.requests: Counter = Counter()  # requests sent per replica
        self.down: dict[str, str] = {}  # replica -> why it takes no request
        self._turn = itertools.cycle(urls)
        self._probes: dict[str, asyncio.Task] = {}

    async def close(self) -> None:
        for task in self._probes.values():
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)
        for client in self.clients.values():
            await client.close()

    async def is_model_ready(self, model: str) -> bool:
        return await self.call("is_model_ready", model)

    async def get_model_config(self, model: str):
        return await self.call("get_model_config", model)

    async def get_model_metadata(self, model: str):
        return await self.call("get_model_metadata", model)

    async def infer(self, model: str, inputs, outputs=None):
        return await self.call("infer", model, inputs, outputs=outputs)

    async def call(self, method: str, *args, **kwargs):
        """`method` on the next replica up; a connection failure takes it out of turn."""
        url = self._pick()
        self.requests[url] += 1
        try:
            return await getattr(self.clients[url], method)(*args, **kwargs)
        except Exception as exc:
            if connection_failure(exc):
                self._take_out(url, exc)
            raise

    async def readiness(self, url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
        """None when `url`'s model is ready, else why not (one bounded check)."""
        try:
            ready = await asyncio.wait_for(self.clients[url].is_model_ready(self.model), timeout_s)
        except Exception as exc:  # noqa: BLE001 - refused, reset, timeout: not ready
            return down_reason(exc)
        return None if ready else "model not ready"

    def _pick(self) -> str:
        while (url := next(self._turn)) in self.down:  # never all down: see _take_out
            continue
        return url

    def _take_out(self, url: str, exc: BaseException) -> None:
        if len(self.down) + 1 >= len(self.urls):  # the last one stays: retries wait on it
            return
        self.down[url] = down_reason(exc)
        if url not in self._probes:
            self._probes[url] = asyncio.get_running_loop().create_task(self._probe(url))

    async def _probe(self, url: str) -> None:
        """Back in turn once the replica's model answers ready."""
        try:
            while True:
                await asyncio.sleep(PROBE_S)
                if await self.readiness(url) is None:
                    self.down.pop(url, None)
                    return
        finally:
            with contextlib.suppress(KeyError):
                del self._probes[url]


# Why a replica is down, in words a refusal can show: (marker in the error, words).
DOWN_REASONS = (
    ("refused", "connection refused"),
    ("cannot connect", "cannot connect"),
    ("reset", "connection reset"),
    ("socket closed", "connection closed"),
    ("disconnected", "connection closed"),
    ("broken pipe", "connection closed"),
    ("deadline", "no answer in time"),
    ("timed out", "no answer in time"),
    ("name resolution", "name not resolved"),
    ("not ready", "model not ready"),
)


def down_reason(exc: BaseException) -> str:
    """A replica's failure in a few words (the full error is long and says it twice)."""
    for cause in (exc, getattr(exc, "os_error", None), exc.__cause__):  # aiohttp wraps it
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
    text = str(exc).strip()
    lower = text.lower()
    for marker, words in DOWN_REASONS:
        if marker in lower:
            return words
    return text.splitlines()[0][:160] if text else type(exc).__name__
