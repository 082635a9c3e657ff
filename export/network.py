"""The exportable network: FunASR's Emotion2vec made exact for padded, variable-length batches.

FunASR runs one utterance at a time. A padded batch through its code is wrong for the
shorter rows (see docs in the README): normalisation includes the padding, padded frames
leak through the 5-layer positional convolution, and pooling is a plain mean. This
wrapper reuses FunASR's modules and weights and fixes exactly those three places.

    WAV [B, T] float32, WAV_LENS [B] int64  ->  SCORES [B, C], EMBEDDING [B, D]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from e2v.contract import MIN_SAMPLES, is_scored_label


class BatchedEmotion2vec(nn.Module):
    """Batched, padding-exact inference around a loaded FunASR `Emotion2vec`."""

    def __init__(self, model: nn.Module, labels: list[str]):
        super().__init__()
        encoder = model.modality_encoders["AUDIO"]
        cfg = encoder.modality_cfg
        self.normalize = bool(model.cfg.get("normalize", False))
        self.conv_spec = [(int(k), int(s)) for _, k, s in eval(cfg.feature_encoder_spec)]
        self.local_encoder = encoder.local_encoder
        self.project_features = encoder.project_features
        self.pos_pre_ln, self.pos_layers = _split_positional_encoder(
            encoder.relative_positional_encoder
        )
        self.extra_tokens = encoder.extra_tokens
        self.context_encoder = encoder.context_encoder
        self.prenet_depth = int(cfg.prenet_depth)
        self.alibi_scale = encoder.alibi_scale
        self.register_buffer("alibi_slopes", _alibi_slopes(int(cfg.num_alibi_heads)))
        self.blocks = model.blocks
        self.final_norm = model.norm
        self.proj = model.proj
        excluded = torch.tensor([not is_scored_label(label) for label in labels], dtype=torch.bool)
        self.register_buffer("excluded_labels", excluded)

    def forward(self, wav: torch.Tensor, wav_lens: torch.Tensor):
        batch = wav.shape[0]
        # Clips shorter than one frame give zero frames; padding by one receptive field
        # keeps the convolutions defined for any T (those rows return zeros below).
        wav = torch.cat([wav, wav.new_zeros(batch, MIN_SAMPLES)], dim=1)
        lens = torch.minimum(wav_lens.clamp(min=0), torch.full_like(wav_lens, wav.shape[1]))
        sample_valid = _positions(lens, wav.shape[1])[None, :] < lens[:, None]
        wav = self._normalise(wav, sample_valid, lens)

        x = self.project_features(self.local_encoder(wav))  # [B, T', D]
        frames = self.frame_counts(lens)
        frame_valid = _positions(frames, x.shape[1])[None, :] < frames[:, None]
        x = x + self._positional(x, frame_valid)

        padding_mask = F.pad(~frame_valid, (self.extra_tokens.shape[1], 0))
        x = torch.cat([self.extra_tokens.expand(batch, -1, -1), x], dim=1)
        alibi, scale = self._alibi(frame_valid.shape[1])
        x = self.context_encoder(
            x, padding_mask, alibi, scale[: self.prenet_depth] if scale is not None else None
        )
        main_scale = scale[self.prenet_depth :] if scale is not None else None
        for i, block in enumerate(self.blocks):
            bias = alibi if main_scale is None else alibi * main_scale[i].type_as(alibi)
            x, _ = block(x, padding_mask=padding_mask, alibi_bias=bias)
        if self.final_norm is not None:
            x = self.final_norm(x)
        x = x[:, self.extra_tokens.shape[1] :]

        has_frames = (frames > 0).to(x.dtype)[:, None]
        weights = frame_valid.to(x.dtype)[:, :, None]
        embedding = (x * weights).sum(1) / frames.clamp(min=1).to(x.dtype)[:, None]
        embedding = embedding * has_frames
        if self.proj is None:
            return (embedding,)
        logits = self.proj(embedding).masked_fill(self.excluded_labels, float("-inf"))
        scores = torch.softmax(logits, dim=-1) * has_frames
        return scores, embedding

    def frame_counts(self, lens: torch.Tensor) -> torch.Tensor:
        """Output frames of the conv feature encoder for `lens` valid samples."""
        frames = lens
        for kernel, stride in self.conv_spec:
            frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
            frames = frames.clamp(min=0)
        return frames

    def _normalise(self, wav: torch.Tensor, valid: torch.Tensor, lens: torch.Tensor):
        """FunASR's whole-utterance layer_norm (eps 1e-5), over valid samples only."""
        mask = valid.to(wav.dtype)
        wav = wav * mask
        if not self.normalize:
            return wav
        count = lens.clamp(min=1).to(wav.dtype)[:, None]
        mean = wav.sum(1, keepdim=True) / count
        centred = (wav - mean) * mask
        var = (centred * centred).sum(1, keepdim=True) / count
        return centred / torch.sqrt(var + 1e-5)

    def _positional(self, x: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """The relative positional conv stack with padded frames zeroed before each layer."""
        mask = frame_valid.to(x.dtype)[:, None, :]  # [B, 1, T']
        if self.pos_pre_ln is not None:
            x = self.pos_pre_ln(x)
        y = x.transpose(1, 2)
        for layer in self.pos_layers:
            y = layer(y * mask)
        return y.transpose(1, 2)

    def _alibi(self, frames: int):
        """ALiBi bias [1, H, N, N] (N = extra tokens + frames), the learned scale folded in
        when it is shared by all layers."""
        pos = _positions(self.alibi_slopes, frames)
        distance = -(pos[None, :] - pos[:, None]).abs()
        bias = self.alibi_slopes[:, None, None] * distance[None].to(self.alibi_slopes.dtype)
        n_extra = self.extra_tokens.shape[1]
        bias = F.pad(bias, (n_extra, 0, n_extra, 0))[None]
        scale = self.alibi_scale
        if scale is None:
            return bias, None
        scale = scale.clamp_min(0)
        if scale.shape[0] == 1:
            return bias * scale.squeeze(0).type_as(bias), None
        return bias, scale


def _positions(like: torch.Tensor, length: int) -> torch.Tensor:
    """0, 1, ..., length - 1 with the dtype and device of `like`.

    Not `torch.arange(..., device=...)`: tracing records that device as a constant, and the
    TorchScript module would then build its masks on the export machine's device.
    """
    return like.new_ones(length).cumsum(0) - 1


def _split_positional_encoder(module: nn.Sequential):
    """(optional pre-LayerNorm, [conv layers]) from FunASR's positional encoder."""
    pre_ln = None
    if not isinstance(module[0], nn.Sequential) and isinstance(module[0], nn.LayerNorm):
        pre_ln, module = module[0], module[1]
    layers = [m for m in module if isinstance(m, nn.Sequential)]
    return pre_ln, nn.ModuleList(layers)


def _alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes, as in FunASR's `get_alibi`."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_2(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
