"""Tiny HF models, a fixed global batch, and one training loop shared by single-process and parallel runs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.attention import SequenceParallel
from omni_dist.grad_norm import clip_grad_norm_
from omni_dist.loss import global_token_count
from omni_dist.packed import PackedBatch, pack, pad_for_sp
from omni_dist.parallelize import ParallelizeConfig, parallelize
from omni_dist.plan import ParallelPlan
from omni_dist.sequence import slice_for_sp
from omni_dist.weights import init_weights_, materialize_
from omni_models.attention import implementation_name, register_packed_attention
from omni_models.hf_plans import HF_DECODER_PLANS

SEED = 1234
RTOL = 1e-5  # parity tolerance (fp32, relative) for loss and grad norm against one process
STEPS = 5
GLOBAL_BATCH = 8
SEQ = 16

# The Qwen2 family's plan as omni-models ships it (data only, no edits to the HF model).
QWEN2_PLAN = HF_DECODER_PLANS["Qwen2ForCausalLM"]


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    kw = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        dtype="float32",
    )
    kw.update(overrides)
    return Qwen2Config(**kw)


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plain_model(config, seed: int = SEED) -> nn.Module:
    """The single-process reference: same builder, same init, no parallelism."""
    model = meta_model(config)
    materialize_(model, "cpu")
    init_weights_(model, model._init_weights, seed)
    return model


def global_batch(vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g)
    labels = ids.clone()
    # Uneven numbers of supervised tokens per sequence, so the token weighting matters.
    for i in range(GLOBAL_BATCH):
        labels[i, : 1 + 2 * i % SEQ] = -100
    return ids, labels


def loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, int((target != -100).sum())


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, foreach=False)


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """Clip by the global norm (1.0), step, clear gradients; returns the norm before clipping."""
    norm = clip_grad_norm_(model.parameters(), 1.0).item()
    opt.step()
    opt.zero_grad()
    return norm


def train_single(config, steps: int = STEPS) -> dict[str, list[float]]:
    model = plain_model(config)
    opt = make_optimizer(model)
    ids, labels = global_batch(config.vocab_size)
    losses, norms = [], []
    for _ in range(steps):
        total, tokens = loss_sum(model, ids, labels)
        loss = total / tokens
        loss.backward()
        norms.append(optimizer_step(model, opt))
        losses.append(loss.item())
    return {"loss": losses, "grad_norm": norms}


def build_parallel(config, dims_kwargs: dict, cfg: ParallelizeConfig, plan: ParallelPlan = QWEN2_PLAN):
    dims = ParallelDims(world_size=dist.get_world_size(), **dims_kwargs)
    mesh = ParallelMesh.build(dims, device_type="cpu")
    model = meta_model(config)
    report = parallelize(model, mesh, plan, cfg)
    materialize_(model, "cpu", offload_params=cfg.offload_params)
    init_weights_(model, model._init_weights, SEED)
    return model, mesh, report


def train_parallel(config, dims_kwargs: dict, cfg: ParallelizeConfig, steps: int = STEPS) -> dict:
    model, mesh, report = build_parallel(config, dims_kwargs, cfg)
    opt = make_optimizer(model)
    ids, labels = global_batch(config.vocab_size)
    per = GLOBAL_BATCH // mesh.dims.dp
    rows = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
    losses, norms = [], []
    for _ in range(steps):
        total, tokens = loss_sum(model, ids[rows], labels[rows])
        loss = total / global_token_count(tokens, mesh["loss"]).to(total.dtype)
        loss.backward()
        norms.append(optimizer_step(model, opt))
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=mesh["loss"].get_group())
        losses.append(reported.item())
    return {
        "loss": losses,
        "grad_norm": norms,
        "offload_saved": sum(o.saved for o in report.offloaded.values()),
        "offload_params_kept": sum(o.params_kept for o in report.offloaded.values()),
        "recomputed": len(report.recomputed),
    }


# --- packed sequences (sequence parallelism) -------------------------------------------------------

PACKED_LENGTHS = [[9, 4, 12, 6], [5, 14, 3, 7, 2]]  # two packed sequences: 31 and 31 tokens


def packed_global_batch(vocab: int = 128, layout: list[list[int]] = PACKED_LENGTHS) -> list[PackedBatch]:
    g = torch.Generator().manual_seed(5)
    out = []
    for lengths in layout:
        samples = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
        # the first two tokens of each sample are a "prompt" without loss
        masks = [torch.arange(n) >= 2 for n in lengths]
        out.append(pack(samples, masks))
    return out


def packed_config(**overrides) -> Qwen2Config:
    register_packed_attention()
    return tiny_qwen2_config(attn_implementation=implementation_name("sdpa"), **overrides)


def packed_loss_sum(model: nn.Module, seq: PackedBatch, sp: SequenceParallel | None = None):
    ids, pos, labels = seq.input_ids[0], seq.position_ids[0], seq.labels[0]
    if sp is not None:
        ids, pos, labels = (slice_for_sp(x, sp) for x in (ids, pos, labels))
    logits = model(
        input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=seq.cu_seqlens, cu_seq_lens_k=seq.cu_seqlens,
        max_length_q=seq.max_seqlen, max_length_k=seq.max_seqlen, use_cache=False, sequence_parallel=sp,
    ).logits[0].float()  # fmt: skip
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total, int((labels != -100).sum())


def train_single_packed(config, steps: int = STEPS) -> dict[str, list[float]]:
    model = plain_model(config)
    opt = make_optimizer(model)
    batch = packed_global_batch(config.vocab_size)
    tokens = sum(int((s.labels != -100).sum()) for s in batch)
    losses, norms = [], []
    for _ in range(steps):
        loss = 0.0
        for seq in batch:  # micro-batches
            total, _ = packed_loss_sum(model, seq)
            (total / tokens).backward()
            loss += (total / tokens).item()
        norms.append(optimizer_step(model, opt))
        losses.append(loss)
    return {"loss": losses, "grad_norm": norms}


def my_sequences(batch: list[PackedBatch], mesh: ParallelMesh, sp: SequenceParallel) -> list[PackedBatch]:
    """This data-parallel rank's packed sequences, padded for its SP group."""
    return [pad_for_sp(s, sp.size) for s in batch[mesh.dp_rank :: mesh.dims.dp]]


