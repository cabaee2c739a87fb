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
from tests.omni_data.fixtures import CHAT_TEMPLATE, WORDS
from tests.omni_models.omni_fixtures import mp4, png

QWEN2_VL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=30)) for _ in range(300)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=specials[0],
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=specials[1:],
    )


# The tiny vision towers of each family (Qwen2.5-VL: windows of 2x2 merged tokens, full attention in block 1)
VISION = {
    "qwen2_vl": {"depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4,
                 "spatial_merge_size": 2, "temporal_patch_size": 2},
    "qwen2_5_vl": {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                   "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16,
                   "fullatt_block_indexes": [1], "tokens_per_second": 2},
}  # fmt: skip
FAMILIES = tuple(VISION)


def hf_class(family: str) -> type:
    """HF's own class of the family: the referee."""
    import transformers

    name = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[family]
    return getattr(transformers, f"{name}ForConditionalGeneration")


def qwen_vl_dir(
    root: Path, family: str = "qwen2_vl", tie: bool = False, seed: int = 0, init: float = 0.5
) -> Path:
    """A random tiny Qwen2-VL / Qwen2.5-VL written by HF's save_pretrained (weights, tokenizer, image
    processor). `init`: the text model's initializer range; large, so logits are far from uniform and
    positions and media features show in the loss."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(QWEN2_VL_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIALS}
    config_class = getattr(
        transformers, {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig"}[family]
    )
    cfg = config_class(
        text_config={
            "vocab_size": 448,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "initializer_range": init,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=VISION[family],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    path = root / f"{family}{'_tied' if tie else ''}_{init}"
    hf_class(family)(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=64, max_pixels=32 * 32, patch_size=4, merge_size=2).save_pretrained(
        path
    )
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
    """A user turn with `media` (image: `size` px; video: 2 s, sampled as 2 temporal patches) and text,
    and an answer."""
    rng = random.Random(i)
    content, files = [{"type": "text", "text": f"look {i} "}], {}
    for k, m in enumerate(media):
        name = f"{k}.{'png' if m == 'image' else 'mp4'}"
        files[name] = png(*size, seed=i * 10 + k) if m == "image" else mp4(8, seed=i * 10 + k, w=16, h=16)
        content += [{"type": m, "media": name}, {"type": "text", "text": " and"}]
    answer = " ".join(rng.choice(WORDS) for _ in range(5))
    return {
        "id": f"s{i}",
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
    }, files


def hf_inputs(sample: ProcessedSample, family: str = "qwen2_vl") -> dict[str, torch.Tensor]:
    """HF's keyword arguments for one sample: ids, media tensors, mm_token_type_ids, unshifted labels."""
    ids = sample.input_ids
    types = torch.zeros_like(ids, dtype=torch.int32)
    out: dict[str, torch.Tensor] = {"input_ids": ids[None], "labels": sample.labels[None]}
    by_kind: dict[str, list] = {"image": [], "video": []}
    for m in sample.media:
        types[m.start : m.start + m.llm_tokens] = TOKEN_TYPES[m.modality]
        by_kind[m.modality].append(m)
    for kind, (px, grid) in {
        "image": ("pixel_values", "image_grid_thw"),
        "video": ("pixel_values_videos", "video_grid_thw"),
    }.items():
        if by_kind[kind]:
            out[px] = torch.cat([m.tensors["pixel_values"] for m in by_kind[kind]])
            out[grid] = torch.cat([m.tensors["grid_thw"] for m in by_kind[kind]])
    if family == "qwen2_5_vl" and by_kind["video"]:
        out["second_per_grid_ts"] = torch.cat([m.tensors["second_per_grid_ts"] for m in by_kind["video"]])
    out["mm_token_type_ids"] = types[None]
    return out


def pack(samples: list[ProcessedSample], pad_to: int = 1) -> PackedBatch:
    return collate(samples, pad_to_multiple=pad_to)
