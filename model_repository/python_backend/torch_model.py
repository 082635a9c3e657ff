"""Triton Python-backend model for the `torch` target: the exported TorchScript run by torch.

This is the `torch` target's version directory code (`<repo>/<name>/1/model.py`, beside
`model.pt`). Same contract as every target: WAV [B, T] float32, WAV_LENS [B] int64 ->
SCORES [B, C], EMBEDDING [B, D]. The device follows the instance kind Triton resolves
(`KIND_AUTO`: the GPU where there is one, else the CPU); the precision follows the config
parameter `precision` (fp32, or fp16/bf16 through autocast: matmuls and convolutions in
half precision, normalisations, softmax and sums in fp32, weights kept in fp32).

Tensors cross the stub boundary through DLPack only: the stub's numpy path breaks with
numpy 2, and DLPack is zero-copy. On CUDA the padded batch is assembled in pinned host
memory and copied asynchronously; outputs come back through pinned memory too.

`TorchRunner` needs no Triton: the GPU benchmark measures the model alone with it, so the
benchmark and the server run the same code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys

import torch
from torch.utils.dlpack import to_dlpack

try:  # present inside Triton's Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the benchmark and tests
    pb_utils = None

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRunner:
    """One TorchScript module on one device and precision; padded batches in, fp32 out."""

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        precision: str = "fp32",
        threads: int = 0,
        optimized_execution: bool = False,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            if self.device.index is None:  # "cuda": the current device, named explicitly
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            # fp32 means fp32: no TF32 tensor-core shortcuts (cuDNN allows them by default).
            torch.backends.cudnn.allow_tf32 = precision != "fp32"
            torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        elif threads > 0:
            torch.set_num_threads(threads)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.optimized_execution = optimized_execution
        # One module per precision: the profiling executor specialises on the dtypes it saw.
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self._pinned: dict[str, torch.Tensor] = {}

    def run(self, wavs: list[torch.Tensor], lens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Zero-pad and concatenate requests' rows, run once, return CPU float32 outputs."""
        rows = sum(w.shape[0] for w in wavs)
        samples = max(w.shape[1] for w in wavs)
        wav = self._assemble(wavs, rows, samples)
        wav_lens = torch.cat([x.reshape(-1).to(torch.int64) for x in lens])
        if self.cuda:
            wav = wav.to(self.device, non_blocking=True)
            wav_lens = wav_lens.to(self.device)
        with torch.inference_mode(), self.autocast(), self.executor():
            outputs = self.module(wav, wav_lens)
        return self._to_host([o.float() for o in outputs])

    def _assemble(self, wavs: list[torch.Tensor], rows: int, samples: int) -> torch.Tensor:
        if not self.cuda and len(wavs) == 1:
            return wavs[0].to(torch.float32)
        batch = (
            self._buffer("wav", rows * samples).view(rows, samples)
            if self.cuda
            else torch.empty((rows, samples), dtype=torch.float32)
        )
        row = 0
        for w in wavs:
            batch[row : row + w.shape[0], : w.shape[1]].copy_(w)
            batch[row : row + w.shape[0], w.shape[1] :].zero_()
            row += w.shape[0]
        return batch

    def _to_host(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.cuda:
            return outputs
        host = []
        for i, out in enumerate(outputs):
            buffer = self._buffer(f"out{i}", out.numel()).view(out.shape)
            host.append(buffer.copy_(out, non_blocking=True))
        torch.cuda.current_stream(self.device).synchronize()
        return [h.clone() for h in host]  # the pinned buffers are reused by the next batch

    def _buffer(self, name: str, numel: int) -> torch.Tensor:
        """A pinned host buffer of at least `numel` floats, grown as needed and reused."""
        buffer = self._pinned.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, pin_memory=True)
            self._pinned[name] = buffer
        return buffer[:numel]

    def autocast(self, cache: bool = True):
        """The precision's autocast context (a no-op for fp32). `cache=False` for CUDA-graph
        capture: a graph must not point at casts that the context frees on exit."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=cache)

    def executor(self):
        """TorchScript's optimising executor on or off, as configured."""
        return torch.jit.optimized_execution(self.optimized_execution)


def _load_sibling(name: str):
    """Import `name`.py from this file's directory (the stub does not put it on sys.path)."""
    module_name = f"_e2v_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.runner = TorchRunner(
            os.path.join(version_dir, params.get("torchscript_file", "model.pt")),
            device=device,
            precision=params.get("precision", "fp32"),
            threads=int(params.get("intra_op_thread_count", "0") or 0),
            optimized_execution=params.get("optimized_execution", "false") == "true",
        )
        self.checks = _load_sibling("request_checks")
        self.max_samples = int(params.get("max_samples") or self.checks.DEFAULT_MAX_SAMPLES)
        self.max_batch_samples = int(
            params.get("max_batch_samples")
            or max(1, config.get("max_batch_size", 1)) * self.max_samples
        )
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        """Each request checked alone (request_checks.py); the accepted ones run in groups
        of at most max_batch_samples samples."""
        responses: list = [None] * len(requests)
        accepted: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for index, request in enumerate(requests):
            problem, wav, lens = self._read(request)
            if problem:
                responses[index] = _error(problem, invalid_argument=True)
            else:
                accepted.append((index, wav, lens))
        shapes = [tuple(wav.shape) for _, wav, _ in accepted]
        for run in self.checks.plan_runs(shapes, self.max_batch_samples):
            self._run([accepted[i] for i in run], responses)
        return responses

    def _read(self, request):
        """(problem, wav with zeroed padding, lens): shapes before any sample is read."""
        wav = _input(request, "WAV")
        lens = _input(request, "WAV_LENS").reshape(-1).to(torch.int64)
        problem = self.checks.check_shapes(
            tuple(wav.shape), tuple(lens.shape), self.max_samples, self.max_batch_samples
        )
        if problem is None:
            problem = self.checks.check_request(
                wav.numpy(), lens.numpy(), self.max_samples, self.max_batch_samples
            )
        if problem:
            return problem, None, None
        return None, torch.from_numpy(self.checks.zero_padding(wav.numpy(), lens.numpy())), lens

    def _run(self, group: list, responses: list) -> None:
        """One call for `group`; a failure (e.g. CUDA out of memory) fails only these."""
        try:
            outputs = self.runner.run([wav for _, wav, _ in group], [lens for _, _, lens in group])
        except RuntimeError as exc:
            if self.runner.cuda:
                torch.cuda.empty_cache()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            for index, _, _ in group:
                responses[index] = _error(f"inference failed: {reason}")
            return
        start = 0
        for index, wav, _ in group:
            rows = [out[start : start + wav.shape[0]] for out in outputs]
            start += wav.shape[0]
            problem = self.checks.check_outputs([r.numpy() for r in rows])
            if problem:
                responses[index] = _error(problem, invalid_argument=True)
                continue
            tensors = [
                pb_utils.Tensor.from_dlpack(name, to_dlpack(row.contiguous()))
                for name, row in zip(self.output_names, rows)
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)


def _input(request, name: str) -> torch.Tensor:
    return torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())


def _error(message: str, invalid_argument: bool = False):
    """An error response coded INVALID_ARG (bad request) or INTERNAL (failed batch).

    Triton 2.51's Python backend answers both as HTTP 500; the message says which it was.
    """
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
