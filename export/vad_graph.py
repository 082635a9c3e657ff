"""Build the batched Silero graph (client/silero/silero_vad_16k_batched.onnx) from Silero's.

Silero's sequence model spends most of its time in five small 1-D convolutions (the STFT
and the encoder, over 4 time steps per frame): ONNX Runtime runs each as one tiny GEMM per
frame. The batched graph computes the same convolutions as one GEMM over all frames
(im2col by Slice/Concat, the K index ordered (channel, tap) as ONNX Runtime's own im2col),
and takes several streams at once: input [B, T, 576] frames -> the same encoder on B*T
frames -> the same LSTM with batch B and `sequence_lens` [B] -> speech_probs [B, T],
hn/cn [1, B, 128]. Weights are Silero's, reshaped only.

Run `python -m e2v.export.vad_graph` to regenerate the vendored file (needs the `onnx`
package, a dev dependency; the client itself needs only onnxruntime).
`tests/test_vad_speed.py` checks that the vendored file equals a fresh build and that
its probabilities match Silero's own model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

FRAME_INPUT = 576  # 64 samples of context + a 512-sample frame
HIDDEN = 128
# GEMM columns per MatMul: MLAS then sums K in one pass, as in Silero's per-frame Conv.
GROUP = 32


def build(source: Path):
    """The batched graphs (encoder, recurrent: onnx.ModelProto) from Silero's model at `source`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    silero = onnx.load(str(source))
    weights = {t.name: numpy_helper.to_array(t) for t in silero.graph.initializer}
    nodes: list = []
    inits: dict = {}

    def const(name: str, value: np.ndarray) -> str:
        inits.setdefault(name, numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def ints(name: str, *values: int) -> str:
        return const(name, np.array(values, dtype=np.int64))

    def matmul(x: str, matrix: np.ndarray, bias: np.ndarray | None, tag: str) -> str:
        """x @ matrix (+ bias) in column groups of GROUP (see the module docstring)."""
        groups = []
        for g in range(0, matrix.shape[1], GROUP):
            part = const(f"{tag}_w{g}", matrix[:, g : g + GROUP].copy())
            groups.append(node("MatMul", [x, part], f"{tag}_mm{g}"))
        y = node("Concat", groups, f"{tag}_mm", axis=-1) if len(groups) > 1 else groups[0]
        return y if bias is None else node("Add", [y, const(f"{tag}_b", bias)], f"{tag}_add")

    def conv(x: str, length: int, layer: str, stride: int) -> str:
        """Silero's Conv (3 taps, padding 1) + ReLU, x [N, length, C] -> [N, out, O]:
        im2col with K ordered (channel, tap) as ONNX Runtime's Conv, then one GEMM."""
        weight = weights[f"{layer}.weight"]  # [O, C, K]
        out_ch, in_ch, taps = weight.shape
        out_len = (length + 2 - taps) // stride + 1
        tag = layer.replace(".", "_")
        x = node("Pad", [x, ints(f"{tag}_pads", 0, 1, 0, 0, 1, 0)], f"{tag}_padded")
        columns = []
        for k in range(taps):
            bounds = [ints(f"{tag}_s{k}", k), ints(f"{tag}_e{k}", k + stride * (out_len - 1) + 1)]
            tap = node(
                "Slice", [x, *bounds, ints("axis1", 1), ints(f"st{stride}", stride)], f"{tag}_t{k}"
            )
            columns.append(node("Unsqueeze", [tap, ints("axis3", 3)], f"{tag}_u{k}"))
        x = node("Concat", columns, f"{tag}_taps", axis=3)  # [N, out, C, K]
        x = node("Reshape", [x, ints(f"{tag}_cols_shape", 0, out_len, -1)], f"{tag}_cols")
        matrix = weight.reshape(out_ch, in_ch * taps).T
        return node("Relu", [matmul(x, matrix, weights[f"{layer}.bias"], tag)], tag)

    def silero_conv(x: str, layer: str, stride: int, relu: bool = True) -> str:
        """Silero's Conv node itself, on [N, C, L] (padding 1 for its 3-tap kernels)."""
        weight = weights[f"{layer}.weight"]
        pad = weight.shape[2] // 2
        inputs = [
            x,
            const(f"{layer}.weight", weight),
            const(f"{layer}.bias", weights[f"{layer}.bias"]),
        ]
        attrs = {"kernel_shape": [weight.shape[2]], "strides": [stride], "pads": [pad, pad]}
        tag = layer.replace(".", "_")
        nodes.append(helper.make_node("Conv", inputs, [f"{tag}_conv"], name=f"{tag}_conv", **attrs))
        return node("Relu", [f"{tag}_conv"], tag) if relu else f"{tag}_conv"

    # Frames of all streams: [B, T, 576] -> [N, 576]; Silero reflects 64 samples at the end.
    flat = node("Reshape", ["input", ints("flat_shape", -1, FRAME_INPUT)], "flat")
    padded = node("Pad", [flat, ints("stft_pads", 0, 0, 0, 64)], "stft_padded", mode="reflect")
    # STFT: 4 windows of 256 samples, hop 128 (Silero drops the first of its 5).
    hops = node("Reshape", [padded, ints("hops_shape", 0, 5, 128)], "hops")
    first = node("Slice", [hops, ints("h0s", 0), ints("h0e", 4), ints("h_ax", 1)], "hop_a")
    second = node("Slice", [hops, ints("h1s", 1), ints("h1e", 5), ints("h_ax", 1)], "hop_b")
    windows = node("Concat", [first, second], "windows", axis=2)
    basis = weights["stft.forward_basis_buffer"][:, 0, :]  # [258, 256]
    spectrum = matmul(windows, basis.T, None, "stft")
    real = node("Slice", [spectrum, ints("re_s", 0), ints("re_e", 129), ints("axis2", 2)], "re")
    imag = node("Slice", [spectrum, ints("im_s", 129), ints("im_e", 258), ints("axis2", 2)], "im")
    power = node(
        "Add", [node("Mul", [real, real], "re2"), node("Mul", [imag, imag], "im2")], "power"
    )
    x = node("Sqrt", [power], "magnitude")  # [N, 4, 129]
    x = conv(x, 4, "encoder.0", 1)
    x = conv(x, 4, "encoder.1", 2)
    # encoder.2 and .3 have one output step per frame: Silero's own Conv per frame (a
    # matrix-vector product, whose summation order a GEMM would not reproduce; cheap).
    x = node("Transpose", [x], "encoder_1_nct", perm=[0, 2, 1])  # [N, 64, 2]
    x = silero_conv(x, "encoder.2", 2)
    x = silero_conv(x, "encoder.3", 1)  # [N, 128, 1]
    # LSTM: [T, B, 128], batch B, each stream its own length.
    shape = node("Shape", ["input"], "input_shape")
    bt = node("Slice", [shape, ints("bt_s", 0), ints("bt_e", 2)], "bt")
    bt_c = node("Concat", [bt, ints("feat", HIDDEN)], "bt_c", axis=0)
    x = node("Reshape", [x, bt_c], "features_btc")
    nodes.append(helper.make_node("Transpose", [x], ["features"], perm=[1, 0, 2]))  # [T, B, 128]
    encoder_nodes, encoder_inits = nodes, inits
    nodes, inits = [], {}
    lstm_in = ["features", "onnx::LSTM_209", "onnx::LSTM_210", "onnx::LSTM_211"]
    for name in lstm_in[1:]:
        const(name, weights[name])
    lstm_in += ["sequence_lens", "h", "c"]
    nodes.append(
        helper.make_node("LSTM", lstm_in, ["lstm_y", "hn", "cn"], name="lstm", hidden_size=HIDDEN)
    )
    y = node("Squeeze", ["lstm_y", ints("y_ax", 1)], "lstm_sq")  # [T, B, 128]
    y = node("Relu", [y], "lstm_relu")
    y = node("Transpose", [y], "lstm_bct", perm=[1, 2, 0])  # [B, 128, T], as Silero's
    y = node("Sigmoid", [silero_conv(y, "output", 1, relu=False)], "out_sigmoid")  # [B, 1, T]
    nodes.append(helper.make_node("Squeeze", [y, ints("axis1", 1)], ["speech_probs"]))

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    state = [helper.make_tensor_value_info(n, f32, [1, "B", HIDDEN]) for n in ("h", "c")]
    state_out = [helper.make_tensor_value_info(n, f32, [1, "B", HIDDEN]) for n in ("hn", "cn")]
    features = helper.make_tensor_value_info("features", f32, ["T", "B", HIDDEN])
    encoder = helper.make_graph(
        encoder_nodes,
        "silero_vad_encoder",
        [helper.make_tensor_value_info("input", f32, ["B", "T", FRAME_INPUT])],
        [features],
        list(encoder_inits.values()),
    )
    recurrent = helper.make_graph(
        nodes,
        "silero_vad_recurrent",
        [features, helper.make_tensor_value_info("sequence_lens", i32, ["B"]), *state],
        [helper.make_tensor_value_info("speech_probs", f32, ["B", "T"]), *state_out],
        list(inits.values()),
    )
    models = []
    for graph in (encoder, recurrent):
        model = helper.make_model(
            graph, opset_imports=list(silero.opset_import), producer_name="emotion2vec-triton"
        )
        model.ir_version = silero.ir_version
        onnx.checker.check_model(model)
        models.append(model)
    return tuple(models)


def main() -> int:
    from e2v.client.vad import batched_model_paths, silero_model_path

    for model, path in zip(build(silero_model_path()), batched_model_paths(), strict=True):
        path.write_bytes(model.SerializeToString())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
