"""Processors: the count made before decoding matches what decoding produces; bad bytes are ValueErrors."""

from __future__ import annotations

import pytest
import torch

from omni_data.processor import ChatProcessor
from omni_data.schema import MediaItem, SampleError, parse_sample
from omni_dist.packed import MediaBatch, PackedBatch
from omni_models.config import OmniModelConfig, build_omni_model
from omni_models.media import decode_audio
from tests.omni_data.fixtures import png, tokenizer
from tests.omni_models.omni_fixtures import VISION, VISION_OPTIONS, foundation_config, mp4, omni_config, wav


def _encoders():
    return build_omni_model(omni_config()).encoders


def test_image_video_audio_counts_match_the_processed_tensors():
    enc = _encoders()
    vision, audio = enc["vision"], enc["audio"]
    g = vision.tower.config
    cases = [
        (vision.processor("image"), MediaItem("image", "a.png", png(40, 24, 0))),
        (vision.processor("video"), MediaItem("video", "v.mp4", mp4(7, 1, w=24, h=16))),
        (vision.processor("video"), MediaItem("video", "v.mp4", mp4(1, 2))),
    ]
    for proc, item in cases:
        count = proc.count(item)
        out = proc.process(item)
        rows = out["pixel_values"].shape[0]
        assert rows == count.encoder_units == int(out["grid_thw"].prod())
        assert count.llm_tokens == rows // g.spatial_merge_size**2
        assert out["pixel_values"].shape[1] == 3 * g.temporal_patch_size * g.patch_size**2
        feats = vision.lm_encode({item.modality: MediaBatch.of([out], [count.llm_tokens])})
        assert feats[item.modality].shape == (count.llm_tokens, vision.output_size)
    for seconds, rate in ((0.05, 16000), (0.7, 22050), (0.31, 8000)):
        item = MediaItem("audio", "a.wav", wav(seconds, 3, rate))
        proc = audio.processor("audio")
        count = proc.count(item)
        out = proc.process(item)
        assert out["input_features"].shape[0] * audio.window // 2 == count.encoder_units
        feats = audio.lm_encode({"audio": MediaBatch.of([out], [count.llm_tokens])})["audio"]
        assert feats.shape == (count.llm_tokens, audio.output_size)
    assert decode_audio(wav(0.5, 0, 22050), 16000).shape == (8000,)


def test_image_sizes_follow_the_processors_bounds():
    vision = _encoders()["vision"]
    proc = vision.processor("image")
    lo, hi = VISION_OPTIONS["min_pixels"], VISION_OPTIONS["max_pixels"]
    unit = (vision.tower.config.patch_size * vision.tower.config.spatial_merge_size) ** 2
    for w, h in [(10, 10), (1000, 700), (28, 150), (333, 77)]:
        count = proc.count(MediaItem("image", "a.png", png(w, h, 0)))
        assert lo <= count.llm_tokens * unit <= hi, (w, h, count)
    with pytest.raises(ValueError, match="aspect ratio"):
        proc.count(MediaItem("image", "a.png", png(5, 1500, 0)))


def test_corrupt_media_is_a_decode_error_for_the_data_side():
    enc = _encoders()
    for modality, proc in (
        ("image", enc["vision"].processor("image")),
        ("video", enc["vision"].processor("video")),
        ("audio", enc["audio"].processor("audio")),
    ):
        with pytest.raises(ValueError):
            proc.count(MediaItem(modality, "x.bin", b"\x00garbage" * 50))
    chat = ChatProcessor(tokenizer(), media={"image": enc["vision"].processor("image")})
    doc = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "media": "0.png"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    sample = parse_sample(
        doc, key="k", source="s", media_bytes={"0.png": b"\x89PNG broken"}.get, read_path=None
    )
    with pytest.raises(SampleError) as e:
        chat.measure(sample)
    assert e.value.reason == "decode_error"


def test_siglip_encoder_and_every_registered_foundation_run():
    cfg = OmniModelConfig.from_dict(
        {
            "foundation": {"name": "qwen2", "config": foundation_config()},
            "encoders": {
                "image": {
                    "name": "siglip",
                    "modalities": ["image"],
                    "projector": "linear",
                    "config": {
                        "hidden_size": 16,
                        "intermediate_size": 32,
                        "num_hidden_layers": 2,
                        "num_attention_heads": 2,
                        "image_size": 32,
                        "patch_size": 8,
                    },
                }
            },
        }
    )
    model = build_omni_model(cfg)
    proc = model.encoders["image"].processor("image")
    item = MediaItem("image", "a.png", png(20, 50, 1))
    out = proc.process(item)
    feats = model.encoders["image"].lm_encode({"image": MediaBatch.of([out], [proc.count(item).llm_tokens])})[
        "image"
    ]
    assert feats.shape == (16, 16) and out["pixel_values"].shape == (1, 3, 32, 32)
    small = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
    }
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    for name, extra in (("llama", {}), ("qwen3", {}), ("qwen3_moe", moe)):
        model = build_omni_model(
            OmniModelConfig.from_dict(
                {
                    "foundation": {"name": name, "config": {**small, **extra}},
                    "encoders": {
                        "vision": {
                            "name": "qwen2_vl_vision",
                            "modalities": ["image"],
                            "config": VISION,
                            "options": {"min_pixels": 64, "max_pixels": 1024},
                        }
                    },
                }
            )
        )
        cu = torch.tensor([0, 5, 9], dtype=torch.int32)
        batch = PackedBatch(
            input_ids=torch.randint(0, 64, (1, 9)),
            position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]),
            labels=torch.randint(0, 64, (1, 9)),
            cu_seqlens=cu,
            max_seqlen=5,
            num_tokens=9,
        )
        out = model(batch)
        out.loss_sum.backward()
        assert out.label_tokens == 9 and torch.isfinite(out.loss_sum)
        # MoE foundations train their router's load-balancing loss too (HF's default coefficient)
        assert (out.aux_loss is not None and out.aux_loss > 0) == (name == "qwen3_moe"), name
        assert model.flops(batch)["foundation"] > 0
