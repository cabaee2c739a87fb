"""The omni model under FSDP2 (2 ranks), dp_shard=2 x sp=2 and sp=4 (4 ranks) trains as one process does;
the ranks compute their text and image-code losses in chunks of 2 positions (recomputed in backward),
the one process all logits at once. Under SP the ranks share the encoders' work (encoder_balance sp:
each encodes some items, the features travel to the slices holding their placeholders) or each encodes
all items (none); both train the same model. So does the model whose foundation modules are swapped for
kernel modules (torch formulas in the kernels' place) with a fused LM-head loss.

Ranks see different modality mixes (some micro-batches lack video, audio or a generation target
entirely), so the dummy encoder and decoder passes are exercised under real FSDP collectives; the loss
includes the VQ image decoder's image-token loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.attention import SequenceParallel
from omni_dist.grad_norm import clip_grad_norm_
from omni_dist.loss import global_token_count
from omni_dist.parallelize import ParallelizeConfig
from omni_dist.weights import materialize_
from omni_models.config import OmniModelConfig, build_omni_model
from omni_models.omni_weights import init_omni_weights_
from omni_models.parallel import parallelize_omni, run_settings
from omni_train.trainer import local_label_tokens
from tests.harness import run_ranks
from tests.omni_dist.tiny import RTOL
from tests.omni_models.hf_dirs import TEXT, VISION
from tests.omni_models.kernel_refs import TORCH_FORMULAS
from tests.omni_models.omni_fixtures import (
    VISION_OPTIONS,
    chat_processor,
    draw_sample,
    foundation_config,
    micro_batch,
    omni_config,
    omni_spec,
    sample,
)

TEXT_3, VISION_3 = TEXT["qwen3_vl"], VISION["qwen3_vl"]

STEPS = 3
# Per data-parallel stream, its micro-batches (each a list of sample modality mixes).
STREAMS = [
    [[("image", "audio"), ("video",)], [(), "draw"]],
    [[("image",), ()], [("image", "video")]],  # no generation target on this rank: the decoder runs a dummy
    # video-heavy and uneven: 6 videos of 2-5 frames and 2 images for 4 SP ranks, one micro-batch
    # without any (every rank encodes the dummy), one with a single image (3 ranks encode nothing)
    [
        [("video",), ("video", "image"), ("video",), ("video", "video"), ("video", "image")],
        [()],
        [("image",)],
    ],
    # for encoder_balance world: a media-heavy rank and a text-only one beside streams 0 and 1
    [[("video",), ("video", "image"), ("image", "audio")], [("image", "image"), "draw"]],
    [[(), ()], [()]],
]


def _deepstack_spec() -> dict:
    """The tiny omni model with Qwen3-VL's text model and vision tower (DeepStack: its two blocks' features
    added to the first two layers' hidden states at the image and video positions)."""
    vision = {**VISION_3, "out_hidden_size": foundation_config()["hidden_size"]}
    return {
        "foundation": {"name": "qwen3_vl_text", "config": foundation_config(**TEXT_3)},
        "encoders": {
            "vision": {
                "name": "qwen3_vl_vision",
                "modalities": ["image", "video"],
                "config": vision,
                "options": VISION_OPTIONS,
                "projector": "identity",
                "freeze": False,
            },
            "audio": omni_spec()["encoders"]["audio"],
        },
        "decoders": omni_spec(decoder=True)["decoders"],
    }


def _model(settings=None, deepstack: bool = False):
    cfg = OmniModelConfig.from_dict(_deepstack_spec()) if deepstack else omni_config(decoder=True)
    with torch.device("meta"):
        model = build_omni_model(cfg, settings)
    return model, cfg


def _batches(model, stream: int, pad_to: int):
    proc = chat_processor(model)
    out, i = [], 100 * stream
    for mixes in STREAMS[stream]:
        samples = []
        for mix in mixes:
            samples.append(draw_sample(i) if mix == "draw" else sample(i, mix))
            i += 1
        out.append(micro_batch(proc, samples, pad_to))
    return out


def _train(model, batches, params, sp=None, loss_group=None) -> dict:
    opt = torch.optim.AdamW(params, lr=3e-3, foreach=False)
    tokens = local_label_tokens(batches, sp)  # this rank's share: text labels and image tokens
    total_tokens = global_token_count(tokens, loss_group).float() if loss_group is not None else tokens
    losses, norms = [], []
    for _ in range(STEPS):
        loss = torch.zeros(())
        for b in batches:
            part = model(b, sequence_parallel=sp).loss_sum / total_tokens
            part.backward()
            loss += part.detach()
        if loss_group is not None:
            dist.all_reduce(loss, group=loss_group.get_group())
        norms.append(clip_grad_norm_(params, 1.0).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"loss": losses, "grad_norm": norms}


def _single(pad_to: int, streams=(0, 1), deepstack: bool = False) -> dict:
    model, _ = _model(deepstack=deepstack)
    materialize_(model, "cpu")
    init_omni_weights_(model, 7)
    batches = [b for s in streams for b in _batches(model, s, pad_to)]
    fed = None
    if deepstack:  # the deepstack mergers' features reach the loss: their gradients are not zero
        model(batches[0]).loss_sum.backward()
        fed = all(
            bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters() if "deepstack_merger" in n
        )
        model.zero_grad()
    return {
        **_train(model, batches, [p for p in model.parameters() if p.requires_grad]),
        "deepstack_fed": fed,
    }