def packed_step(
    model, opt, mine: list[PackedBatch], mesh: ParallelMesh, sp: SequenceParallel
) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; (global loss, global grad norm)."""
    local_tokens = sum(int((slice_for_sp(s.labels[0], sp) != -100).sum()) for s in mine)
    tokens = global_token_count(local_tokens, mesh["loss"])
    loss = torch.zeros((), dtype=torch.float64)
    for seq in mine:
        total, _ = packed_loss_sum(model, seq, sp)
        (total / tokens.to(total.dtype)).backward()
        loss += total.detach() / tokens
    norm = optimizer_step(model, opt)
    dist.all_reduce(loss, group=mesh["loss"].get_group())
    return loss.item(), norm


def train_sp(config, dims_kwargs: dict, overlap_chunks: int = 1, steps: int = STEPS) -> dict:
    model, mesh, _ = build_parallel(config, dims_kwargs, ParallelizeConfig())
    sp = SequenceParallel.from_mesh(mesh["sp"], overlap_chunks)
    opt = make_optimizer(model)
    mine = my_sequences(packed_global_batch(config.vocab_size), mesh, sp)
    losses, norms = [], []
    for _ in range(steps):
        loss, norm = packed_step(model, opt, mine, mesh, sp)
        losses.append(loss)
        norms.append(norm)
    return {"loss": losses, "grad_norm": norms}


def assert_matches(reference: dict, got: dict, label: str) -> None:
    """Loss and grad norm of every step equal the single-process run within RTOL."""
    for key in ("loss", "grad_norm"):
        want, have = torch.tensor(reference[key]), torch.tensor(got[key])
        assert torch.allclose(have, want, rtol=RTOL, atol=0), (
            f"{label} {key}: {have.tolist()} vs {want.tolist()}"
        )
