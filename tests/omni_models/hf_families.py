"""Helpers to run HF's own class on our samples (the referee of tests/omni_models/test_pretrained_*.py):
the model built from a pretrained directory, samples, HF's inputs, positions and gradients to compare."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from omni_data.collate import collate
from omni_data.processor import ProcessedSample
from omni_data.schema import parse_sample
from omni_dist import ParallelMesh
from omni_dist.packed import PackedBatch
from omni_dist.parallelize import ParallelizeConfig
from omni_dist.weights import materialize_
from omni_models.config import OmniModelConfig, build_omni_model
from omni_models.families.mrope import TOKEN_TYPES
from omni_models.omni import OmniModel
from omni_models.omni_weights import init_omni_weights_, load_part_weights_
from omni_models.parallel import parallelize_omni, run_settings
from tests.omni_data.fixtures import WORDS
from tests.omni_models.hf_dirs import hf_class
from tests.omni_models.omni_fixtures import mp4, png, wav


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


def build(spec: OmniModelConfig, mesh: ParallelMesh | None = None) -> tuple[OmniModel, set[str]]:
    """The model of `spec` (parallelized on `mesh` when given), pretrained parts loaded; returns it and
    the names loaded."""
    settings = None if mesh is None else run_settings(mesh, ParallelizeConfig(), None, loss_chunk=0)
    with torch.device("meta"):
        model = build_omni_model(spec, settings)
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
    """A user turn with `media` (image: `size` px; video: 2 s, sampled as 2 temporal patches; av: a 3 s
    video with an audio track, 3 temporal patches; audio: 0.1-0.5 s) and text, and an answer."""
    rng = random.Random(i)
    content, files = [{"type": "text", "text": f"look {i} "}], {}
    for k, m in enumerate(media):
        seed = i * 10 + k
        if m == "image":
            name, files[f"{k}.png"] = f"{k}.png", png(*size, seed=seed)
        elif m == "video":
            name, files[f"{k}.mp4"] = f"{k}.mp4", mp4(8, seed=seed, w=16, h=16)
        elif m == "av":
            name, files[f"{k}.mp4"] = f"{k}.mp4", mp4(12, seed=seed, w=16, h=16, audio_rate=16000)
            m = "video"
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


def hf_inputs(sample: ProcessedSample, family: str = "qwen2_vl", audio_in_video: bool = False) -> dict:
    """HF's keyword arguments for one sample of `family`: ids, media tensors, unshifted labels (and
    what the family's own position code reads); `audio_in_video`: Qwen2.5-Omni's flag, set for every
    sample as a user of HF sets it for a batch."""
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
    seconds = [m.tensors["second_per_grid_ts"] for m in by_kind["video"] if "second_per_grid_ts" in m.tensors]
    if family.startswith("qwen2_5_omni"):
        out["attention_mask"] = torch.ones_like(ids)[None]
        out["use_audio_in_video"] = audio_in_video
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
    for m in by_kind["image"] + by_kind["video"]:  # a Qwen3-VL video's frames lie between timestamps
        types[m.positions] = TOKEN_TYPES[m.modality]
    if family == "qwen2_5_vl" and seconds:
        out["second_per_grid_ts"] = torch.cat(seconds)
    out["mm_token_type_ids"] = types[None]
    return out


def hf_loss(hf, family: str, samples: list[ProcessedSample], n: int, audio_in_video: bool = False):
    """(HF's loss of the samples as ours sums it, HF's load-balancing loss or None). Each sample's token
    loss over `n`; a MoE family's load-balancing loss is the packed micro-batch's, as one sequence (the
    trainer's), i.e. HF's `load_balancing_loss_func` over every sample's router logits at once (attention
    stays within a sample, so each token's router logits are its sample's); the loss adds it times the
    coefficient, as HF's forward does for its sequence."""
    text = hf.config.get_text_config()
    inputs = [hf_inputs(s, family, audio_in_video) for s in samples]
    if not getattr(text, "num_experts", 0):
        return sum(hf(**x, num_items_in_batch=n).loss for x in inputs), None
    import sys

    coef = text.router_aux_loss_coef
    outs = [hf(**x, num_items_in_batch=n, output_router_logits=True) for x in inputs]
    token_loss = sum(o.loss - coef * o.aux_loss for o in outs)  # HF's forward added each sample's own
    layers = tuple(torch.cat(per_layer) for per_layer in zip(*(o.router_logits for o in outs), strict=True))
    balance = sys.modules[type(hf).__module__].load_balancing_loss_func  # the family's own
    aux = balance(layers, text.num_experts, text.num_experts_per_tok)
    return token_loss + coef * aux, aux


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
        args = (
            x.get("image_grid_thw"),
            x.get("video_grid_thw"),
            x["attention_mask"],
            x["use_audio_in_video"],
            lens,
        )
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
