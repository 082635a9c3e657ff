"""Triton Python-backend model for a custom head (`e2v train-head`, cpu target).

`<repo>/head_NAME/1/model.py`: EMBEDDING [B, D] float32 -> SCORES [B, C] float32, and the
embedding unchanged as EMBEDDING_OUT, with the head's ONNX file in ONNX Runtime: the same
graph the gpu target's onnxruntime backend runs. The rows of every request in a dynamic
batch go through one ONNX Runtime call; a request whose embedding is malformed or not
finite gets its own INVALID_ARG error while the others are served.
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
        options.intra_op_num_threads = 1  # a few small matrix products: threads cost more
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(version_dir, params.get("onnx_file", "model.onnx")),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self.dim = int(config["input"][0]["dims"][0])

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        accepted: list[tuple[int, np.ndarray]] = []
        for index, request in enumerate(requests):
            rows = pb_utils.get_input_tensor_by_name(request, "EMBEDDING").as_numpy()
            if rows.ndim != 2 or rows.shape[1] != self.dim:
                problem = f"EMBEDDING must be [batch, {self.dim}], got {list(rows.shape)}"
            elif not np.isfinite(rows).all():
                problem = "EMBEDDING holds NaN or infinite values"
            else:
                accepted.append((index, rows))
                continue
            responses[index] = _error(problem, pb_utils.TritonError.INVALID_ARG)
        if accepted:
            self._run(accepted, responses)
        return responses

    def _run(self, accepted: list, responses: list) -> None:
        try:
            batch = np.concatenate([rows for _, rows in accepted]).astype(np.float32, copy=False)
            scores, passed = self.session.run(["SCORES", "EMBEDDING_OUT"], {"EMBEDDING": batch})
        except Exception as exc:  # noqa: BLE001 - reported to the requests it concerns
            for index, _ in accepted:
                responses[index] = _error(f"head failed: {exc}", pb_utils.TritonError.INTERNAL)
            return
        start = 0
        for index, rows in accepted:
            part = scores[start : start + len(rows)]
            same = passed[start : start + len(rows)]
            start += len(rows)
            if not np.isfinite(part).all():
                responses[index] = _error(
                    "the head produced non-finite scores", pb_utils.TritonError.INTERNAL
                )
                continue
            tensors = [
                pb_utils.Tensor("SCORES", np.ascontiguousarray(part)),
                pb_utils.Tensor("EMBEDDING_OUT", np.ascontiguousarray(same)),
            ]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)


def _error(message: str, code) -> object:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
