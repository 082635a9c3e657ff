"""Serialise the batched network to ONNX and TorchScript with dynamic batch and length.

Exporter choice (pinned): the TorchScript-based ("legacy") `torch.onnx.export` with
`dynamo=False` at opset 17. It handles the data-dependent masking here without
`onnxscript`, and its graph matched PyTorch to ~1e-6 from 0.03 s to 30 s inputs. The
dynamo exporter (default since torch 2.9) is not used.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from e2v.export.network import BatchedEmotion2vec

from e2v.contract import INPUT_WAV, INPUT_WAV_LENS, OUTPUT_EMBEDDING, OUTPUT_SCORES, SAMPLE_RATE

ONNX_OPSET = 17
ONNX_EXPORTER = "torch.onnx.export(dynamo=False)"


def output_names(net: BatchedEmotion2vec) -> list[str]:
    return [OUTPUT_EMBEDDING] if net.proj is None else [OUTPUT_SCORES, OUTPUT_EMBEDDING]


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch: tracing must see rows with padding so the masking path is recorded."""
    generator = torch.Generator().manual_seed(0)
    wav = torch.randn(2, SAMPLE_RATE, generator=generator) * 0.1  # one second
    lens = torch.tensor([SAMPLE_RATE, 9000], dtype=torch.int64)
    wav[1, 9000:] = 0
    return wav, lens


def export_onnx(net: BatchedEmotion2vec, path: Path) -> Path:
    """Write `path` (ONNX, opset 17) with tensor names WAV, WAV_LENS -> SCORES, EMBEDDING."""
    names = output_names(net)
    dynamic = {INPUT_WAV: {0: "batch", 1: "samples"}, INPUT_WAV_LENS: {0: "batch"}}
    dynamic |= {name: {0: "batch"} for name in names}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the (always-true) padding branch
        torch.onnx.export(
            net,
            example_inputs(),
            str(path),
            input_names=[INPUT_WAV, INPUT_WAV_LENS],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(str(path))
    return path


class _TritonNamedInputs(torch.nn.Module):
    """Forward arguments named like the Triton inputs: the PyTorch backend maps inputs
    by argument name, and outputs (SCORES, EMBEDDING) by their order in the config."""

    def __init__(self, net: BatchedEmotion2vec):
        super().__init__()
        self.net = net

    def forward(self, WAV: torch.Tensor, WAV_LENS: torch.Tensor):  # noqa: N803
        return self.net(WAV, WAV_LENS)


def export_torchscript(net: BatchedEmotion2vec, path: Path) -> Path:
    """Write a traced TorchScript module (for Triton's `pytorch_libtorch` backend)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_TritonNamedInputs(net), example_inputs(), check_trace=False)
    traced.save(str(path))
    return path
