"""Triton Python-backend model: the exported ONNX file run by ONNX Runtime.

This is the `cpu` target's version directory code (`<repo>/<name>/1/model.py`). It
keeps the same contract as the onnxruntime backend: WAV [B, T] float32, WAV_LENS [B]
int64 -> SCORES [B, C], EMBEDDING [B, D]. Requests that the dynamic batcher groups are
concatenated into ONNX Runtime calls of at most `max_batch_samples` samples; rows of
different lengths are zero-padded, which the exported graph handles exactly.

Every request is checked on its own (`request_checks.py`, beside this file): a request
that is too long, over budget, non-finite or inconsistent gets an INVALID_ARG error
response while the other requests of the same batch are served.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


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


checks = _load_sibling("request_checks")


def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.max_samples = int(params.get("max_samples") or checks.DEFAULT_MAX_SAMPLES)
        self.max_batch_samples = int(
            params.get("max_batch_samples")
            or max(1, config.get("max_batch_size", 1)) * self.max_samples
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0") or 0)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The arena stays on (without it every run allocates from the heap: ~12% slower on
        # one core), and each run shrinks it back (RUN_OPTIONS below), so one maximum-size
        # batch does not keep its peak memory for the process lifetime.
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            providers.insert(
                0, ("CUDAExecutionProvider", {"device_id": args["model_instance_device_id"]})
            )
        self.session = ort.InferenceSession(
            os.path.join(version_dir, params.get("onnx_file", "model.onnx")),
            sess_options=options,
            providers=providers,
        )
        self.output_names = [o["name"] for o in config["output"]]
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._malloc_trim = _libc_malloc_trim()

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        accepted: list[tuple[int, np.ndarray, np.ndarray]] = []
        for index, request in enumerate(requests):
            problem, wav, lens = self._read(request)
            if problem:
                responses[index] = _error(problem, pb_utils.TritonError.INVALID_ARG)
            else:
                accepted.append((index, wav, lens))
        shapes = [wav.shape for _, wav, _ in accepted]
        for run in checks.plan_runs(shapes, self.max_batch_samples):
            self._run([accepted[i] for i in run], responses)
        if self._malloc_trim is not None:
            self._malloc_trim(0)  # return freed run buffers to the OS
        return responses

    def _read(self, request) -> tuple[str | None, np.ndarray | None, np.ndarray | None]:
        """(problem, wav, lens): shapes are checked before any sample is read."""
        wav_tensor = pb_utils.get_input_tensor_by_name(request, "WAV")
        lens_tensor = pb_utils.get_input_tensor_by_name(request, "WAV_LENS")
        problem = checks.check_shapes(
            wav_tensor.shape(), lens_tensor.shape(), self.max_samples, self.max_batch_samples
        )
        if problem:
            return problem, None, None
        wav = wav_tensor.as_numpy()
        lens = lens_tensor.as_numpy().reshape(-1).astype(np.int64, copy=False)
        problem = checks.check_request(wav, lens, self.max_samples, self.max_batch_samples)
        return problem, wav, lens

    def _run(self, group: list, responses: list) -> None:
        """One ONNX Runtime call for `group`; an exception fails only these requests."""
        wavs = [wav for _, wav, _ in group]
        lens = [lengths for _, _, lengths in group]
        try:
            batch = checks.pad_concat(wavs, lens, max(w.shape[1] for w in wavs))
            outputs = self.session.run(
                self.output_names,
                {"WAV": batch, "WAV_LENS": np.concatenate(lens)},
                run_options=self.run_options,
            )
        except Exception as exc:  # noqa: BLE001 - reported to the requests it concerns
            for index, _, _ in group:
                responses[index] = _error(f"inference failed: {exc}", pb_utils.TritonError.INTERNAL)
            return
        start = 0
        for index, wav, _ in group:
            rows = [out[start : start + wav.shape[0]] for out in outputs]
            start += wav.shape[0]
            problem = checks.check_outputs(rows)
            if problem:
                responses[index] = _error(problem, pb_utils.TritonError.INVALID_ARG)
                continue
            tensors = [pb_utils.Tensor(n, r) for n, r in zip(self.output_names, rows)]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)


def _error(message: str, code) -> object:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
