"""HF safetensors loading into sharded models, mixed precision with fp32 modules, and bad plans/configs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.hf_load import CheckpointMismatchError, load_hf_weights_
from omni_dist.parallelize import ParallelizeConfig, parallelize
from omni_dist.plan import ParallelPlan, PlanError
from omni_dist.weights import init_weights_, materialize_, non_persistent_buffers
from tests.harness import run_checks, run_ranks
from tests.omni_dist.tiny import (
    QWEN2_PLAN,
    build_parallel,
    global_batch,
    loss_sum,
    meta_model,
    plain_model,
    tiny_qwen2_config,
)

VARIANTS = {"untied": {}, "tied": {"tie_word_embeddings": True}}
FP32_NORMS_PLAN = ParallelPlan(
    fsdp_units=("Qwen2DecoderLayer",), recompute=("Qwen2DecoderLayer",), fp32_modules=("Qwen2RMSNorm",)
)


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """save_pretrained directories (several shard files each) and from_pretrained logits for each variant."""
    ids, _ = global_batch()
    out = {}
    for name, overrides in VARIANTS.items():
        path = tmp_path_factory.mktemp(name)
        plain_model(tiny_qwen2_config(**overrides), seed=7).save_pretrained(path, max_shard_size="40KB")
        assert len(list(path.glob("*.safetensors"))) > 1
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            out[name] = (str(path), ref(input_ids=ids, use_cache=False).logits)
    return out


def _load_and_forward(paths: dict[str, str], dims: dict) -> dict[str, torch.Tensor]:
    ids, _ = global_batch()
    out = {}
    for name, path in paths.items():
        config = tiny_qwen2_config(**VARIANTS[name])
        mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), **dims), device_type="cpu")
        model = meta_model(config)
        parallelize(model, mesh, QWEN2_PLAN, ParallelizeConfig())
        materialize_(model, "cpu")
        # strict=False on the tied checkpoint: the returned names must cover both aliases, so the
        # "initialise what was not loaded" step leaves the loaded embedding alone.
        loaded = load_hf_weights_(model, path, strict=name == "untied")
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= loaded
        rest = {n for n, _ in model.named_parameters(remove_duplicate=False)} - loaded
        init_weights_(model, model._init_weights, seed=0, names=non_persistent_buffers(model) | rest)
        with torch.no_grad():
            out[name] = model(input_ids=ids, use_cache=False).logits
    return out


@pytest.fixture(scope="module")
def two_ranks(hf_checkpoints, tmp_path_factory):
    """The 2-rank checks of this file, in one spawn."""
    paths = {name: path for name, (path, _) in hf_checkpoints.items()}
    # A checkpoint of a smaller model: shapes and names do not cover the tiny model.
    small, empty = tmp_path_factory.mktemp("small"), tmp_path_factory.mktemp("empty")
    plain_model(tiny_qwen2_config(num_hidden_layers=1)).save_pretrained(small)
    return run_checks(
        2,
        {
            "load": (_load_and_forward, (paths, {"dp_shard": 2})),
            "recompute": (_bf16_recompute_losses, ()),
            "dtypes": (_mixed_precision_dtypes, ()),
            "bad_inputs": (_bad_inputs, (str(small), str(empty))),
        },
    )


@pytest.mark.parametrize(("world", "dims"), [(2, {"dp_shard": 2}), (4, {"dp_replicate": 2, "dp_shard": 2})])
def test_sharded_load_gives_from_pretrained_logits(hf_checkpoints, two_ranks, world, dims):
    paths = {name: path for name, (path, _) in hf_checkpoints.items()}
    ranks = two_ranks["load"] if world == 2 else run_ranks(_load_and_forward, world, paths, dims)
    for rank_out in ranks:
        for name, (_, want) in hf_checkpoints.items():
            torch.testing.assert_close(rank_out[name], want, rtol=1e-5, atol=1e-6, msg=name)


def _mixed_precision_dtypes() -> dict:
    config = tiny_qwen2_config()
    seen: dict[str, torch.dtype] = {}
    cfg = ParallelizeConfig(param_dtype="bfloat16", reduce_dtype="float32")
    model, _, report = build_parallel(config, {"dp_shard": 2}, cfg, FP32_NORMS_PLAN)
    norm, proj = model.model.layers[0].input_layernorm, model.model.layers[0].self_attn.q_proj

    def record(key):
        def hook(module, args, output) -> None:  # returns None: the output is left alone
            seen.setdefault(key, module.weight.dtype)

        return hook

    norm.register_forward_hook(record("norm_weight"))
    proj.register_forward_hook(record("proj_weight"))
    ids, labels = global_batch()
    total, tokens = loss_sum(model, ids, labels)
    (total / tokens).backward()
    return {
        "seen": seen,
        "loss": (total / tokens).item(),
        "fp32_units": len(report.fp32_units),
        "sharded_dtype": model.model.layers[0].self_attn.q_proj.weight.dtype,
        "grad_dtype": model.model.layers[0].self_attn.q_proj.weight.grad.dtype,
    }


def _bf16_recompute_losses() -> dict[str, list[float]]:
    config = tiny_qwen2_config()
    out = {}
    for mode in ("full", "selective"):
        cfg = ParallelizeConfig(param_dtype="bfloat16", recompute=mode)
        model, _, _ = build_parallel(config, {"dp_shard": 2}, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids, labels = global_batch()
        losses = []
        for _ in range(2):
            total, tokens = loss_sum(model, ids, labels)
            (total / tokens / dist.get_world_size()).backward()
            opt.step()
            opt.zero_grad()
            losses.append((total / tokens).item())
        out[mode] = losses
    return out


def test_bf16_with_full_and_selective_recompute_trains(two_ranks):
    out = two_ranks["recompute"][0]
    fp32_first = (lambda t: (t[0] / t[1]).item())(loss_sum(plain_model(tiny_qwen2_config()), *global_batch()))
    for mode, losses in out.items():
        assert abs(losses[0] - fp32_first) < 2e-2 * fp32_first, (mode, losses)
        assert losses[1] < losses[0], (mode, losses)


def test_bf16_compute_keeps_fp32_modules_and_fp32_master_weights(two_ranks):
    out = two_ranks["dtypes"][0]
    assert out["seen"] == {"norm_weight": torch.float32, "proj_weight": torch.bfloat16}
    assert out["fp32_units"] == 3 * 2 + 1  # two norms per block + the final norm
    assert out["sharded_dtype"] == torch.float32 and out["grad_dtype"] == torch.float32
    model = plain_model(tiny_qwen2_config())
    ids, labels = global_batch()
    total, tokens = loss_sum(model, ids, labels)
    assert abs(out["loss"] - (total / tokens).item()) < 2e-2 * abs(out["loss"])


def _error_text(fn) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _bad_inputs(missing_path: str, empty_path: str) -> dict[str, str]:
    config = tiny_qwen2_config()
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size()), device_type="cpu")

    def apply(plan, cfg=None):
        return lambda: parallelize(meta_model(config), mesh, plan, cfg or ParallelizeConfig())

    out = {
        "typo": _error_text(apply(ParallelPlan(fsdp_units=("Qwen2DecoderLyer",)))),
        "expert_typo": _error_text(apply(ParallelPlan(expert_params={"*.experts.w1": "shard0"}))),
        "both": _error_text(apply(QWEN2_PLAN, ParallelizeConfig(recompute="full", offload_activations=True))),
        "selective_fp32": _error_text(
            apply(FP32_NORMS_PLAN, ParallelizeConfig(param_dtype="bfloat16", recompute="selective"))
        ),
        "unit_and_fp32": _error_text(
            apply(
                ParallelPlan(fsdp_units=("Qwen2DecoderLayer",), fp32_modules=("model.layers.0",)),
                ParallelizeConfig(param_dtype="bfloat16"),
            )
        ),
        "fp32_typo_in_fp32_run": _error_text(
            apply(ParallelPlan(fsdp_units=("Qwen2DecoderLayer",), fp32_modules=("RMSNorm",)))
        ),
        "dtype": _error_text(apply(QWEN2_PLAN, ParallelizeConfig(param_dtype="bf17"))),
    }
    model = meta_model(config)
    parallelize(model, mesh, QWEN2_PLAN)
    out["twice"] = _error_text(lambda: parallelize(model, mesh, QWEN2_PLAN))
    out["meta"] = _error_text(lambda: init_weights_(model, model._init_weights, 0))
    materialize_(model, "cpu")
    out["partial_init"] = _error_text(
        lambda: init_weights_(
            model, lambda m: None if type(m).__name__ == "Qwen2RMSNorm" else model._init_weights(m), 0
        )
    )
    out["unknown_names"] = _error_text(
        lambda: init_weights_(model, model._init_weights, 0, names={"lm_head.bias"})
    )
    out["no_files"] = _error_text(lambda: load_hf_weights_(model, empty_path))
    out["missing"] = _error_text(lambda: load_hf_weights_(model, missing_path))
    dist.barrier()
    return out


def test_bad_plans_and_inputs_fail_with_names(two_ranks):
    out = two_ranks["bad_inputs"][0]
    assert "PlanError: plan.fsdp_units pattern 'Qwen2DecoderLyer' matches no module" in out["typo"]
    assert "Closest: Qwen2DecoderLayer" in out["typo"]
    assert "plan.expert_params pattern '*.experts.w1' matches no parameter" in out["expert_typo"]
    assert "recompute='full' and offload_activations=True both apply to" in out["both"]
    assert "selective recompute of 'model.layers.0' would contain the fp32 FSDP unit" in out["selective_fp32"]
    assert "listed in both plan.fsdp_units and plan.fp32_modules" in out["unit_and_fp32"]
    assert "plan.fp32_modules pattern 'RMSNorm' matches no module" in out["fp32_typo_in_fp32_run"]
    assert "has no tensors named ['lm_head.bias']" in out["unknown_names"]
    assert "param_dtype='bf17' is not a known dtype" in out["dtype"]
    assert "is already parallelized" in out["twice"]
    assert "WeightInitError" in out["meta"] and "materialize_() first" in out["meta"]
    assert "left model.layers.0.input_layernorm.weight (Qwen2RMSNorm) uninitialised" in out["partial_init"]
    assert "FileNotFoundError: no *.safetensors files" in out["no_files"]
    assert CheckpointMismatchError.__name__ in out["missing"] and "model.layers.1." in out["missing"]


def test_plan_from_dict_rejects_unknown_keys_and_duplicate_matches():
    plan = ParallelPlan.from_dict({"fsdp_units": ["Qwen2DecoderLayer"], "recompute": ["model.layers.*"]})
    assert plan.fsdp_units == ("Qwen2DecoderLayer",)
    with pytest.raises(PlanError, match=r"unknown ParallelPlan key 'fsdp_unit'\. Did you mean 'fsdp_units'"):
        ParallelPlan.from_dict({"fsdp_unit": ["x"]})
    with pytest.raises(PlanError, match="must be a list of patterns"):
        ParallelPlan(fsdp_units="Qwen2DecoderLayer")
    twice = ParallelPlan(fsdp_units=("Qwen2DecoderLayer", "model.layers.*"))
    with pytest.raises(
        PlanError, match=r"'model.layers.0' is matched by both 'Qwen2DecoderLayer' and 'model.layers.\*'"
    ):
        twice.match_modules(meta_model(tiny_qwen2_config()), "fsdp_units")
    with pytest.raises(ValueError, match="recompute='some'"):
        ParallelizeConfig(recompute="some")
