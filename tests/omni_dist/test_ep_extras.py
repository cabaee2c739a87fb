"""Expert parallelism: HF per-expert checkpoints land in the right EP shards, checkpoints do not depend
on the EP size, and bad EP configurations fail before training.

Three spawns hold every check (fixture `ranks`): what writes (2 ranks), then what reads it (2 and 4 ranks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from omni_dist import ParallelConfigError, ParallelDims, ParallelMesh
from omni_dist.checkpoint import CheckpointManager, ModelPart
from omni_dist.hf_export import export_hf_safetensors
from omni_dist.hf_load import load_hf_weights_
from omni_dist.parallelize import ParallelizeConfig, parallelize
from omni_dist.plan import PlanError
from omni_dist.weights import init_weights_, materialize_, non_persistent_buffers
from omni_models.hf_keys import per_expert_keys, per_expert_tensors
from omni_models.hf_plans import plan_for
from tests.harness import run_checks
from tests.omni_dist.test_ep_parity import moe_config
from tests.omni_dist.tiny import SEED, meta_model, plain_model

IDS = torch.arange(40).remainder(128).view(1, 40)
EP2 = {"dp_shard": 2, "ep": 2}
EP4 = {"dp_shard": 4, "ep": 4}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """An HF directory of the plain MoE model (per-expert tensors), and where the spawns write."""
    base = tmp_path_factory.mktemp("ep")
    plain_model(moe_config()).save_pretrained(base / "hf")
    return {name: str(base / name) for name in ("hf", "ckpt", "export")}


@pytest.fixture(scope="module")
def ranks(dirs) -> dict:
    written = run_checks(
        2,
        {
            "load_hf": (_load_hf, (dirs["hf"], EP2)),
            "save": (_save_or_load, (dirs["ckpt"], EP2, "save")),
            "export": (_export_ep, (dirs["export"],)),
        },
    )
    four = run_checks(
        4,
        {
            "load_hf": (_load_hf, (dirs["hf"], EP4)),
            "load": (_save_or_load, (dirs["ckpt"], {"dp_shard": 2, "sp": 2, "ep": 4}, "load")),
            "bad_ep": (_bad_ep, ()),
        },
    )
    two = run_checks(
        2,
        {
            "load": (_save_or_load, (dirs["ckpt"], {"dp_shard": 2}, "load")),
            "reload_export": (_reload_export, (dirs["export"],)),
        },
    )
    return {"written": written, 2: two, 4: four}


def _ep_model(dims: dict, config=None):
    config = config or moe_config()
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), **dims), device_type="cpu")
    model = meta_model(config)
    parallelize(model, mesh, plan_for(model), ParallelizeConfig())
    materialize_(model, "cpu")
    return model


def _full(model) -> dict[str, torch.Tensor]:
    return {
        k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in get_model_state_dict(model).items()
    }


def _load_hf(path: str, dims: dict) -> dict:
    model = _ep_model(dims)
    loaded = load_hf_weights_(model, path, split_keys=per_expert_keys)
    init_weights_(model, model._init_weights, SEED, names=non_persistent_buffers(model))
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    with torch.no_grad():
        logits = model(input_ids=IDS, position_ids=torch.arange(40)[None], cu_seq_lens_q=torch.tensor([0, 40]),
                       cu_seq_lens_k=torch.tensor([0, 40]), max_length_q=40, max_length_k=40, use_cache=False).logits  # fmt: skip
    return {
        "logits": logits,
        "full": _full(model),
        "loaded": len(loaded),
        "local_experts": experts.to_local().shape[0],
    }


@pytest.mark.parametrize(("spawn", "dims"), [("written", EP2), (4, EP4)])
def test_per_expert_hf_checkpoint_lands_in_ep_shards(dirs, ranks, spawn, dims):
    plain = plain_model(moe_config())
    ref = AutoModelForCausalLM.from_pretrained(dirs["hf"], dtype=torch.float32)
    ref.config._attn_implementation = "sdpa"
    with torch.no_grad():
        want = ref(input_ids=IDS, use_cache=False).logits
    for out in ranks[spawn]["load_hf"]:
        torch.testing.assert_close(out["logits"], want, rtol=1e-5, atol=1e-6)
        for k, v in plain.state_dict().items():
            assert torch.equal(out["full"][k], v), k
        assert out["local_experts"] == 8 // dims["ep"] // (dims["dp_shard"] // dims["ep"])


def _save_or_load(root: str, dims: dict, phase: str) -> dict:
    model = _ep_model(dims)
    manager = CheckpointManager(root)
    if phase == "save":
        init_weights_(model, model._init_weights, SEED)
        manager.save(1, {"model": ModelPart(model)})
    else:
        manager.load({"model": ModelPart(model)})
    return _full(model)


def test_checkpoint_of_ep_model_does_not_depend_on_ep_size(dirs, ranks):
    saved = ranks["written"]["save"][0]
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(f"{dirs['ckpt']}/step-00000001").read_metadata().state_dict_metadata
    assert tuple(stored["model/model.layers.0.mlp.experts.gate_up_proj"].size) == (8, 32, 32)
    for world, dims in ((2, {"dp_shard": 2}), (4, {"dp_shard": 2, "sp": 2, "ep": 4})):
        loaded = ranks[world]["load"][0]
        for k, v in saved.items():
            assert torch.equal(loaded[k], v), (dims, k)


def _bad_ep() -> dict[str, str]:
    out = {}
    for name, build in {
        "experts_not_divisible": lambda: _ep_model({"dp_shard": 4, "ep": 4}, _six_experts()),
        "dense_model_with_ep": lambda: _dense_with_ep(),
        "missing_expert_tensor": lambda: _typo_plan(),
        "partial_expert_plan": lambda: _partial_plan(),
    }.items():
        try:
            build()
            out[name] = "no error"
        except (ParallelConfigError, PlanError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    dist.barrier()
    return out


def _six_experts():
    config = moe_config()
    config.num_experts = 6
    return config


def _dense_with_ep():
    from tests.omni_dist.tiny import tiny_qwen2_config

    return _ep_model({"dp_shard": 4, "ep": 2}, tiny_qwen2_config())


def _partial_plan():
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), ep=2), device_type="cpu")
    model = meta_model(moe_config())
    plan = dataclasses.replace(plan_for(model), expert_params={"*.mlp.experts.gate_up_proj": "shard0"})
    parallelize(model, mesh, plan, ParallelizeConfig())


def _typo_plan():
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), ep=2), device_type="cpu")
    model = meta_model(moe_config())
    plan = dataclasses.replace(plan_for(model), expert_params={"*.mlp.experts.gate_up": "shard0"})
    parallelize(model, mesh, plan, ParallelizeConfig())


def test_bad_expert_parallel_configurations_are_named(ranks):
    out = ranks[4]["bad_ep"][0]
    assert "6 experts cannot be split over ep=4" in out["experts_not_divisible"]
    assert "ep=2 but the plan of Qwen2ForCausalLM names no expert modules" in out["dense_model_with_ep"]
    assert (
        "plan.expert_params pattern '*.mlp.experts.gate_up' matches no parameter"
        in out["missing_expert_tensor"]
    )
    assert (
        "plan.expert_params does not cover ['model.layers.0.mlp.experts.down_proj']"
        in out["partial_expert_plan"]
    )
    with pytest.raises(ParallelConfigError, match=r"ep \(3\) must divide dp_shard x sp = 4"):
        ParallelDims(world_size=4, ep=3)


def _export_ep(out_dir: str) -> None:
    model = _ep_model({"dp_shard": 2, "ep": 2})
    init_weights_(model, model._init_weights, SEED)
    export_hf_safetensors(
        model, out_dir, dtype="float32", max_shard_bytes=60_000, config_json=moe_config().to_json_string(),
        rename=per_expert_tensors,
    )  # fmt: skip


def _reload_export(out_dir: str) -> dict:
    model = _ep_model({"dp_shard": 2, "ep": 2})
    load_hf_weights_(model, out_dir, split_keys=per_expert_keys)
    return _full(model)


def test_hf_export_of_ep_sharded_moe_loads_with_from_pretrained(dirs, ranks):
    assert ranks["written"]["export"] == [None, None]  # re-raises what the export raised
    export = Path(dirs["export"])
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in index["weight_map"]  # HF's per-expert layout
    loaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    want = plain_model(moe_config())
    for k, v in want.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # and our own loader reads the export back into EP shards
    for k, v in ranks[2]["reload_export"][0].items():
        assert torch.equal(v, want.state_dict()[k]), k
