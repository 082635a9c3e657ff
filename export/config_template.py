"""The published emotion2vec `config.yaml`, parameterised by model size.

Values follow FunASR's emotion2vec+ model cards (data2vec 2.0 audio). Only the sizes
differ between tiny (tests), base (seed/base, ~94 M parameters) and large (~300 M).
"""

from __future__ import annotations

from dataclasses import dataclass

from e2v.contract import UNKNOWN_LABEL

# The published emotion2vec+ label set, in tokens.txt order.
PUBLISHED_LABELS = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    UNKNOWN_LABEL,
)


@dataclass(frozen=True)
class ModelSize:
    embed_dim: int
    num_heads: int
    depth: int  # main transformer blocks
    prenet_depth: int  # blocks inside the audio encoder
    conv_dim: int  # channels of the conv feature encoder
    decoder_dim: int  # pre-training decoder (unused at inference, present in checkpoints)


SIZES = {
    "tiny": ModelSize(
        embed_dim=64, num_heads=4, depth=2, prenet_depth=1, conv_dim=32, decoder_dim=32
    ),
    "base": ModelSize(
        embed_dim=768, num_heads=12, depth=8, prenet_depth=4, conv_dim=512, decoder_dim=384
    ),
    "large": ModelSize(
        embed_dim=1024, num_heads=16, depth=16, prenet_depth=8, conv_dim=512, decoder_dim=384
    ),
}


def model_config(size: ModelSize, with_head: bool = True) -> dict:
    """A `config.yaml` document (as a dict) in the layout FunASR publishes."""
    c = size.conv_dim
    config: dict = {
        "model": "Emotion2vec",
        "model_conf": {
            "loss_beta": 0.0,
            "loss_scale": None,
            "depth": size.depth,
            "start_drop_path_rate": 0.0,
            "end_drop_path_rate": 0.0,
            "num_heads": size.num_heads,
            "norm_eps": 1e-05,
            "norm_affine": True,
            "encoder_dropout": 0.1,
            "post_mlp_drop": 0.1,
            "attention_dropout": 0.1,
            "activation_dropout": 0.0,
            "dropout_input": 0.0,
            "layerdrop": 0.05,
            "embed_dim": size.embed_dim,
            "mlp_ratio": 4.0,
            "layer_norm_first": False,
            "average_top_k_layers": size.depth,
            "end_of_block_targets": False,
            "clone_batch": 8,
            "layer_norm_target_layer": False,
            "batch_norm_target_layer": False,
            "instance_norm_target_layer": True,
            "instance_norm_targets": False,
            "layer_norm_targets": False,
            "ema_decay": 0.999,
            "ema_same_dtype": True,
            "log_norms": True,
            "ema_end_decay": 0.99999,
            "ema_anneal_end_step": 20000,
            "ema_encoder_only": False,
            "max_update": 100000,
            "extractor_mode": "layer_norm",
            "shared_decoder": None,
            "min_target_var": 0.1,
            "min_pred_var": 0.01,
            "supported_modality": "AUDIO",
            "mae_init": False,
            "seed": 1,
            "skip_ema": False,
            "cls_loss": 1.0,
            "recon_loss": 0.0,
            "d2v_loss": 1.0,
            "decoder_group": False,
            "normalize": True,
            "modalities": {
                "audio": {
                    "type": "AUDIO",
                    "prenet_depth": size.prenet_depth,
                    "prenet_layerdrop": 0.05,
                    "prenet_dropout": 0.1,
                    "start_drop_path_rate": 0.0,
                    "end_drop_path_rate": 0.0,
                    "num_extra_tokens": 10,
                    "init_extra_token_zero": True,
                    "mask_noise_std": 0.01,
                    "mask_prob_min": None,
                    "inverse_mask": False,
                    "mask_prob": 0.55,
                    "mask_prob_adjust": 0.1,
                    "keep_masked_pct": 0.0,
                    "mask_length": 5,
                    "add_masks": False,
                    "remove_masks": False,
                    "mask_dropout": 0.0,
                    "encoder_zero_mask": True,
                    "mask_channel_prob": 0.0,
                    "mask_channel_length": 64,
                    "ema_local_encoder": False,
                    "local_grad_mult": 1.0,
                    "use_alibi_encoder": True,
                    "alibi_scale": 1.0,
                    "learned_alibi": False,
                    "alibi_max_pos": None,
                    "learned_alibi_scale": True,
                    "learned_alibi_scale_per_head": True,
                    "learned_alibi_scale_per_layer": False,
                    "num_alibi_heads": size.num_heads,
                    "model_depth": size.depth,
                    "decoder": {
                        "decoder_dim": size.decoder_dim,
                        "decoder_groups": 16,
                        "decoder_kernel": 7,
                        "decoder_layers": 4,
                        "input_dropout": 0.1,
                        "add_positions_masked": False,
                        "add_positions_all": False,
                        "decoder_residual": True,
                        "projection_layers": 1,
                        "projection_ratio": 2.0,
                    },
                    "extractor_mode": "layer_norm",
                    "feature_encoder_spec": (
                        f"[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c},2,2)] + [({c},2,2)]"
                    ),
                    "conv_pos_width": 95,
                    "conv_pos_groups": 16,
                    "conv_pos_depth": 5,
                    "conv_pos_pre_ln": False,
                }
            },
        },
    }
    if with_head:
        config["tokenizer"] = "CharTokenizer"
        config["tokenizer_conf"] = {"unk_symbol": UNKNOWN_LABEL, "split_with_space": True}
    return config


def configuration_json(with_head: bool = True) -> dict:
    """The ModelScope `configuration.json` that tells FunASR where each file is."""
    metas: dict = {"init_param": "model.pt", "config": "config.yaml"}
    if with_head:
        metas["tokenizer_conf"] = {"token_list": "tokens.txt"}
    return {
        "framework": "pytorch",
        "task": "emotion-recognition",
        "model": {"type": "funasr"},
        "pipeline": {"type": "funasr-pipeline"},
        "file_path_metas": metas,
    }
