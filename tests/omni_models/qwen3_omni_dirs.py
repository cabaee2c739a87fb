"""Tiny Qwen3-Omni directories written by HF's own classes and save_pretrained, as a download looks: the
thinker alone (`qwen3_omni_moe_thinker`) or the whole model (`qwen3_omni_moe`: thinker, talker and
code2wav), with the family's processor (tokenizer with its named tokens and a chat template, image and
video processors, Whisper feature extractor). Nothing is downloaded; the tokenizer trains in a second."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.omni_data.fixtures import train_tokenizer

_CHAT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The named tokens Qwen3OmniMoeProcessor reads from the tokenizer, as the released tokenizer names them
NAMED = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}
# Text: 3 layers (DeepStack adds to the first 2), interleaved M-RoPE over head_dim 8, 4 experts top 2 with
# a load-balancing loss large enough to show
TEXT = {
    "vocab_size": 448,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "router_aux_loss_coef": 0.05,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6},
}
# Vision: a 4 x 4 learned position table resampled to each grid; DeepStack after both blocks. Patches of
# 16 px as released: the family's processor resizes every video frame to at least 128 x 32 x 32 pixels,
# whatever its video processor was saved with (Qwen3OmniMoeProcessor.videos_kwargs)
VISION = {
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 32,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 16,
    "deepstack_visual_indexes": [0, 1],
}
# Audio: chunks of 2 * n_window = 100 frames (13 tokens each: the family's token count assumes 50), attention
# in windows of two chunks' tokens (n_window_infer = 200 frames)
AUDIO = {
    "d_model": 16,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "num_mel_bins": 8,
    "n_window": 50,
    "n_window_infer": 200,
    "output_dim": 32,
    "max_source_positions": 64,
    "downsample_hidden_size": 8,
}
# The whole model's speech parts (talker, code2wav), not trained here
SPEECH = {
    "talker_config": {
        "text_config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 2,
                        "num_experts_per_tok": 1, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
                        "rope_parameters": TEXT["rope_parameters"]},
        "code_predictor_config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                                  "num_code_groups": 2},
        "num_code_groups": 2, "thinker_hidden_size": 32, "accept_hidden_layer": 1, "spatial_merge_size": 2,
        "codec_eos_token_id": 60, "codec_nothink_id": 61, "codec_think_bos_id": 62, "codec_think_eos_id": 63,
        "codec_pad_id": 58, "codec_bos_id": 59,
    },
    "code2wav_config": {"codebook_size": 16, "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
                        "intermediate_size": 32, "num_hidden_layers": 1, "num_quantizers": 2, "upsample_rates": [2, 2],
                        "upsampling_ratios": [2], "decoder_dim": 16, "sliding_window": 8},
}  # fmt: skip


def chat_template() -> str:
    """ChatML on string or structured content; a media part as the family's processor expects it: start
    marker, placeholder, end marker."""
    n = NAMED
    media = {
        "image": n["vision_bos_token"] + n["image_token"] + n["vision_eos_token"],
        "video": n["vision_bos_token"] + n["video_token"] + n["vision_eos_token"],
        "audio": n["audio_bos_token"] + n["audio_token"] + n["audio_eos_token"],
    }
    parts = "".join(f"{{% elif content['type'] == '{k}' %}}{v}" for k, v in media.items())
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}"
        f"{parts}{{% endif %}}{{% endfor %}}{{% endif %}}<|im_end|>\n{{% endfor %}}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def qwen3_omni_dir(
    root: Path, whole: bool = False, tie: bool = False, seed: int = 0, init: float = 0.5
) -> Path:
    """A random tiny Qwen3-Omni thinker (`whole`: inside the whole model) written by save_pretrained, with
    its processor. `init`: the initializer range of every part; large, so media, positions and DeepStack
    show in the loss."""
    import transformers

    tok = train_tokenizer((*_CHAT, *NAMED.values()))
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in NAMED.items()}
    chat = {t: tok.convert_tokens_to_ids(t) for t in _CHAT}
    text = {
        **TEXT,
        "initializer_range": init,
        "bos_token_id": chat["<|endoftext|>"],
        "eos_token_id": chat["<|im_end|>"],
        "pad_token_id": chat["<|endoftext|>"],
    }
    cfg = transformers.Qwen3OmniMoeThinkerConfig(
        text_config=text,
        vision_config={**VISION, "initializer_range": init},
        audio_config=AUDIO,  # its default range: at 0.5 its attention saturates and its gradients are noise
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        audio_token_id=ids["audio_token"],
        audio_start_token_id=ids["audio_bos_token"],
        vision_start_token_id=ids[
            "vision_bos_token"
        ],  # read by get_rope_index (the released configs carry it)
        position_id_per_seconds=13,  # as released, and as the processor lays out audio in video
        initializer_range=init,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    if whole:
        model = transformers.Qwen3OmniMoeForConditionalGeneration(
            transformers.Qwen3OmniMoeConfig(thinker_config=cfg.to_dict(), **SPEECH)
        )
        with torch.no_grad():  # HF's init leaves the talker's fused experts as torch.empty made them
            for name, p in model.talker.named_parameters():
                if ".mlp.experts." in name:
                    p.normal_(std=0.02)
    else:
        model = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(cfg)
    path = root / f"qwen3_omni_moe{'_whole' if whole else ''}{'_tied' if tie else ''}_{init}"
    model.save_pretrained(path)
    _save_processor(path, tok, VISION["patch_size"])
    return path


def _save_processor(path: Path, tok, patch: int) -> None:
    """Qwen3OmniMoeProcessor as save_pretrained writes it (processor_config.json, chat template, tokenizer),
    images of at most 4 x 4 patches (videos: see VISION)."""
    import transformers
    from transformers import AutoTokenizer

    tok.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path, extra_special_tokens=NAMED)
    geometry = {
        "min_pixels": (2 * patch) ** 2,
        "max_pixels": (4 * patch) ** 2,
        "patch_size": patch,
        "merge_size": 2,
    }
    transformers.Qwen3OmniMoeProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**geometry),
        video_processor=transformers.Qwen2VLVideoProcessor(**geometry),
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=AUDIO["num_mel_bins"]),
        tokenizer=tok,
        chat_template=chat_template(),
    ).save_pretrained(path)
