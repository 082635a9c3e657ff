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
import json
import os

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

try:  # present inside Triton's Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the benchmark and tests
    pb_utils = None

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLE_RATE = 16_000


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


# VALIDATION: the one call site is `TritonPythonModel.execute` below. When the shared
# `request_checks.py` lands (copied beside this file), replace this local stand-in with
# `from request_checks import check_request` - same signature and meaning.
def check_request(wav: np.ndarray, lens: np.ndarray, max_samples: int) -> str | None:
    """None for a servable request, else a one-line reason to answer it with."""
    if wav.ndim != 2 or wav.shape[0] < 1 or wav.shape[1] < 1:
        return f"WAV must be [batch, samples] with both > 0, got {list(wav.shape)}"
    if wav.shape[1] > max_samples:
        return f"WAV has {wav.shape[1]} samples; the maximum is {max_samples}"
    if lens.shape != (wav.shape[0],):
        return f"WAV_LENS must hold one length per WAV row ({wav.shape[0]}), got {list(lens.shape)}"
    if lens.min() < 0 or lens.max() > wav.shape[1]:
        return f"WAV_LENS must lie within 0..{wav.shape[1]}"
    if not np.isfinite(wav).all():
        return "WAV holds NaN or Inf"
    return None


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
        buckets = params.get("length_buckets_s", "30")
        self.max_samples = int(max(float(s) for s in buckets.split(",")) * SAMPLE_RATE)
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        wavs, lens, kept = [], [], []
        for i, request in enumerate(requests):
            wav = _input(request, "WAV")
            wav_lens = _input(request, "WAV_LENS").reshape(-1)
            error = check_request(wav.numpy(), wav_lens.numpy(), self.max_samples)
            if error:
                responses[i] = _error(error, invalid_argument=True)
                continue
            wavs.append(wav)
            lens.append(wav_lens)
            kept.append(i)
        if not kept:
            return responses
        try:
            outputs = self.runner.run(wavs, lens)
        except RuntimeError as exc:  # e.g. CUDA out of memory: fail this batch, keep serving
            if self.runner.cuda:
                torch.cuda.empty_cache()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            for i in kept:
                responses[i] = _error(f"inference failed: {reason}")
            return responses
        start = 0
        for i, wav in zip(kept, wavs):
            rows = slice(start, start + wav.shape[0])
            tensors = [
                pb_utils.Tensor.from_dlpack(name, to_dlpack(out[rows]))
                for name, out in zip(self.output_names, outputs)
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += wav.shape[0]
        return responses


def _input(request, name: str) -> torch.Tensor:
    return torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())


def _error(message: str, invalid_argument: bool = False):
    """An error response coded INVALID_ARG (bad request) or INTERNAL (failed batch).

    Triton 2.51's Python backend answers both as HTTP 500; the message says which it was.
    """
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
