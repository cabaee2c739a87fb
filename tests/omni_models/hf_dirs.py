"""Tiny pretrained HF omni model directories, as a user's download looks: HF's own class and processor
written by save_pretrained (weights, processor_config.json, chat template, tokenizer), and the real 7B
configs alone (what a dry run reads)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.omni_data.fixtures import train_tokenizer

_CHAT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Each family's marker tokens (the names its real tokenizer uses), in HF config terms.
MARKERS = {
    "qwen2_vl": {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image": "<|image_pad|>",
                 "video": "<|video_pad|>"},
    "qwen2_5_omni_thinker": {"vision_start": "<|vision_bos|>", "vision_end": "<|vision_eos|>", "image": "<|IMAGE|>",
                             "video": "<|VIDEO|>", "audio": "<|AUDIO|>", "audio_start": "<|audio_bos|>",
                             "audio_end": "<|audio_eos|>"},
}  # fmt: skip
MARKERS["qwen2_5_vl"] = MARKERS["qwen3_vl"] = MARKERS["qwen3_vl_moe"] = MARKERS["qwen2_vl"]
MARKERS["qwen2_5_omni"] = MARKERS["qwen2_5_omni_thinker"]
MARKERS["janus"] = {
    "image_start": "<begin_of_image>",
    "image": "<image_placeholder>",
    "image_end": "<end_of_image>",
}
# The named special tokens each family's processor reads from its tokenizer (tokenizer.image_token, ...)
_NAMED = {
    "qwen2_5_omni_thinker": {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                             "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                             "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    "janus": {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"},
}  # fmt: skip


def chat_template(family: str) -> str:
    """A ChatML template on string or structured content that renders a media part as the family's processor
    expects it: start marker, placeholder, end marker (Janus: the placeholder; its processor adds the markers)."""
    m = MARKERS[family]
    if family == "janus":
        media = {"image": m["image"]}
    else:
        media = {k: m["vision_start"] + m[k] + m["vision_end"] for k in ("image", "video")}
        if "audio" in m:
            media["audio"] = m["audio_start"] + m["audio"] + m["audio_end"]
    parts = "".join(f"{{% elif content['type'] == '{k}' %}}{v}" for k, v in media.items())
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}"
        f"{parts}{{% endif %}}{{% endfor %}}{{% endif %}}<|im_end|>\n{{% endfor %}}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _save_processor(path: Path, family: str, tok, **parts) -> None:
    """The family's whole HF processor (tokenizer with its named tokens and chat template, media processors)
    saved into `path` as save_pretrained writes it (processor_config.json, chat_template.jinja, tokenizer)."""
    import transformers
    from transformers import AutoTokenizer

    tok.save_pretrained(path)
    named = _NAMED.get("qwen2_5_omni_thinker" if family == "qwen2_5_omni" else family)
    tok = AutoTokenizer.from_pretrained(path, **({"extra_special_tokens": named} if named else {}))
    cls = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "janus": "JanusProcessor",
           "qwen3_vl": "Qwen3VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor"}  # fmt: skip
    name = cls.get(family, "Qwen2_5OmniProcessor")
    getattr(transformers, name)(tokenizer=tok, chat_template=chat_template(family), **parts).save_pretrained(
        path
    )


# The tiny vision towers of each family (Qwen2.5-VL: windows of 2x2 merged tokens, full attention in block 1)
_VISION_2_5 = {
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 32,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 16,
    "fullatt_block_indexes": [1],
}
# Qwen3-VL: a 4 x 4 learned position table resampled to each grid; DeepStack after both blocks
_VISION_3 = {
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 32,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 16,
    "deepstack_visual_indexes": [0, 1],
}
VISION = {
    "qwen2_vl": {
        "depth": 2,
        "embed_dim": 16,
        "hidden_size": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "qwen2_5_vl": {**_VISION_2_5, "tokens_per_second": 2},
    "qwen2_5_omni_thinker": _VISION_2_5,
    "qwen3_vl": _VISION_3,
    "qwen3_vl_moe": _VISION_3,
}
AUDIO = {"d_model": 16, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "num_mel_bins": 8,
         "n_window": 8, "output_dim": 32, "max_source_positions": 64}  # fmt: skip
FAMILIES = tuple(VISION)
# The whole Qwen2.5-Omni (thinker + speech talker + token2wav): its tiny speech parts
SPEECH = {
    "talker_config": {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "embedding_size": 32,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
    },
    "token2wav_config": {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "ff_mult": 1,
            "emb_dim": 16,
            "head_dim": 16,
            "enc_emb_dim": 16,
            "enc_dim": 16,
            "enc_channels": [16, 16, 16, 16, 32],
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 16,
            "enc_res2net_scale": 2,
            "enc_se_channels": 16,
            "mel_dim": 8,
            "num_embeds": 64,
            "repeats": 2,
            "block_size": 8,
            "look_ahead_layers": [0],
            "look_backward_layers": [0],
        },
        "bigvgan_config": {
            "mel_dim": 8,
            "upsample_initial_channel": 32,
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
            "upsample_rates": [2, 2],
            "upsample_kernel_sizes": [4, 4],
        },
    },
}
_NAMES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen2_5_omni_thinker": ("Qwen2_5OmniThinkerConfig", "Qwen2_5OmniThinkerForConditionalGeneration"),
    "qwen2_5_omni": ("Qwen2_5OmniConfig", "Qwen2_5OmniForConditionalGeneration"),
    "janus": ("JanusConfig", "JanusForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
}
# Qwen3-VL's text models: 3 layers (DeepStack adds to the first 2), interleaved M-RoPE over head_dim 8;
# the MoE's 4 experts, top 2, with a load-balancing loss large enough to show
_MROPE_3 = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 1e6}
TEXT = {
    "qwen3_vl": {"num_hidden_layers": 3, "head_dim": 8, "rope_parameters": _MROPE_3},
    "qwen3_vl_moe": {"num_hidden_layers": 3, "head_dim": 8, "rope_parameters": _MROPE_3, "num_experts": 4,
                     "num_experts_per_tok": 2, "moe_intermediate_size": 24, "router_aux_loss_coef": 0.05},
}  # fmt: skip


def hf_class(family: str) -> type:
    """HF's own class of the family: the referee."""
    import transformers

    return getattr(transformers, _NAMES[family][1])


