"""Tiny pretrained HF omni model directories (save_pretrained, as a user's download looks) and helpers
to run HF's own class on our samples: the referee of tests/omni_models/test_pretrained_*.py."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from omni_data.collate import collate
from omni_data.processor import ProcessedSample
from omni_data.schema import parse_sample
from omni_dist import ParallelMesh
from omni_dist.packed import PackedBatch
from omni_dist.weights import materialize_
from omni_models.config import OmniModelConfig, build_omni_model
from omni_models.families.mrope import TOKEN_TYPES
from omni_models.omni import OmniModel
from omni_models.omni_weights import init_omni_weights_, load_part_weights_
from omni_models.parallel import parallelize_omni
from tests.omni_data.fixtures import WORDS, train_tokenizer
from tests.omni_models.omni_fixtures import mp4, png, wav

_CHAT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Each family's marker tokens (the names its real tokenizer uses), in HF config terms.
MARKERS = {
    "qwen2_vl": {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image": "<|image_pad|>",
                 "video": "<|video_pad|>"},
    "qwen2_5_omni_thinker": {"vision_start": "<|vision_bos|>", "vision_end": "<|vision_eos|>", "image": "<|IMAGE|>",
                             "video": "<|VIDEO|>", "audio": "<|AUDIO|>", "audio_start": "<|audio_bos|>",
                             "audio_end": "<|audio_eos|>"},
}  # fmt: skip
MARKERS["qwen2_5_vl"] = MARKERS["qwen2_vl"]
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
    cls = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "janus": "JanusProcessor"}
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
}


def hf_class(family: str) -> type:
    """HF's own class of the family: the referee."""
    import transformers

    return getattr(transformers, _NAMES[family][1])


def referee(family: str, path: Path):
    """HF's model that computes what ours does: the family's class from `path` (the whole Qwen2.5-Omni:
    its thinker), fp32, sdpa."""
    hf = hf_class(family).from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    return hf.thinker if family == "qwen2_5_omni" else hf


def hf_name(family: str, ours: str) -> str:
    """Our parameter name -> HF's in-memory name in the family's class."""
    if family == "janus":  # its in-memory names are its checkpoint keys
        from omni_models.families.janus import JANUS

        return JANUS.checkpoint_key(ours)
    for prefix, theirs in (
        ("foundation.model.", "model.language_model."),
        ("foundation.lm_head.", "lm_head."),
        ("encoders.vision.tower.", "model.visual."),
        ("encoders.audio.tower.", "model.audio_tower."),
    ):
        if ours.startswith(prefix):
            return theirs + ours[len(prefix) :]
    raise AssertionError(f"no {family} counterpart for {ours}")


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
        **(text_dims or {}),
    }
    vision = vision or VISION[thinker]
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
    parts = {
        "image_processor": transformers.Qwen2VLImageProcessor(**geometry),
        "video_processor": transformers.Qwen2VLVideoProcessor(**geometry),
    }
    if thinker == "qwen2_5_omni_thinker":
        parts["feature_extractor"] = transformers.WhisperFeatureExtractor(feature_size=AUDIO["num_mel_bins"])
    _save_processor(path, family, tok, **parts)
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


def build(spec: OmniModelConfig, mesh: ParallelMesh | None = None) -> tuple[OmniModel, set[str]]:
    """The model of `spec` (parallelized on `mesh` when given), pretrained parts loaded; returns it and
    the names loaded."""
    with torch.device("meta"):
        model = build_omni_model(spec)
    if mesh is not None:
        parallelize_omni(model, mesh, spec)
    materialize_(model, "cpu")
    loaded = load_part_weights_(model, spec)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    init_omni_weights_(model, 0, names=names - loaded)
    return model, loaded


def processed(proc, docs: list[tuple[dict, dict]]) -> list[ProcessedSample]:
    out = []
    for doc, files in docs:
        s = parse_sample(doc, key=doc["id"], source="t", media_bytes=files.get, read_path=None)
        out.append(proc.process(proc.measure(s)))
    return out


