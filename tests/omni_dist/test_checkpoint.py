"""Distributed checkpoints: reshard across layouts, exact resume, crash safety, keep-K, HF export.

Every save runs in one spawn per world size (fixture `saved`), every resume in another (fixture `resumed`):
a resume still starts in fresh processes, from what the save wrote. The crash gets its own spawn."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from omni_dist.attention import SequenceParallel
from omni_dist.checkpoint import CheckpointError, CheckpointManager, ModelPart, OptimizerPart, RNGPart
from omni_dist.hf_export import export_hf_safetensors
from omni_dist.parallelize import ParallelizeConfig
from tests.harness import RankFailedError, run_checks, run_ranks
from tests.omni_dist.tiny import (
    build_parallel,
    global_batch,
    make_optimizer,
    my_sequences,
    packed_config,
    packed_global_batch,
    packed_step,
    plain_model,
    tiny_qwen2_config,
)

FOUR_SEQUENCES = [[9, 4, 12, 6], [5, 14, 3, 7, 2], [11, 11, 9], [3, 3, 20, 4]]


class Counters:
    """Trainer counters: a plain-Python part (stored as JSON inside a tensor)."""

    def __init__(self) -> None:
        self.step, self.history = 0, []

    def state_dict(self) -> dict:
        return {"step": self.step, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = state["step"], list(state["history"])


class DieOnSave:
    """A part whose state_dict kills its rank: a crash in the middle of a save."""

    per_rank = True

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.armed = False

    def state_dict(self) -> dict:
        if self.armed and dist.get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"x": torch.zeros(1)}

    def load_state_dict(self, state: dict) -> None:
        pass


def _full(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _full(v)
        elif isinstance(v, DTensor):
            out[k] = v.full_tensor()
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
        else:
            out[k] = v
    return out


def _train(dims: dict, steps: int, root: str, save_at: int | None = None, resume: bool = False,
           async_save: bool = False, random_labels: bool = False) -> dict:  # fmt: skip
    config = packed_config()
    model, mesh, _ = build_parallel(config, dims, ParallelizeConfig())
    sp = SequenceParallel.from_mesh(mesh["sp"])
    opt = make_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
    counters = Counters()
    manager = CheckpointManager(root, keep=2, async_save=async_save)
    parts = {"model": ModelPart(model), "optimizer": OptimizerPart(model, opt), "scheduler": sched,
             "trainer": counters, "rng": RNGPart()}  # fmt: skip
    out: dict = {"losses": {}}
    start = 0
    if resume:
        start = manager.load(parts)
        out["loaded"] = {"model": _full(get_model_state_dict(model)), "optimizer": _full(get_optimizer_state_dict(model, opt)),
                         "scheduler": sched.state_dict(), "trainer": counters.state_dict()}  # fmt: skip
    mine = my_sequences(packed_global_batch(config.vocab_size, FOUR_SEQUENCES), mesh, sp)
    for step in range(start + 1, steps + 1):
        batch = mine
        if random_labels:  # the loss depends on the RNG: exact resume needs the RNG restored
            batch = [_drop_labels(s) for s in mine]
        loss, _ = packed_step(model, opt, batch, mesh, sp)
        sched.step()
        counters.step = step
        counters.history.append(round(loss, 4))
        out["losses"][step] = loss
        if step == save_at:
            out["blocked_s"] = manager.save(step, parts)
            out["saved"] = {"model": _full(get_model_state_dict(model)), "optimizer": _full(get_optimizer_state_dict(model, opt)),
                            "scheduler": sched.state_dict(), "trainer": counters.state_dict()}  # fmt: skip
    manager.wait()
    return out


def _drop_labels(seq):
    labels = seq.labels.clone()
    labels[torch.rand(labels.shape) < 0.2] = -100
    return type(seq)(seq.input_ids, seq.position_ids, labels, seq.cu_seqlens, seq.max_seqlen)


def _assert_state_equal(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_state_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


DP2 = {"dp_shard": 2}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("checkpoints")
    names = ("reshard", "exact_sync", "exact_async", "crash", "keep", "float32", "bfloat16", "parts")
    return {name: str(base / name) for name in names}


@pytest.fixture(scope="module")
def crashed(roots):
    """A rank killed inside a save (its own spawn: the group dies with it)."""
    with pytest.raises(RankFailedError) as info:
        run_ranks(_crash_then_recover, 2, roots["crash"], "crash")
    return str(info.value)


@pytest.fixture(scope="module")
def saved(roots):
    two = run_checks(
        2,
        {
            "exact_sync": (_train, (DP2, 10, roots["exact_sync"], 5, False, False, True)),
            "exact_async": (_train, (DP2, 10, roots["exact_async"], 5, False, True, True)),
            "keep": (_keep_and_mismatch, (roots["keep"],)),
            "float32": (_export, (roots["float32"], "float32")),
            "bfloat16": (_export, (roots["bfloat16"], "bfloat16")),
            "parts": (_part_semantics, (roots["parts"], "save")),
        },
    )
    four = run_checks(4, {"reshard": (_train, ({"dp_shard": 4}, 6, roots["reshard"], 3))})
    return {2: two, 4: four}


@pytest.fixture(scope="module")
def resumed(roots, saved, crashed):
    two = run_checks(
        2,
        {
            "reshard": (_train, (DP2, 6, roots["reshard"], None, True)),
            "exact_sync": (_train, (DP2, 10, roots["exact_sync"], None, True, False, True)),
            "exact_async": (_train, (DP2, 10, roots["exact_async"], None, True, True, True)),
            "crash": (_crash_then_recover, (roots["crash"], "recover")),
            "parts": (_part_semantics, (roots["parts"], "load")),
        },
    )
    four = run_checks(
        4,
        {
            "reshard": (_train, ({"dp_shard": 2, "sp": 2}, 6, roots["reshard"], None, True)),
            "parts": (_part_semantics, (roots["parts"], "load")),
        },
    )
    return {2: two, 4: four}


def test_save_on_four_ranks_resume_on_other_layouts(saved, resumed):
    straight = saved[4]["reshard"][0]
    for world, dims in ((2, {"dp_shard": 2}), (4, {"dp_shard": 2, "sp": 2})):
        resumed_run = resumed[world]["reshard"][0]
        for part in ("model", "optimizer", "scheduler", "trainer"):
            _assert_state_equal(straight["saved"][part], resumed_run["loaded"][part], f"{dims}:{part}")
        for step in (4, 5, 6):
            want, got = straight["losses"][step], resumed_run["losses"][step]
            assert abs(got - want) <= 1e-5 * abs(want), (dims, step, got, want)


@pytest.mark.parametrize("check", ["exact_sync", "exact_async"])
def test_exact_resume_is_bitwise(saved, resumed, check):
    straight, again = saved[2][check][0], resumed[2][check][0]
    assert [again["losses"][s] for s in range(6, 11)] == [straight["losses"][s] for s in range(6, 11)]
    assert again["loaded"]["trainer"]["step"] == 5


def _crash_then_recover(root: str, phase: str) -> dict:
    model, _, _ = build_parallel(tiny_qwen2_config(), {"dp_shard": 2}, ParallelizeConfig())
    manager = CheckpointManager(root, keep=3)
    dier = DieOnSave(rank=1)
    parts = {"model": ModelPart(model), "dier": dier}
    if phase == "crash":
        manager.save(2, parts)
        dier.armed = True
        manager.save(4, parts)  # rank 1 dies inside this save
        return {}
    before = {"latest": str(manager.latest()), "partial": sorted(p.name for p in manager.root.glob("*.tmp"))}
    step = manager.load(parts)
    manager.save(3, parts)
    dist.barrier()
    after = {"latest": str(manager.latest()), "partial": sorted(p.name for p in manager.root.glob("*.tmp"))}
    return {"before": before, "loaded_step": step, "after": after, "steps": manager.complete_steps()}


def test_a_rank_killed_during_save_leaves_the_previous_checkpoint_latest(crashed, resumed):
    assert "killed by signal SIGKILL" in crashed
    out = resumed[2]["crash"][0]
    assert out["before"]["latest"].endswith("step-00000002")
    assert out["before"]["partial"] == ["step-00000004.tmp"]
    assert out["loaded_step"] == 2
    assert out["after"]["latest"].endswith("step-00000003") and out["after"]["partial"] == []
    assert out["steps"] == [2, 3]


def _keep_and_mismatch(root: str) -> dict:
    model, _, _ = build_parallel(tiny_qwen2_config(), {"dp_shard": 2}, ParallelizeConfig())
    manager = CheckpointManager(root, keep=2)
    for step in (1, 2, 3):
        manager.save(step, {"model": ModelPart(model), "rng": RNGPart()})
    steps = manager.complete_steps()
    other, _, _ = build_parallel(tiny_qwen2_config(num_hidden_layers=2), {"dp_shard": 2}, ParallelizeConfig())
    errors = {}
    vocab, _, _ = build_parallel(tiny_qwen2_config(vocab_size=96), {"dp_shard": 2}, ParallelizeConfig())
    cases = (
        ("shape", {"model": ModelPart(other)}),
        ("part", {"optimizer": Counters()}),
        ("vocab", {"model": ModelPart(vocab)}),
    )
    for name, parts in cases:
        try:
            manager.load(parts)
        except CheckpointError as e:
            errors[name] = str(e)
    return {"steps": steps, "errors": errors}


def test_keep_last_k_and_mismatched_models_are_named(saved):
    out = saved[2]["keep"][0]
    assert out["steps"] == [2, 3]
    assert "the checkpoint has ['model/model.layers.2." in out["errors"]["shape"]
    assert "has no part(s) ['optimizer'] (it has ['model', 'rng'])" in out["errors"]["part"]
    assert (
        "model/model.embed_tokens.weight: shape (128, 32) in the checkpoint, (96, 32) now"
        in out["errors"]["vocab"]
    )


def _export(out_dir: str, dtype: str) -> None:
    config = tiny_qwen2_config()
    model, _, _ = build_parallel(config, {"dp_shard": 2}, ParallelizeConfig())
    export_hf_safetensors(
        model, out_dir, dtype=dtype, max_shard_bytes=40_000, config_json=config.to_json_string()
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_export_of_sharded_model_loads_with_from_pretrained(roots, saved, dtype):
    assert saved[2][dtype] == [None, None]  # the export ran on both ranks (re-raises what it raised)
    out = Path(roots[dtype])
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in loaded.state_dict().values()
    )
    want = plain_model(tiny_qwen2_config())
    ids, _ = global_batch()
    with torch.no_grad():
        got = loaded.float()(input_ids=ids, use_cache=False).logits
        ref = (want.to(getattr(torch, dtype)).float())(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class Cursor:
    """A per-rank part whose state differs by rank and changes size (like a data loader's buffer)."""

    per_rank = True

    def __init__(self, items: list[int]) -> None:
        self.items = torch.tensor(items, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"buffer": self.items, "rank": dist.get_rank()}

    def load_state_dict(self, state: dict) -> None:
        assert state["rank"] == dist.get_rank()
        self.items = state["buffer"]


def _part_semantics(root: str, phase: str) -> dict:
    manager = CheckpointManager(root, keep=1)
    cursor = Cursor([] if phase != "save" else [dist.get_rank()] * (3 + dist.get_rank()))
    out: dict = {}
    if phase == "save":
        for step in (5, 3):  # resumed from an older step: the new save must survive keep=1
            manager.save(step, {"cursor": cursor})
        out["steps"], out["latest"] = manager.complete_steps(), manager.latest().name
        try:
            manager.save(7, {"same": _NotPerRank()})
        except CheckpointError as e:
            out["differing"] = str(e)
        return out
    out["step"] = manager.load({"cursor": cursor})
    out["items"] = cursor.items.tolist()
    return out


class _NotPerRank:
    """Claims to be the same on every rank but is not."""

    def state_dict(self) -> dict:
        return {"value": torch.tensor([dist.get_rank()])}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_per_rank_variable_size_parts_keep_k_and_replicated_checks(saved, resumed):
    first = saved[2]["parts"]
    assert first[0]["steps"] == [3] and first[0]["latest"] == "step-00000003"
    for out in first:
        assert "parts ['same'] differ between ranks but are not per-rank" in out["differing"]
    same = resumed[2]["parts"]
    assert [o["items"] for o in same] == [[0, 0, 0], [1, 1, 1, 1]]  # each rank its own, sizes restored
    other = resumed[4]["parts"]
    assert all(o["items"] == [] and o["step"] == 3 for o in other)  # another world size: not restored