def janus_dir(root: Path, tie: bool = False, seed: int = 0, init: float = 0.5) -> Path:
    """A random tiny Janus (16 px understanding images -> 16 tokens; 8 px generated images <-> 16 codes of
    a 64-entry codebook) written by HF's save_pretrained, with its tokenizer and image processor."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor

    tok = train_tokenizer((*_CHAT, *MARKERS["janus"].values()))
    chat = {t: tok.convert_tokens_to_ids(t) for t in _CHAT}
    cfg = JanusConfig(
        text_config={"model_type": "llama", "vocab_size": 448, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "initializer_range": init, "bos_token_id": chat["<|endoftext|>"],
                     "eos_token_id": chat["<|im_end|>"], "pad_token_id": chat["<|endoftext|>"]},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4, "projection_dim": 32, "depth": 2, "num_image_tokens": 16},
        vq_config={"base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1, "latent_channels": 32,
                   "embed_dim": 8, "num_embeddings": 64, "projection_dim": 32, "image_token_embed_dim": 32},
        image_token_id=tok.convert_tokens_to_ids(MARKERS["janus"]["image"]),
        tie_word_embeddings=tie,
        initializer_range=init,
    )  # fmt: skip
    torch.manual_seed(seed)
    path = root / f"janus{'_tied' if tie else ''}_{init}"
    JanusForConditionalGeneration(cfg).save_pretrained(path)
    image = JanusImageProcessor(size={"height": 16, "width": 16})
    _save_processor(path, "janus", tok, image_processor=image, num_image_tokens=16)
    return path


def qwen_vl_dir(
    root: Path,
    family: str = "qwen2_vl",
    tie: bool = False,
    seed: int = 0,
    init: float = 0.5,
    text_dims: dict | None = None,
    vision: dict | None = None,
    max_pixels: int = 32 * 32,
) -> Path:
    """A random tiny model of `family` written by HF's save_pretrained (weights, and the family's whole
    processor: tokenizer, chat template, image and video processors, audio feature extractor). `init`: the
    initializer range; large, so logits are far from uniform and positions and media features show in the
    loss. `text_dims`, `vision` and `max_pixels` size it otherwise (benches)."""
    import transformers

    if family == "janus":
        return janus_dir(root, tie, seed, init)
    thinker = "qwen2_5_omni_thinker" if family == "qwen2_5_omni" else family
    markers = MARKERS[family]
    tok = train_tokenizer((*_CHAT, *markers.values()))
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in markers.items()}
    chat = {t: tok.convert_tokens_to_ids(t) for t in _CHAT}
    text = {
        "vocab_size": 448,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": init,
        "bos_token_id": chat["<|endoftext|>"],
        "eos_token_id": chat["<|im_end|>"],
        "pad_token_id": chat["<|endoftext|>"],
        **TEXT.get(family, {}),
        **(text_dims or {}),
    }
    vision = vision or VISION[thinker]
    if family in TEXT:  # Qwen3-VL's tower initialises by its own config's range
        vision = {"initializer_range": init, **vision}
    tokens = {"vision_start_token_id": ids["vision_start"], "vision_end_token_id": ids["vision_end"]}
    if thinker == "qwen2_5_omni_thinker":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}
        tokens |= {
            "image_token_index": ids["image"],
            "video_token_index": ids["video"],
            "audio_token_index": ids["audio"],
            "audio_start_token_id": ids["audio_start"],
            "audio_end_token_id": ids["audio_end"],
        }
        towers = {"audio_config": AUDIO, "initializer_range": init}
    else:
        if family not in TEXT:
            text.setdefault("rope_scaling", {"type": "mrope", "mrope_section": [1, 1, 2]})
        tokens |= {"image_token_id": ids["image"], "video_token_id": ids["video"]}
        towers = {}
    cfg = getattr(transformers, _NAMES[thinker][0])(
        text_config=text, vision_config=vision, tie_word_embeddings=tie, **tokens, **towers
    )
    if family == "qwen2_5_omni":
        cfg = transformers.Qwen2_5OmniConfig(thinker_config=cfg.to_dict(), **SPEECH)
    torch.manual_seed(seed)
    path = root / f"{family}{'_tied' if tie else ''}_{init}"
    hf_class(family)(cfg).save_pretrained(path)
    if family == "qwen2_5_omni":  # the speakers file HF's from_pretrained reads beside the weights
        torch.save({"Chelsie": {"bos_token": 0}}, path / "spk_dict.pt")
    patch = vision["patch_size"]
    geometry = {
        "min_pixels": (2 * patch) ** 2,
        "max_pixels": max_pixels,
        "patch_size": patch,
        "merge_size": 2,
    }
    if family.startswith("qwen3_vl"):  # its size bounds a whole video's pixels
        size = {"shortest_edge": geometry.pop("min_pixels"), "longest_edge": geometry.pop("max_pixels")}
        video = transformers.Qwen3VLVideoProcessor(**geometry, size=size, cap_pixels_per_frame=False)
        geometry |= {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
    else:
        video = transformers.Qwen2VLVideoProcessor(**geometry)
    parts = {"image_processor": transformers.Qwen2VLImageProcessor(**geometry), "video_processor": video}
    if thinker == "qwen2_5_omni_thinker":
        parts["feature_extractor"] = transformers.WhisperFeatureExtractor(feature_size=AUDIO["num_mel_bins"])
    _save_processor(path, family, tok, **parts)
    return path


def released_expert_layout(path: Path) -> Path:
    """A Qwen3-VL-MoE directory's fused experts rewritten as its released checkpoints store them,
    transposed ((E, H, 2I), (E, I, H)); save_pretrained writes them as in memory. In place."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    for k, t in tensors.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[k] = t.transpose(1, 2).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def qwen2_vl_7b_config_dir(root: Path) -> Path:
    """Qwen2-VL-7B-Instruct's config.json alone (no weights): what a dry run needs."""
    from transformers import Qwen2VLConfig

    cfg = Qwen2VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        },
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )  # fmt: skip
    path = root / "Qwen2-VL-7B-Instruct"
    cfg.save_pretrained(path)
    return path


def qwen2_5_omni_7b_config_dir(root: Path) -> Path:
    """Qwen2.5-Omni-7B's config.json alone (the thinker's real dims; speech parts at HF's defaults)."""
    from transformers import Qwen2_5OmniConfig

    thinker = {
        "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        "audio_config": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
                         "encoder_ffn_dim": 5120, "num_mel_bins": 128, "n_window": 100, "output_dim": 3584,
                         "max_source_positions": 1500},
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    }  # fmt: skip
    path = root / "Qwen2.5-Omni-7B"
    Qwen2_5OmniConfig(thinker_config=thinker).save_pretrained(path)
    return path
