"""A pretrained model of every family (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni thinker, Qwen3-VL and its MoE,
Janus) trains the same under FSDP2 (dp_shard=4) and FSDP2 x Ulysses (dp_shard=2 x sp=2) as in one
process: loss and grad norm over 3 AdamW steps on one global batch, with an image whose placeholders
straddle the SP cut (so its positions, features and DeepStack rows are split between ranks); the MoE also
with its experts split over the SP pair (ep=2); Janus also generates images on some ranks; Qwen2.5-Omni
also with a video whose audio track is interleaved with its frames. Every case runs in one 4-rank spawn
(fixture `four_ranks`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.attention import SequenceParallel
from omni_models.config import OmniModelConfig
from omni_train.assembly import chat_processor
from tests.harness import run_checks
from tests.omni_models.hf_dirs import FAMILIES, qwen_vl_dir, released_expert_layout
from tests.omni_models.hf_families import build, draw_sample, pack, processed, vl_sample
from tests.omni_models.test_omni_parity import _close, _train

# Four micro-batches of the global batch, by (sample index, media, image size).
MICRO_BATCHES = [
    [(0, ("image",), (32, 32))],  # 16 image tokens around the middle of the sequence
    [(2, ("video",), (16, 16)), (3, ("image",), (8, 8))],
    [(4, ("image", "video"), (16, 24)), (1, ())],
    [(5, ()), (6, ("image",), (32, 16))],
]
LAYOUTS = [{"dp_shard": 4}, {"dp_shard": 2, "sp": 2}]
MOE_LAYOUTS = [*LAYOUTS, {"dp_shard": 2, "sp": 2, "ep": 2}]


def _layouts(family: str) -> list[dict]:
    return MOE_LAYOUTS if family == "qwen3_vl_moe" else LAYOUTS


# Janus: fixed-size images in, generated images ("draw") on two of the four streams.
JANUS_MICRO_BATCHES = [
    [(0, ("image",), (32, 32))],
    ["draw", (3, ())],
    [(4, ("image",), (16, 8)), "draw"],
    [(5, ()), (6, ("image", "image"), (8, 8))],
]


def _micro_batches(model, av: bool) -> list[list]:
    """The family's micro-batches: with audio in two of them for a family that hears (the last rank
    gets none); `av`: the videos are one with its audio track interleaved (every video must have one)."""
    if model.modality_decoder:
        return JANUS_MICRO_BATCHES
    if "audio" not in model.modality_encoder:
        return MICRO_BATCHES
    if av:
        return [
            MICRO_BATCHES[0],
            [(3, ("image",), (8, 8)), (7, ("audio",))],
            [(8, ("image", "av", "audio"))],
            MICRO_BATCHES[3],
        ]
    return [
        MICRO_BATCHES[0],
        [*MICRO_BATCHES[1], (7, ("audio",))],
        [(8, ("image", "audio"))],
        MICRO_BATCHES[3],
    ]


def _spec(path: str, av: bool) -> OmniModelConfig:
    return OmniModelConfig.from_dict({"pretrained": path, **({"use_audio_in_video": True} if av else {})})


def _batches(path, model, spec, indices: list[int]):
    proc = chat_processor(model, spec, AutoTokenizer.from_pretrained(path))
    micro_batches = _micro_batches(model, spec.encoders["vision"].options.get("use_audio_in_video", False))
    out = []
    for k in indices:
        docs = [draw_sample(k) if x == "draw" else vl_sample(*x) for x in micro_batches[k]]
        out.append(pack(processed(proc, docs), pad_to=2))
    return out


def _straddles(batch) -> bool:
    """An image whose placeholder span crosses the middle of the sequence (the sp=2 cut)."""
    mid = batch.length // 2
    pos = batch.media["image"].positions if "image" in batch.media else torch.zeros(0)
    return bool(((pos < mid).any() & (pos >= mid).any()).item())


def _single(path: str, av: bool) -> dict:
    spec = _spec(path, av)
    model, _ = build(spec)
    batches = _batches(path, model, spec, list(range(4)))
    out = _train(model, batches, [p for p in model.parameters() if p.requires_grad])
    out["straddles"] = [_straddles(b) for b in batches]
    return out


def _rank(path: str, av: bool, layouts: list[dict]) -> list[dict]:
    torch.set_num_threads(1)
    results = []
    spec = _spec(path, av)
    for layout in layouts:
        mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), **layout), device_type="cpu")
        model, _ = build(spec, mesh)
        if mesh.dims.ep > 1:  # every experts module runs split over ep
            experts = [m for n, m in model.named_modules() if n.endswith(".mlp.experts")]
            assert experts and all(getattr(m, "_omni_expert_parallel", False) for m in experts)
        sp = SequenceParallel.from_mesh(mesh["sp"]) if mesh.dims.sp > 1 else None
        per_rank = len(MICRO_BATCHES) // mesh.dims.dp
        mine = list(range(mesh.dp_rank * per_rank, (mesh.dp_rank + 1) * per_rank))
        batches = _batches(path, model, spec, mine)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append(_train(model, batches, params, sp, mesh["loss"]))
    return results


# Qwen2.5-Omni also with use_audio_in_video (av): a video's frames and audio interleaved in one span
CASES = [(f, False) for f in (*FAMILIES, "janus")] + [("qwen2_5_omni_thinker", True)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """family -> a directory of that family with random weights (the MoE's experts stored as its released
    checkpoints store them: the sharded and EP-split experts load through transposed views)."""
    out = {}
    for family in dict.fromkeys(f for f, _ in CASES):
        path = qwen_vl_dir(tmp_path_factory.mktemp(family), family, init=0.1)
        out[family] = str(released_expert_layout(path) if family == "qwen3_vl_moe" else path)
    return out


@pytest.fixture(scope="module")
def four_ranks(paths):
    return run_checks(
        4, {f"{family}/{av}": (_rank, (paths[family], av, _layouts(family))) for family, av in CASES}
    )


@pytest.mark.parametrize("family,av", CASES)
def test_pretrained_parallel_layouts_match_one_process(paths, four_ranks, family, av):
    ref = _single(paths[family], av)
    assert any(ref["straddles"]), "no image straddles the SP cut: change MICRO_BATCHES"
    assert ref["loss"][-1] < ref["loss"][0]
    for rank_results in four_ranks[f"{family}/{av}"]:
        for layout, r in zip(_layouts(family), rank_results, strict=True):
            assert _close(r["loss"], ref["loss"]), (layout, r["loss"], ref["loss"])
            assert _close(r["grad_norm"], ref["grad_norm"]), (layout, r["grad_norm"], ref["grad_norm"])
