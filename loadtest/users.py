"""Locust users: closed-loop clients sending prepared clips to Triton, the baseline or
the gateway.

Each user sends one clip, waits for the answer, sends the next (no think time), so the
number of users is the concurrency. Every request fires a Locust request event named
after its length bucket, with the clip's audio duration in `context["audio_s"]`.

Importing this module imports Locust, which monkey-patches the process for gevent:
only the load driver process (`loadtest.driver`) and `locust -f` import it.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent
from e2v.loadtest.workload import Workload, bucket_name, multipart_upload, triton_inputs
from locust import User, constant, task

from e2v.contract import GATEWAY_PREDICT_PATH, MODEL_NAME

grpc_gevent.init_gevent()  # tritonclient.grpc blocks the gevent loop without it

NETWORK_TIMEOUT_S = 300.0


class PreparedClips:
    """The workload as ready-to-send arrays, plus one shared clip sequence for all users.

    With `files` (a folder from `workload.encode_clips`), each clip is also a ready-made
    multipart upload of its encoded file, for the gateway."""

    def __init__(self, workload: Workload, files: Path | None = None):
        self.uploads = [multipart_upload(p) for p in sorted(files.iterdir())] if files else []
        self.padded = [workload.padded(i) for i in range(len(workload))]
        self.raw = [workload.clip(i).tobytes() for i in range(len(workload))]
        self.names = [bucket_name(int(n)) for n in workload.lengths]
        self.audio_s = [workload.duration_s(i) for i in range(len(workload))]
        self._sequence = itertools.count()
        self._inputs: dict[tuple[str, int], list] = {}

    def inputs(self, module, index: int) -> list:
        """tritonclient inputs of clip `index`, serialised once and reused (read-only)."""
        key = (module.__name__, index)
        if key not in self._inputs:
            self._inputs[key] = triton_inputs(module, *self.padded[index])
        return self._inputs[key]

    def next_index(self) -> int:
        """Clips in workload order, round robin: every run sends the same mix."""
        return next(self._sequence) % len(self.names)


class ClipUser(User):
    """Sends clips back to back and reports each one as a Locust request event."""

    abstract = True
    wait_time = constant(0)
    request_type = "clip"

    @property
    def clips(self) -> PreparedClips:
        return self.environment.e2v_clips

    @task
    def send_clip(self) -> None:
        index = self.clips.next_index()
        start = time.perf_counter()
        length, error = 0, None
        try:
            length = self.send(index)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none is fatal
            error = exc
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=self.clips.names[index],
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=error,
            context={"audio_s": self.clips.audio_s[index]},
        )

    def send(self, index: int) -> int:
        """Send clip `index`; returns the response size in bytes."""
        raise NotImplementedError


class TritonGrpcUser(ClipUser):
    abstract = True  # concrete once the driver or locustfile picks it
    request_type = "grpc"

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient
        from e2v.client.triton import grpc_channel_args

        self._module = grpcclient
        # Every e2v client's channel: a list of replicas (`ipv4:A,B`) is balanced per request.
        self._client = grpcclient.InferenceServerClient(self.host, channel_args=grpc_channel_args())

    def send(self, index: int) -> int:
        inputs = self.clips.inputs(self._module, index)
        result = self._client.infer(MODEL_NAME, inputs, client_timeout=NETWORK_TIMEOUT_S)
        return sum(len(raw) for raw in result.get_response().raw_output_contents)

    def on_stop(self) -> None:
        self._client.close()


class TritonHttpUser(ClipUser):
    abstract = True
    request_type = "http"

    def on_start(self) -> None:
        import tritonclient.http as httpclient

        self._module = httpclient
        self._client = httpclient.InferenceServerClient(
            self.host, connection_timeout=NETWORK_TIMEOUT_S, network_timeout=NETWORK_TIMEOUT_S
        )

    def send(self, index: int) -> int:
        result = self._client.infer(MODEL_NAME, self.clips.inputs(self._module, index))
        return sum(result.as_numpy(o["name"]).nbytes for o in result.get_response()["outputs"])

    def on_stop(self) -> None:
        self._client.close()


class BaselineHttpUser(ClipUser):
    """POSTs the unpadded clip as raw float32 PCM to `loadtest.baseline_server`."""

    abstract = True
    request_type = "baseline"

    def on_start(self) -> None:
        from geventhttpclient import URL, HTTPClient

        self._client = HTTPClient.from_url(
            URL(f"http://{self.host}/infer"),
            concurrency=1,
            connection_timeout=NETWORK_TIMEOUT_S,
            network_timeout=NETWORK_TIMEOUT_S,
        )

    def send(self, index: int) -> int:
        response = self._client.post(
            "/infer",
            body=self.clips.raw[index],
            headers={"Content-Type": "application/octet-stream"},
        )
        body = response.read()
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {body[:200]!r}")
        return len(body)

    def on_stop(self) -> None:
        self._client.close()


class GatewayUser(ClipUser):
    """POSTs the clip's encoded file to `e2v gateway` (multipart, like `curl -F file=@...`):
    decoding and VAD happen in the gateway, as for a real caller."""

    abstract = True
    request_type = "gateway"

    def on_start(self) -> None:
        from geventhttpclient import URL, HTTPClient

        self._client = HTTPClient.from_url(
            URL(f"http://{self.host}{GATEWAY_PREDICT_PATH}"),
            concurrency=1,
            connection_timeout=NETWORK_TIMEOUT_S,
            network_timeout=NETWORK_TIMEOUT_S,
        )

    def send(self, index: int) -> int:
        content_type, body = self.clips.uploads[index]
        response = self._client.post(
            GATEWAY_PREDICT_PATH, body=body, headers={"Content-Type": content_type}
        )
        data = response.read()
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {data[:200]!r}")
        return len(data)

    def on_stop(self) -> None:
        self._client.close()


USER_CLASSES = {
    "grpc": TritonGrpcUser,
    "http": TritonHttpUser,
    "baseline": BaselineHttpUser,
    "gateway": GatewayUser,
}


def user_class(kind: str, host: str) -> type[ClipUser]:
    """A concrete (non-abstract) user class of `kind` aimed at `host`."""
    base = USER_CLASSES[kind]
    return type(base.__name__.removesuffix("User") + "Client", (base,), {"host": host})
