"""Kernel swaps on CPU: every family whose plan names kernels computes, once its modules are swapped
(with torch formulas in the kernels' place), the same loss and gradients as HF's own class; selection of
`parallel.kernels` and the checks on what a swap may replace. liger's own functions: test_kernels_gpu.py."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from omni_dist.kernel_swap import swap_kernels
from omni_dist.plan import ParallelPlan, PlanError
from omni_dist.recompute import apply_recompute
from omni_models.attention import register_packed_attention
from omni_models.hf_plans import plan_for
from omni_models.kernel_modules import KernelRMSNorm, RotaryAttention, SwiGLUMLP
from omni_models.kernels import select_kernels
from tests.omni_models.kernel_refs import TORCH_FORMULAS

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip


def _text_lm(name: str) -> nn.Module:
    if name == "qwen3_moe":
        cfg = Qwen3MoeConfig(**SMALL, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        return AutoModelForCausalLM.from_config(cfg)
    if name in ("llama", "qwen2", "qwen3"):
        return AutoModelForCausalLM.from_config(
            {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[name](**SMALL)
        )
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig

    from omni_models.foundations import qwen3_vl, text_lm

    cls, cfg = {
        "qwen2_vl": (text_lm.Qwen2VLTextForCausalLM, Qwen2VLTextConfig),
        "qwen2_5_vl": (text_lm.Qwen2_5_VLTextForCausalLM, Qwen2_5_VLTextConfig),
        "qwen2_5_omni": (text_lm.Qwen2_5OmniThinkerTextForCausalLM, Qwen2_5OmniTextConfig),
        "qwen3_vl": (qwen3_vl.Qwen3VLTextForCausalLM, Qwen3VLTextConfig),
        "qwen3_vl_moe": (qwen3_vl.Qwen3VLMoeTextForCausalLM, Qwen3VLMoeTextConfig),
    }[name]
    mrope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}
    extra = {"head_dim": 8} if name.startswith("qwen3_vl") else {}  # Qwen3-VL's default is 128
    if name == "qwen3_vl_moe":
        extra |= {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}
    return cls(cfg(**SMALL, **extra, rope_parameters=mrope, bos_token_id=None, eos_token_id=None))


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, **inputs):
    logits = model(input_ids=ids, **inputs).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen2_5_omni",
        "qwen3_vl",
        "qwen3_vl_moe",
    ],
)
def test_swapped_modules_compute_what_hf_computes(family):
    torch.manual_seed(0)
    hf = _text_lm(family).float()
    ours = copy.deepcopy(hf)
    plan = plan_for(ours)
    swapped = swap_kernels(ours, plan.match_kernels(ours), TORCH_FORMULAS.swaps())
    kinds = {type(ours.get_submodule(f)) for f in swapped}
    want = {KernelRMSNorm, RotaryAttention} | ({SwiGLUMLP} if not family.endswith("moe") else set())
    assert kinds == want, kinds
    norms = sum(isinstance(m, KernelRMSNorm) for m in ours.modules())
    assert norms == 2 * 2 + 1 + (2 * 2 if family.startswith("qwen3") else 0)  # + q/k norms
    assert ours.state_dict().keys() == hf.state_dict().keys()
    ids = torch.randint(0, 96, (1, 24))
    # M-RoPE families: distinct temporal/height/width positions, as an image's tokens have
    mrope = family in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe")
    t = torch.arange(24)
    positions = {"position_ids": torch.stack([t, t % 5, t // 5])[:, None]} if mrope else {}
    want_loss, want_grads = _loss_and_grads(hf, ids, **positions)
    loss, grads = _loss_and_grads(ours, ids, **positions)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_swapped_blocks_recompute_what_hf_computes(recompute):
    """On the training path: two documents packed, attention per document (omni_sdpa)."""
    register_packed_attention()
    torch.manual_seed(0)
    hf = _text_lm("qwen3").float()
    hf.config._attn_implementation = "omni_sdpa"
    ours = copy.deepcopy(hf)
    plan = plan_for(ours)
    swap_kernels(ours, plan.match_kernels(ours), TORCH_FORMULAS.swaps())
    for fqn, block in plan.match_modules(ours, "recompute"):
        apply_recompute(block, fqn, recompute)
    ids, cu = torch.randint(0, 96, (1, 24)), torch.tensor([0, 10, 24], dtype=torch.int32)
    packed = dict(position_ids=torch.cat([torch.arange(10), torch.arange(14)])[None], cu_seq_lens_q=cu,
                  cu_seq_lens_k=cu, max_length_q=14, max_length_k=14)  # fmt: skip
    (want, want_grads), (got, grads) = (
        _loss_and_grads(hf, ids, **packed),
        _loss_and_grads(ours, ids, **packed),
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_a_swap_keeps_the_parameter_objects_and_refuses_other_layouts():
    hf = _text_lm("qwen3")
    attn = hf.model.layers[0].self_attn
    q_weight = attn.q_proj.weight
    swap_kernels(hf, plan_for(hf).match_kernels(hf), TORCH_FORMULAS.swaps())
    assert hf.model.layers[0].self_attn.q_proj.weight is q_weight
    assert isinstance(hf.model.layers[0].self_attn.q_norm, KernelRMSNorm)  # inner swaps adopted

    gelu_mlp = nn.Module()
    for n in ("gate_proj", "up_proj", "down_proj"):
        setattr(gelu_mlp, n, nn.Linear(4, 4))
    gelu_mlp.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="computes silu; Module uses GELU"):
        SwiGLUMLP(gelu_mlp, TORCH_FORMULAS.silu_mul)
    with pytest.raises(ValueError, match=r"rms_norm kernel replaces .* has parameters \['bias', 'weight'\]"):
        KernelRMSNorm(nn.LayerNorm(4), TORCH_FORMULAS.rms_norm)
    model = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(PlanError, match=r"asks for \['swiglu'\], which the kernel set lacks"):
        swap_kernels(model, ParallelPlan(kernels={"LayerNorm": "swiglu"}).match_kernels(model), {})
    with pytest.raises(PlanError, match=r"plan.kernels pattern 'RMSNorm' matches no module"):
        ParallelPlan(kernels={"RMSNorm": "rms_norm"}).match_kernels(model)


def test_kernel_selection_says_what_it_chose_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="omni_models.kernels"):
        assert select_kernels("auto", "cpu") is None
        assert select_kernels("torch", "cuda") is None
    assert caplog.messages == [
        "kernels: torch (auto: liger-kernel's Triton kernels run on CUDA, this run's device is cpu)",
        "kernels: torch (requested)",
    ]
    with pytest.raises(
        ValueError, match=r"parallel.kernels=liger cannot run: .* device is cpu. Use parallel.kernels=auto"
    ):
        select_kernels("liger", "cpu")


@pytest.mark.parametrize("name", ["qwen2_5_vl_vision", "qwen2_5_omni_vision"])
def test_swapped_vision_tower_encodes_what_hf_computes(name):
    """Qwen2.5-VL's and Qwen2.5-Omni's towers (RMSNorm, SwiGLU blocks; the merger's RMSNorm too)."""
    from omni_dist.packed import MediaBatch
    from omni_models.registry import ENCODERS
    from tests.omni_models.test_contracts import TINY

    spec = TINY["encoders"][name]
    torch.manual_seed(0)
    hf = ENCODERS[name](dict(spec["config"]), modalities=tuple(spec["modalities"]), **spec["options"])
    ours = copy.deepcopy(hf)
    swapped = swap_kernels(ours, hf.plan().match_kernels(ours), TORCH_FORMULAS.swaps())
    assert sorted(set(swapped.values())) == ["rms_norm", "swiglu"]
    cfg = hf.tower.config
    rows = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    grid = torch.tensor([[1, 4, 4]])
    media = {"image": MediaBatch.of([{"pixel_values": torch.randn(16, rows), "grid_thw": grid}], [4])}
    outs = []
    for encoder in (hf, ours):
        features = encoder.lm_encode(media)["image"]
        features.square().sum().backward()
        outs.append((features.detach(), {n: p.grad for n, p in encoder.named_parameters()}))
    (want, want_grads), (got, grads) = outs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