def vl_sample(i: int, media: tuple[str, ...], size: tuple[int, int] = (16, 8)) -> tuple[dict, dict]:
    """A user turn with `media` (image: `size` px; video: 2 s, sampled as 2 temporal patches; audio:
    0.1-0.5 s) and text, and an answer."""
    rng = random.Random(i)
    content, files = [{"type": "text", "text": f"look {i} "}], {}
    for k, m in enumerate(media):
        seed = i * 10 + k
        if m == "image":
            name, files[f"{k}.png"] = f"{k}.png", png(*size, seed=seed)
        elif m == "video":
            name, files[f"{k}.mp4"] = f"{k}.mp4", mp4(8, seed=seed, w=16, h=16)
        else:
            name, files[f"{k}.wav"] = f"{k}.wav", wav(0.1 + 0.1 * (seed % 5), seed)
        content += [{"type": m, "media": name}, {"type": "text", "text": " and"}]
    answer = " ".join(rng.choice(WORDS) for _ in range(5))
    return {
        "id": f"s{i}",
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
    }, files


def draw_sample(i: int) -> tuple[dict, dict]:
    """'draw i' answered with an image the model generates (a VQ decoder's target)."""
    image = {"type": "image", "media": "g.png", "generate": True}
    doc = {
        "id": f"d{i}",
        "messages": [{"role": "user", "content": f"draw {i}"}, {"role": "assistant", "content": [image]}],
    }
    return doc, {"g.png": png(12, 12, seed=1000 + i)}


def hf_inputs(sample: ProcessedSample, family: str = "qwen2_vl") -> dict[str, torch.Tensor]:
    """HF's keyword arguments for one sample of `family`: ids, media tensors, unshifted labels (and
    what the family's own position code reads)."""
    ids = sample.input_ids
    out: dict[str, torch.Tensor] = {"input_ids": ids[None], "labels": sample.labels[None]}
    by_kind: dict[str, list] = {"image": [], "video": [], "audio": []}
    for m in sample.media:
        if not m.generate:  # generation targets: see janus_reference_loss
            by_kind[m.modality].append(m)
    for kind, (px, grid) in {
        "image": ("pixel_values", "image_grid_thw"),
        "video": ("pixel_values_videos", "video_grid_thw"),
    }.items():
        if by_kind[kind]:
            out[px] = torch.cat([m.tensors["pixel_values"] for m in by_kind[kind]])
            if family != "janus":
                out[grid] = torch.cat([m.tensors["grid_thw"] for m in by_kind[kind]])
    if family == "janus":
        return out
    seconds = [m.tensors["second_per_grid_ts"] for m in by_kind["video"]]
    if family.startswith("qwen2_5_omni"):
        out["attention_mask"] = torch.ones_like(ids)[None]
        if seconds:
            out["video_second_per_grid"] = torch.cat(seconds)
        if by_kind["audio"]:  # HF's batch layout: (items, mel, longest), with a mask of the real frames
            feats = [m.tensors["input_features"].T for m in by_kind["audio"]]
            longest = max(f.shape[1] for f in feats)
            out["input_features"] = torch.stack(
                [torch.nn.functional.pad(f, (0, longest - f.shape[1])) for f in feats]
            )
            out["feature_attention_mask"] = torch.stack(
                [(torch.arange(longest) < f.shape[1]).long() for f in feats]
            )
        return out
    types = torch.zeros_like(ids, dtype=torch.int32)
    for m in by_kind["image"] + by_kind["video"]:
        types[m.start : m.start + m.llm_tokens] = TOKEN_TYPES[m.modality]
    if family == "qwen2_5_vl" and seconds:
        out["second_per_grid_ts"] = torch.cat(seconds)
    out["mm_token_type_ids"] = types[None]
    return out


