"""Triton Python-backend model: the exported ONNX file run by ONNX Runtime.

This is the `cpu` target's version directory code (`<repo>/<name>/1/model.py`). It
keeps the same contract as the onnxruntime backend: WAV [B, T] float32, WAV_LENS [B]
int64 -> SCORES [B, C], EMBEDDING [B, D]. Requests that the dynamic batcher groups are
concatenated into one ONNX Runtime call; rows of different lengths are zero-padded,
which the exported graph handles exactly (padding never changes a row's outputs).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0") or 0)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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

    def execute(self, requests: list) -> list:
        wavs, lens, sizes = [], [], []
        for request in requests:
            wav = pb_utils.get_input_tensor_by_name(request, "WAV").as_numpy()
            wav_lens = pb_utils.get_input_tensor_by_name(request, "WAV_LENS").as_numpy()
            wavs.append(wav.astype(np.float32, copy=False))
            lens.append(wav_lens.reshape(-1).astype(np.int64, copy=False))
            sizes.append(wav.shape[0])
        batch = _pad_concat(wavs)
        outputs = self.session.run(
            self.output_names, {"WAV": batch, "WAV_LENS": np.concatenate(lens)}
        )
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, out[start : start + size])
                for name, out in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses


def _pad_concat(wavs: list) -> np.ndarray:
    longest = max(w.shape[1] for w in wavs)
    if all(w.shape[1] == longest for w in wavs):
        return np.concatenate(wavs)
    batch = np.zeros((sum(w.shape[0] for w in wavs), longest), dtype=np.float32)
    row = 0
    for w in wavs:
        batch[row : row + w.shape[0], : w.shape[1]] = w
        row += w.shape[0]
    return batch
