"""What Triton itself enforces for the `gpu` and `tensorrt` targets (no Python runs there):
the rendered `config.pbtxt`, parsed with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import pytest
from e2v.export.repository import default_options, render_config
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from e2v.contract import MAX_SAMPLES, bucket_lengths_samples


def config_for(target: str) -> model_config_pb2.ModelConfig:
    text = render_config(
        "emotion2vec",
        target,
        default_options(target),
        9,
        768,
        {"synthetic": "true", "source": "test", "checkpoint_sha256": "0" * 64},
    )
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("target", ["gpu", "tensorrt"])
def test_gpu_targets_bound_batches_and_the_queue(target):
    config = config_for(target)
    assert config.max_batch_size == 32
    wav, lens = config.input
    assert (wav.name, wav.data_type, list(wav.dims)) == ("WAV", model_config_pb2.TYPE_FP32, [-1])
    assert (lens.name, lens.data_type, list(lens.dims)) == (
        "WAV_LENS",
        model_config_pb2.TYPE_INT64,
        [1],
    )
    policy = config.dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 512
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert policy.default_timeout_microseconds == 30_000_000
    # Triton lets a request ask for a shorter queue timeout, never a longer one.
    assert policy.allow_timeout_override


def test_tensorrt_profile_stops_at_a_full_batch_of_the_longest_bucket():
    accel = config_for("tensorrt").optimization.execution_accelerators
    parameters = accel.gpu_execution_accelerator[0].parameters
    longest = max(bucket_lengths_samples())
    assert longest == MAX_SAMPLES
    assert parameters["trt_profile_max_shapes"] == f"WAV:32x{longest},WAV_LENS:32"
