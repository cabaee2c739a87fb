"""Expert parallelism on tiny Qwen3-MoE (8 experts, top-2): every layout trains like one process.

Each rank processes one packed micro-batch per step (its share of four sample groups); the single
process packs all four groups into one sequence, so the load-balancing loss is over the same tokens.
The loss is token-weighted cross-entropy plus router_aux_loss_coef x the global aux loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.attention import SequenceParallel
from omni_dist.loss import global_token_count
from omni_dist.moe_loss import load_balancing_loss
from omni_dist.packed import pack, pad_for_sp
from omni_dist.parallelize import ParallelizeConfig, parallelize
from omni_dist.sequence import slice_for_sp
from omni_dist.weights import init_weights_, materialize_
from omni_models.attention import implementation_name, register_packed_attention
from omni_models.hf_plans import plan_for
from tests.harness import run_ranks
from tests.omni_dist.tiny import SEED, assert_matches, make_optimizer, meta_model, optimizer_step

STEPS = 5
GROUPS = [[9, 4, 12, 6], [5, 14, 3, 7, 2], [11, 11, 9], [3, 3, 20, 4]]


def moe_config() -> Qwen3MoeConfig:
    register_packed_attention()
    return Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, router_aux_loss_coef=0.05, output_router_logits=True, use_cache=False,
        attn_implementation=implementation_name("sdpa"), dtype="float32", bos_token_id=0, eos_token_id=1,
    )  # fmt: skip


def sample_groups(vocab: int = 128) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    # The first two groups repeat one token: their tokens all route alike, so on the ranks holding them
    # most experts receive nothing (the unequal-routing case); the others are random text.
    return [
        [torch.full((n,), 3 + i) if i < 2 else torch.randint(0, vocab, (n,), generator=g) for n in lens]
        for i, lens in enumerate(GROUPS)
    ]


def _routing_counts(router_logits, top_k: int, num_experts: int) -> torch.Tensor:
    """(layers, experts) routed slots on this rank."""
    return torch.stack([torch.bincount(torch.topk(r, top_k).indices.reshape(-1), minlength=num_experts)
                        for r in router_logits])  # fmt: skip


def train_single() -> dict:
    config = moe_config()
    model = meta_model(config)
    materialize_(model, "cpu")
    init_weights_(model, model._init_weights, SEED)
    opt = make_optimizer(model)
    seq = pack([s for group in sample_groups() for s in group])
    losses, norms = [], []
    for _ in range(STEPS):
        out = model(
            input_ids=seq.input_ids, position_ids=seq.position_ids, cu_seq_lens_q=seq.cu_seqlens,
            cu_seq_lens_k=seq.cu_seqlens, max_length_q=seq.max_seqlen, max_length_k=seq.max_seqlen,
            use_cache=False, output_router_logits=True,
        )  # fmt: skip
        ce = F.cross_entropy(out.logits[0].float(), seq.labels[0], ignore_index=-100, reduction="sum")
        tokens = int((seq.labels != -100).sum())
        aux = load_balancing_loss_func(out.router_logits, config.num_experts, config.num_experts_per_tok)
        loss = ce / tokens + config.router_aux_loss_coef * aux
        loss.backward()
        norms.append(optimizer_step(model, opt))
        losses.append(loss.item())
    return {"loss": losses, "grad_norm": norms}


def train_ep(dims: dict, chunks: int = 1, compute: str = "auto", dispatch: str = "exact") -> dict:
    config = moe_config()
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), **dims), device_type="cpu")
    mesh.dims.check_model(num_experts=config.num_experts)
    model = meta_model(config)
    report = parallelize(
        model,
        mesh,
        plan_for(model),
        # the padded dispatch's bound, the same on every rank: all samples' tokens
        ParallelizeConfig(
            ep_async=chunks,
            expert_compute=compute,
            ep_dispatch=dispatch,
            ep_token_bound=sum(map(sum, GROUPS)),
        ),
    )
    materialize_(model, "cpu")
    init_weights_(model, model._init_weights, SEED)
    opt = make_optimizer(model)
    sp = SequenceParallel.from_mesh(mesh["sp"])
    groups = sample_groups()
    per = len(groups) // mesh.dims.dp
    mine = pack([s for group in groups[mesh.dp_rank * per : (mesh.dp_rank + 1) * per] for s in group])
    real_len = mine.length
    seq = pad_for_sp(mine, sp.size)
    loss_group = mesh["loss"].get_group()
    losses, norms, routed = [], [], []
    for _ in range(STEPS):
        ids, pos, labels = (slice_for_sp(x[0], sp) for x in (seq.input_ids, seq.position_ids, seq.labels))
        real = slice_for_sp(torch.arange(seq.length) < real_len, sp)
        out = model(
            input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=seq.cu_seqlens, cu_seq_lens_k=seq.cu_seqlens,
            max_length_q=seq.max_seqlen, max_length_k=seq.max_seqlen, use_cache=False, sequence_parallel=sp,
            output_router_logits=True,
        )  # fmt: skip
        ce = F.cross_entropy(out.logits[0].float(), labels, ignore_index=-100, reduction="sum")
        tokens = global_token_count(int((labels != -100).sum()), mesh["loss"]).to(ce.dtype)
        aux = load_balancing_loss(
            out.router_logits, config.num_experts_per_tok, config.num_experts, real, loss_group
        )
        routed.append(_routing_counts(out.router_logits, config.num_experts_per_tok, config.num_experts))
        loss = ce / tokens + config.router_aux_loss_coef * aux
        loss.backward()
        norms.append(optimizer_step(model, opt))
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=loss_group)
        losses.append(reported.item())
    local = model.model.layers[0].mlp.experts.gate_up_proj.to_local().shape
    return {
        "loss": losses,
        "grad_norm": norms,
        "experts": report.expert_parallel,
        "local_expert_shape": tuple(local),
        "routed": torch.stack(routed),  # (steps, layers, experts) on this rank
    }


@pytest.fixture(scope="module")
def reference():
    return train_single()


def _layouts(layouts: dict[str, dict], variants: dict[str, dict] | None = None) -> dict:
    """Train each layout (name -> mesh dims); `variants` (name -> train_ep options) reuse a layout."""
    variants = variants or {}
    runs = {name: (dims, {}) for name, dims in layouts.items()}
    runs |= {name: (layouts[opts["layout"]], opts["options"]) for name, opts in variants.items()}
    out = {name: train_ep(dims, **options) for name, (dims, options) in runs.items()}
    for result in out.values():  # every rank's routing, to check that some experts got nothing somewhere
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result["routed"])
        result["routed"] = torch.stack(gathered)  # (ranks, steps, layers, experts)
    return out


def test_ep2_with_fsdp2_matches_single_process(reference):
    variants = {  # chunked overlapping dispatch; both local expert computations (auto = grouped_mm on CPU)
        "ep2_chunked": {"layout": "ep2", "options": {"chunks": 3}},
        "ep2_loop": {"layout": "ep2", "options": {"compute": "loop"}},
        "ep2_padded": {"layout": "ep2", "options": {"dispatch": "padded"}},  # no host sync (expert_padded)
    }
    both = run_ranks(_layouts, 2, {"ep2": {"dp_shard": 2, "ep": 2}}, variants)[0]
    for name in variants:
        assert_matches(reference, both[name], name)
    out = both["ep2"]
    assert_matches(reference, out, "ep2")
    assert out["experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert out["local_expert_shape"] == (4, 32, 32)  # 8 experts / ep 2, 2 x moe_intermediate, hidden
    _assert_unequal_routing(out["routed"])
    assert reference["loss"][-1] < reference["loss"][0]


def test_ep2_in_dp_shard4_and_ep2_x_sp2_match_single_process(reference):
    layouts = {"ep2_in_dp4": {"dp_shard": 4, "ep": 2}, "ep2_x_sp2": {"dp_shard": 2, "sp": 2, "ep": 2}}
    variants = {"ep2_x_sp2_padded": {"layout": "ep2_x_sp2", "options": {"dispatch": "padded"}}}
    out = run_ranks(_layouts, 4, layouts, variants)[0]
    for name in [*layouts, *variants]:
        assert_matches(reference, out[name], name)
        _assert_unequal_routing(out[name]["routed"])


def _assert_unequal_routing(routed: torch.Tensor) -> None:
    first = routed[:, 0]  # (ranks, layers, experts) at the first step
    assert (first == 0).any(), "every expert got tokens on every rank: the batch does not test empty experts"
