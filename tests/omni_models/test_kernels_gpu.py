"""liger's kernels against the torch path on a GPU (skipped without CUDA and liger-kernel): a Qwen2 and a
Qwen3 decoder with their norms, MLPs and attention swapped compute HF's loss and gradients within bf16
tolerances (also under selective recompute); liger's cross-entropy kernel in the chunked loss head equals torch's chunks; `auto` measures each kernel."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from omni_dist.kernel_swap import swap_kernels
from omni_dist.loss_head import head_cross_entropy
from omni_dist.recompute import apply_recompute
from omni_models.attention import register_packed_attention
from omni_models.hf_plans import plan_for
from omni_models.kernels import liger_status, select_kernels

pytestmark = pytest.mark.gpu

DIMS = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip


@pytest.fixture(scope="module")
def liger():
    status = liger_status("cuda" if torch.cuda.is_available() else "cpu")
    if status != "ok":
        pytest.skip(status)
    return select_kernels("liger", "cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("recompute", ["none", "selective"])
@pytest.mark.parametrize("config_cls", [Qwen2Config, Qwen3Config])
def test_liger_swapped_decoder_matches_hf(liger, config_cls, recompute):
    """Selective recompute keeps the projections' outputs, which liger's in-place kernels must not touch."""
    register_packed_attention()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config_cls(**DIMS)).to("cuda", torch.bfloat16)
    hf.config._attn_implementation = "omni_sdpa"  # the training path: packed documents
    ours = copy.deepcopy(hf)
    plan = plan_for(ours)
    swapped = swap_kernels(ours, plan.match_kernels(ours), liger.swaps())
    assert sorted(set(swapped.values())) == ["rms_norm", "rope", "swiglu"]
    if recompute != "none":
        for fqn, block in plan.match_modules(ours, "recompute"):
            apply_recompute(block, fqn, recompute)
    ids = torch.randint(0, DIMS["vocab_size"], (1, 512), device="cuda")
    cu = torch.tensor([0, 200, 512], dtype=torch.int32, device="cuda")
    positions = torch.cat([torch.arange(200), torch.arange(312)]).to("cuda")[None]
    packed = dict(
        position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=312, max_length_k=312
    )
    results = []
    for model in (hf, ours):
        logits = model(input_ids=ids, **packed).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, grads) = results
    assert abs(got.item() - want.item()) <= 1e-2 * abs(want.item())
    worst = max((_rel(grads[n], g), n) for n, g in want_grads.items())
    assert worst[0] < 5e-2, worst


def test_liger_chunk_cross_entropy_matches_the_torch_chunks(liger):
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 32000, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32000, (3000,), device="cuda")
    out = []
    for kernel in (None, liger.chunk_cross_entropy):
        h = hidden.clone().requires_grad_()
        head.weight.grad = None
        loss = head_cross_entropy(head, h, targets, chunk=1024, chunk_ce=kernel)
        loss.backward()
        out.append((loss.detach(), h.grad, head.weight.grad.clone()))
    (want, want_h, want_w), (got, got_h, got_w) = out
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-3 * abs(want.item())
    assert _rel(got_h, want_h) < 2e-2 and _rel(got_w, want_w) < 2e-2


def test_auto_measures_each_kernel_on_cuda(liger, caplog):
    from omni_models.kernel_timing import KernelShapes, measure_kernels

    shapes = KernelShapes(2048, 1024, 2816, 16, 2, 64, 32000, 1024)
    measure = lambda k: measure_kernels(shapes, k, torch.device("cuda"), torch.bfloat16, repeats=3)  # noqa: E731
    with caplog.at_level(logging.INFO, logger="omni_models.kernels"):
        chosen = select_kernels("auto", "cuda", measure=measure)
    (line,) = caplog.messages
    assert line.startswith("kernels: auto, measured torch/liger on this device: rms_norm ")
    for kernel in ("rms_norm", "swiglu", "rope", "cross_entropy"):
        assert f"{kernel} " in line
    if chosen is not None:
        assert chosen.name == "liger"
