"""A tiny omni model (Qwen2 foundation; Qwen2-VL vision for image+video; Whisper for audio) and data."""

from __future__ import annotations

import io
import random

import numpy as np

from omni_data.collate import collate
from omni_data.processor import ChatProcessor
from omni_data.schema import parse_sample
from omni_dist.packed import PackedBatch
from omni_models.config import OmniModelConfig
from tests.omni_data.fixtures import png, tokenizer

VISION = {
    "depth": 2,
    "embed_dim": 16,
    "num_heads": 2,
    "mlp_ratio": 2,
    "hidden_size": 24,
    "patch_size": 4,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_channels": 3,
}
VISION_OPTIONS = {"min_pixels": 8 * 8, "max_pixels": 32 * 32, "video_fps": 4.0, "video_max_frames": 4}
WHISPER = {
    "d_model": 16,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "num_mel_bins": 8,
    "max_source_positions": 16,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 16,
    "vocab_size": 8,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "decoder_start_token_id": 0,
}


# Janus's VQ-VAE, tiny: 16x16 images -> 4x4 = 16 codes from a 64-entry codebook.
VQ = {
    "base_channels": 32,
    "channel_multiplier": [1, 2, 2],
    "num_res_blocks": 1,
    "latent_channels": 32,
    "embed_dim": 8,
    "num_embeddings": 64,
    "num_patches": 4,
}


def foundation_config(**kw) -> dict:
    return {
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "dtype": "float32",
        **kw,
    }


def omni_config(freeze_encoders: bool = False, decoder: bool = False, **kw) -> OmniModelConfig:
    return OmniModelConfig.from_dict(omni_spec(freeze_encoders, decoder, **kw))


def omni_spec(freeze_encoders: bool = False, decoder: bool = False, **kw) -> dict:
    """The tiny omni model's `model` section (image + video, audio; with `decoder`, VQ image generation)."""
    return {
        "foundation": {"name": "qwen2", "config": foundation_config()},
        "encoders": {
            "vision": {
                "name": "qwen2_vl_vision",
                "modalities": ["image", "video"],
                "config": VISION,
                "options": VISION_OPTIONS,
                "freeze": freeze_encoders,
            },
            "audio": {
                "name": "whisper",
                "modalities": ["audio"],
                "config": WHISPER,
                "freeze": freeze_encoders,
            },
        },
        **(
            {"decoders": {"image_gen": {"name": "janus_vq", "modalities": ["image"], "config": VQ}}}
            if decoder
            else {}
        ),
        **kw,
    }


def wav(seconds: float, seed: int, rate: int = 16000) -> bytes:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    sf.write(buf, (rng.standard_normal(int(seconds * rate)) * 0.1).astype("float32"), rate, format="WAV")
    return buf.getvalue()


def mp4(
    frames: int, seed: int, w: int = 16, h: int = 16, fps: int = 4, audio_rate: int | None = None
) -> bytes:
    """Random frames (mpeg4); with `audio_rate`, an AAC audio track of noise as long as the video."""
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        a = None if audio_rate is None else c.add_stream("aac", rate=audio_rate, layout="mono")
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24"
            )
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            wave = (rng.standard_normal((1, frames * audio_rate // fps)) * 0.1).astype("float32")
            track = av.AudioFrame.from_ndarray(wave, format="flt", layout="mono")
            track.sample_rate = audio_rate
            for p in [*a.encode(track), *a.encode()]:
                c.mux(p)
    return buf.getvalue()


def chat_processor(model) -> ChatProcessor:
    procs = {m: model.encoders[model.modality_encoder[m]].processor(m) for m in model.modality_encoder}
    targets = {m: model.decoders[model.modality_decoder[m]].processor(m) for m in model.modality_decoder}
    return ChatProcessor(tokenizer(), media=procs, targets=targets)


def draw_sample(i: int) -> tuple[dict, dict]:
    """'draw d' -> a generated image (one fixed pattern per d)."""
    d = i % 4
    return {
        "id": f"d{i}",
        "messages": [
            {"role": "user", "content": f"draw {['zero', 'one', 'two', 'three'][d]}"},
            {"role": "assistant", "content": [{"type": "image", "media": "g.png", "generate": True}]},
        ],
    }, {"g.png": png(16, 16, 1000 + d)}


def sample(i: int, modalities: tuple[str, ...]) -> dict:
    rng = random.Random(i)
    content, files = [{"type": "text", "text": f"item {i} "}], {}
    for m in modalities:
        name = {"image": "0.png", "video": "1.mp4", "audio": "2.wav"}[m]
        files[name] = {
            "image": lambda: png(8 * rng.randint(1, 3), 8 * rng.randint(1, 3), i),
            "video": lambda: mp4(rng.randint(2, 5), i),
            "audio": lambda: wav(rng.uniform(0.05, 0.5), i),
        }[m]()
        content.append({"type": m, "media": name})
    words = ["cat", "dog", "red", "blue", "sound", "video"]
    answer = " ".join(rng.choice(words) for _ in range(4))
    return {
        "id": f"x{i}",
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
    }, files


def micro_batch(proc: ChatProcessor, samples: list[tuple[dict, dict]], pad_to: int = 1) -> PackedBatch:
    processed = []
    for doc, files in samples:
        s = parse_sample(doc, key=doc["id"], source="t", media_bytes=files.get, read_path=None)
        processed.append(proc.process(proc.measure(s)))
    return collate(processed, pad_to_multiple=pad_to)