def janus_reference_loss(hf, sample: ProcessedSample, n: int) -> torch.Tensor:
    """HF Janus has no loss for generated images: this is the training loss built from HF's own modules,
    as Janus trains it: the image's VQ codes embedded by `prepare_embeddings_for_image_generation` at its
    placeholders, the language model, text cross entropy from `lm_head` and image-token cross entropy
    from `generation_head` (each code predicted from the hidden state before it), summed over `n`."""
    import torch.nn.functional as F

    ids = sample.input_ids
    embeds = hf.get_input_embeddings()(ids[None])
    inputs = [m for m in sample.media if not m.generate]
    if inputs:
        feats = hf.model.get_image_features(
            torch.cat([m.tensors["pixel_values"] for m in inputs])
        ).pooler_output
        mask = (ids == hf.config.image_token_id)[None, :, None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.reshape(-1, embeds.shape[-1]))
    targets = []
    for m in sample.media:
        if m.generate:
            with torch.no_grad():
                codes = hf.model.vqmodel.encode(m.tensors["pixel_values"]).image_tokens.flatten()
            at = torch.arange(m.start, m.start + m.llm_tokens)
            embeds = embeds.index_put(
                (torch.zeros_like(at), at), hf.prepare_embeddings_for_image_generation(codes)
            )
            targets.append((at, codes))
    hidden = hf.model.language_model(inputs_embeds=embeds).last_hidden_state[0]
    text = F.cross_entropy(hf.lm_head(hidden[:-1]), sample.labels[1:], ignore_index=-100, reduction="sum")
    image = sum(
        F.cross_entropy(hf.model.generation_head(hidden[at - 1]), c, reduction="sum") for at, c in targets
    )
    return (text + image) / n


def hf_positions(hf, sample_inputs: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    """HF's own (3, 1, L) positions of one sample (its get_rope_index, as its forward calls it)."""
    x = sample_inputs
    if family.startswith("qwen2_5_omni"):
        lens = x["feature_attention_mask"].sum(-1) if "feature_attention_mask" in x else None
        args = (x.get("image_grid_thw"), x.get("video_grid_thw"), x["attention_mask"], False, lens)
        return hf.model.get_rope_index(x["input_ids"], *args, x.get("video_second_per_grid"))[0]
    seconds = {"second_per_grid_ts": x["second_per_grid_ts"]} if "second_per_grid_ts" in x else {}
    grids = (x.get("image_grid_thw"), x.get("video_grid_thw"))
    return hf.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], *grids, **seconds)[0]


def assert_grads_equal(family: str, model: OmniModel, hf, rtol: float) -> int:
    """Every parameter of ours has HF's weight and gradient (rel `rtol` of its norm); frozen and unused
    ones have none on both sides. Returns the number of gradients compared."""
    params, theirs = dict(model.named_parameters()), dict(hf.named_parameters())
    assert {hf_name(family, k) for k in params} == set(theirs)  # one to one, tied weights counted once
    # A key bias's exact gradient is zero (softmax ignores a shift shared by all keys): what both sides
    # hold is rounding noise, so each tensor's error is measured against at least 1e-3 of the largest norm.
    floor = 1e-3 * max(h.grad.norm() for h in theirs.values() if h.grad is not None)
    checked = 0
    for name, p in params.items():
        h = theirs[hf_name(family, name)]
        assert p.requires_grad == h.requires_grad, name
        torch.testing.assert_close(p.detach(), h.detach(), rtol=0, atol=0)  # loaded, not re-initialised
        if h.grad is None:  # frozen, or unused by HF's forward (Omni's audio_bos_eos_token)
            assert p.grad is None or not p.grad.any(), name
            continue
        err = (p.grad - h.grad).norm() / torch.maximum(h.grad.norm(), floor)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"
        checked += 1
    return checked


def pack(samples: list[ProcessedSample], pad_to: int = 1) -> PackedBatch:
    return collate(samples, pad_to_multiple=pad_to)
