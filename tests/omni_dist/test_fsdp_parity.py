"""FSDP2 / HSDP / DDP through plans train the same model as one process (fp32, rel. 1e-5, 5 AdamW steps).

The checks of each world size run in one spawn (fixtures `two_ranks`, `four_ranks`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from omni_dist.parallelize import ParallelizeConfig
from tests.harness import run_checks
from tests.omni_dist.tiny import (
    GLOBAL_BATCH,
    STEPS,
    assert_matches,
    build_parallel,
    global_batch,
    loss_sum,
    make_optimizer,
    optimizer_step,
    plain_model,
    tiny_qwen2_config,
    train_parallel,
    train_single,
)

TWO_RANK_MODES = {
    "fsdp2": {},
    "fsdp2+full_recompute": {"recompute": "full"},
    "fsdp2+selective_recompute": {"recompute": "selective"},
    "fsdp2+activation_offload": {"offload_activations": True},
    "fsdp2+param_optimizer_offload": {"offload_params": True},
    "fsdp2+prefetch+no_reshard": {"forward_prefetch": 2, "reshard_after_forward": False},
}
FOUR_RANK_LAYOUTS = {
    "fsdp2x4": {"dp_shard": 4},
    "hsdp2x2": {"dp_replicate": 2, "dp_shard": 2},
    "ddp4": {"dp_replicate": 4, "dp_shard": 1},
}
ACCUMULATE_LAYOUTS = {
    "fsdp/micro_batch": ({"dp_shard": 2}, "micro_batch"),
    "fsdp/step": ({"dp_shard": 2}, "step"),
    "hsdp/step": ({"dp_replicate": 2, "dp_shard": 1}, "step"),
}


@pytest.fixture(scope="module")
def reference():
    return train_single(tiny_qwen2_config())


@pytest.fixture(scope="module")
def two_ranks():
    return run_checks(
        2,
        {
            "modes": (_train_modes, (TWO_RANK_MODES, {"dp2": {"dp_shard": 2}})),
            "meta_untied": (_full_weights_after_meta_init, ({"dp_shard": 2}, False)),
            "meta_tied": (_full_weights_after_meta_init, ({"dp_shard": 2}, True)),
            "accumulate": (_accumulate, (ACCUMULATE_LAYOUTS,)),
        },
    )


@pytest.fixture(scope="module")
def four_ranks():
    return run_checks(
        4,
        {
            "layouts": (_train_modes, ({"plain": {}}, FOUR_RANK_LAYOUTS)),
            "meta_hsdp": (_full_weights_after_meta_init, ({"dp_replicate": 2, "dp_shard": 2}, False)),
        },
    )


def _train_modes(modes: dict[str, dict], layouts: dict[str, dict]) -> dict:
    config = tiny_qwen2_config()
    out = {}
    for layout_name, dims in layouts.items():
        for mode_name, cfg in modes.items():
            out[f"{layout_name}/{mode_name}"] = train_parallel(config, dims, ParallelizeConfig(**cfg))
    return out


def test_two_rank_modes_match_single_process(reference, two_ranks):
    results = two_ranks["modes"]
    assert results[0].keys() == {f"dp2/{m}" for m in TWO_RANK_MODES}
    for label, got in results[0].items():
        assert_matches(reference, got, label)
        assert results[1][label]["loss"] == got["loss"]  # every rank reports the same global loss
    assert results[0]["dp2/fsdp2+full_recompute"]["recomputed"] == 3
    assert results[0]["dp2/fsdp2+activation_offload"]["offload_saved"] > 0
    assert results[0]["dp2/fsdp2+activation_offload"]["offload_params_kept"] > 0  # weights are not offloaded
    assert results[0]["dp2/fsdp2"]["offload_saved"] == 0
    # the model really trains: five steps lower the loss
    assert reference["loss"][-1] < reference["loss"][0]


def test_four_rank_layouts_match_single_process(reference, four_ranks):
    results = four_ranks["layouts"]
    for label, got in results[0].items():
        assert_matches(reference, got, label)


def _full_weights_after_meta_init(dims: dict, tied: bool) -> dict:
    model, _, _ = build_parallel(tiny_qwen2_config(tie_word_embeddings=tied), dims, ParallelizeConfig())
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    full = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v.clone()) for k, v in model.state_dict().items()
    }
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return {"full": full, "buffers": buffers, "local_numel": local_numel, "rank": dist.get_rank()}


@pytest.mark.parametrize(
    ("ranks", "check", "dims", "tied"),
    [
        ("two_ranks", "meta_untied", {"dp_shard": 2}, False),
        ("two_ranks", "meta_tied", {"dp_shard": 2}, True),
        ("four_ranks", "meta_hsdp", {"dp_replicate": 2, "dp_shard": 2}, False),
    ],
)
def test_meta_init_equals_single_process_init_exactly(request, ranks, check, dims, tied):
    want = plain_model(tiny_qwen2_config(tie_word_embeddings=tied))
    assert (want.lm_head.weight is want.model.embed_tokens.weight) == tied
    want_sd = want.state_dict()
    total = sum(p.numel() for p in want.parameters())
    results = request.getfixturevalue(ranks)[check]
    world = len(results)
    for got in results:
        assert got["full"].keys() == want_sd.keys()
        for k, v in want_sd.items():
            assert torch.equal(got["full"][k], v), k
        for k, v in got["buffers"].items():  # rotary tables are rebuilt, not left as garbage
            assert torch.equal(v, dict(want.named_buffers())[k]), k
        # Each rank holds about 1/(shard degree) of the parameters.
        shard = world // dims.get("dp_replicate", 1)
        assert got["local_numel"] <= total / shard + 64 * 32


def _accumulate(layouts: dict[str, dict]) -> dict:
    """Each rank's rows of the global batch as micro-batches of one sequence: gradients reduced after
    every micro-batch (`micro_batch`) or once per step (`step`); the reduce-scatters of each step counted."""
    from torch.profiler import ProfilerActivity, profile

    from omni_dist.loss import global_token_count
    from omni_dist.parallelize import set_gradient_sync

    config = tiny_qwen2_config()
    ids, labels = global_batch(config.vocab_size)
    out = {}
    for name, (dims, grad_sync) in layouts.items():
        model, mesh, _ = build_parallel(config, dims, ParallelizeConfig(grad_sync=grad_sync))
        opt = make_optimizer(model)
        per = GLOBAL_BATCH // mesh.dims.dp
        rows = range(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
        losses, norms, collectives = [], [], []
        for _ in range(STEPS):
            local = sum(int((labels[r, 1:] != -100).sum()) for r in rows)
            tokens = global_token_count(local, mesh["loss"])
            reported = torch.zeros(())
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i, r in enumerate(rows):
                    if grad_sync == "step":
                        set_gradient_sync(model, i == len(rows) - 1)
                    total, _ = loss_sum(model, ids[r : r + 1], labels[r : r + 1])
                    loss = total / tokens.to(total.dtype)
                    loss.backward()
                    reported += loss.detach()
            collectives.append(sum(e.count for e in prof.key_averages() if "reduce_scatter" in e.key))
            norms.append(optimizer_step(model, opt))
            dist.all_reduce(reported, group=mesh["loss"].get_group())
            losses.append(reported.item())
        out[name] = {"loss": losses, "grad_norm": norms, "reduce_scatters": collectives}
    return out


def test_gradients_reduced_once_per_step_train_the_same_model(reference, two_ranks):
    """4 micro-batches per rank: one reduce-scatter per FSDP unit per step instead of four, same model."""
    got = two_ranks["accumulate"][0]
    for label, result in got.items():
        assert_matches(reference, result, label)
    each, once = got["fsdp/micro_batch"]["reduce_scatters"], got["fsdp/step"]["reduce_scatters"]
    assert once[0] > 0 and each == [4 * once[0]] * STEPS and once == [once[0]] * STEPS, (each, once)
