"""Config-only directories of the real Qwen3-VL models (config.json as the hub's, no weights): what a dry
run and `omni-train plan` read."""

from __future__ import annotations

from pathlib import Path

_ROPE = {
    "rope_type": "default",
    "rope_theta": 5000000.0,
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
}
_TEXT = {
    "vocab_size": 151936,
    "num_attention_heads": 32,
    "head_dim": 128,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_parameters": _ROPE,
}
_VISION = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "num_position_embeddings": 2304,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "deepstack_visual_indexes": [8, 16, 24],
    "hidden_act": "gelu_pytorch_tanh",
}
_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653, "tie_word_embeddings": False}  # fmt: skip


def qwen3_vl_8b_config_dir(root: Path) -> Path:
    """Qwen3-VL-8B-Instruct: a 36-layer dense text model, the 27-block vision tower with DeepStack."""
    from transformers import Qwen3VLConfig

    text = {**_TEXT, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_key_value_heads": 8}  # fmt: skip
    path = root / "Qwen3-VL-8B-Instruct"
    Qwen3VLConfig(
        text_config=text, vision_config={**_VISION, "out_hidden_size": 4096}, **_TOKENS
    ).save_pretrained(path)
    return path


def qwen3_vl_30b_a3b_config_dir(root: Path) -> Path:
    """Qwen3-VL-30B-A3B-Instruct: a 48-layer MoE text model (128 experts, 8 per token)."""
    from transformers import Qwen3VLMoeConfig

    text = {**_TEXT, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_hidden_layers": 48, "num_key_value_heads": 4, "num_experts": 128, "num_experts_per_tok": 8,
            "decoder_sparse_step": 1, "norm_topk_prob": True, "router_aux_loss_coef": 0.001}  # fmt: skip
    path = root / "Qwen3-VL-30B-A3B-Instruct"
    Qwen3VLMoeConfig(
        text_config=text, vision_config={**_VISION, "out_hidden_size": 2048}, **_TOKENS
    ).save_pretrained(path)
    return path


def qwen3_omni_30b_a3b_config_dir(root: Path) -> Path:
    """Qwen3-Omni-30B-A3B-Instruct: its thinker (the 48-layer MoE text model, the DeepStack vision tower and
    the 32-layer audio encoder) beside the talker and code2wav (speech; not built by a dry run)."""
    from transformers import Qwen3OmniMoeConfig

    text = {**_TEXT, "vocab_size": 152064, "hidden_size": 2048, "intermediate_size": 768,
            "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_key_value_heads": 4, "num_experts": 128,
            "num_experts_per_tok": 8, "decoder_sparse_step": 1, "norm_topk_prob": True,
            "rope_parameters": {**_ROPE, "rope_theta": 1000000.0}}  # fmt: skip
    audio = {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
             "output_dim": 2048, "num_mel_bins": 128, "n_window": 50, "n_window_infer": 800,
             "downsample_hidden_size": 480, "conv_chunksize": 500, "max_source_positions": 1500}  # fmt: skip
    vision = {**_VISION, "out_hidden_size": 2048}
    thinker = {"text_config": text, "vision_config": vision, "audio_config": audio}
    path = root / "Qwen3-Omni-30B-A3B-Instruct"
    Qwen3OmniMoeConfig(thinker_config=thinker).save_pretrained(path)
    return path