def _parallel_rank(dims: dict, balances=("sp",), streams=(0, 1)) -> dict:
    """Per encoder_balance mode, the run of a fresh model on this rank's stream. "kernels": sp, with the
    foundation's norms, MLPs and attention swapped for kernel modules and the LM head's loss fused (torch
    formulas in the kernels' place); "deepstack:<balance>": the model with Qwen3-VL's DeepStack."""
    torch.set_num_threads(1)
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), **dims), device_type="cpu")
    out = {}
    for balance in balances:
        kernels = TORCH_FORMULAS if balance == "kernels" else None
        deepstack = balance.startswith("deepstack:")  # "deepstack:<encoder_balance>"
        config = ParallelizeConfig(encoder_balance="sp" if kernels else balance.removeprefix("deepstack:"))
        # the chunked loss heads (2 rows a chunk), against all logits at once in one process
        model, cfg = _model(run_settings(mesh, config, kernels, loss_chunk=2), deepstack)
        report = parallelize_omni(model, mesh, cfg, config, kernels)
        materialize_(model, "cpu")
        init_omni_weights_(model, 7)
        sp = SequenceParallel.from_mesh(mesh["sp"]) if mesh.dims.sp > 1 else None
        batches = _batches(model, streams[mesh.dp_rank], mesh.dims.sp)
        params = [p for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[balance] = _train(model, batches, params, sp, mesh["loss"])
        out[balance]["units"] = len(report.fsdp_units)
        out[balance]["kernels"] = sorted(set(report.kernels.values()))
        out[balance]["warnings"] = [
            str(w.message)[:120] for w in caught if issubclass(w.category, UserWarning)
        ]
    return out


def _close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b, strict=True))


def test_fsdp_two_ranks_match_one_process():
    ref = _single(pad_to=1)
    results = run_ranks(_parallel_rank, 2, {"dp_shard": 2}, ("sp", "kernels"))
    assert ref["loss"][-1] < ref["loss"][0]
    assert [r["kernels"]["kernels"] for r in results] == [["rms_norm", "rope", "swiglu"]] * 2
    assert [r["sp"]["kernels"] for r in results] == [[], []]  # auto on CPU: no kernels
    for r in (r[mode] for r in results for mode in ("sp", "kernels")):
        assert r["units"] > 8
        # no FSDP unit returns a view (an in-place op on one would skip FSDP's pre-backward hook)
        assert not [w for w in r["warnings"] if "view tensor" in w], r["warnings"]
        assert _close(r["loss"], ref["loss"]), (r["loss"], ref["loss"])
        assert _close(r["grad_norm"], ref["grad_norm"]), (r["grad_norm"], ref["grad_norm"])


def test_fsdp_and_ulysses_four_ranks_match_one_process():
    """With and without DeepStack (each rank adds the deepstack rows of the media positions in its slice,
    whichever rank encoded them)."""
    refs = {False: _single(pad_to=2), True: _single(pad_to=2, deepstack=True)}
    modes = ("sp", "none", "world", "deepstack:sp")
    results = run_ranks(_parallel_rank, 4, {"dp_shard": 2, "sp": 2}, modes)
    assert refs[True]["deepstack_fed"]
    for mode in modes:
        ref = refs[mode.startswith("deepstack")]
        for r in (r[mode] for r in results):
            assert _close(r["loss"], ref["loss"]), (mode, r["loss"], ref["loss"])
            assert _close(r["grad_norm"], ref["grad_norm"]), (mode, r["grad_norm"], ref["grad_norm"])


def test_four_ranks_balancing_encoder_work_across_data_parallel_ranks_match_one_process():
    """encoder_balance world on dp_shard=4: a media-heavy rank hands items to a text-only one (with the
    deepstack rows travelling beside the features)."""
    streams = (3, 4, 0, 1)
    refs = {"world": _single(1, streams), "deepstack:world": _single(1, streams, deepstack=True)}
    results = run_ranks(_parallel_rank, 4, {"dp_shard": 4}, tuple(refs), streams)
    for mode, ref in refs.items():
        for r in (r[mode] for r in results):
            assert _close(r["loss"], ref["loss"]), (mode, r["loss"], ref["loss"])
            assert _close(r["grad_norm"], ref["grad_norm"]), (mode, r["grad_norm"], ref["grad_norm"])


def test_four_sp_ranks_sharing_the_encoders_of_a_video_heavy_batch_match_one_process():
    """Also with DeepStack: the videos' deepstack positions split across the 4 slices."""
    refs = {
        "sp": _single(pad_to=4, streams=(2,)),
        "deepstack:sp": _single(pad_to=4, streams=(2,), deepstack=True),
    }
    results = run_ranks(_parallel_rank, 4, {"dp_shard": 1, "sp": 4}, tuple(refs), (2,))
    assert refs["deepstack:sp"]["deepstack_fed"]
    for mode, ref in refs.items():
        assert ref["loss"][-1] < ref["loss"][0]
        for r in (r[mode] for r in results):
            assert _close(r["loss"], ref["loss"]), (mode, r["loss"], ref["loss"])
            assert _close(r["grad_norm"], ref["grad_norm"]), (mode, r["grad_norm"], ref["grad_norm"])
