"""A training step of a MoE foundation under expert parallelism never waits on the device with the padded
EP dispatch; the exact dispatch does, and the guard sees it.

The model is the tiny omni model (Qwen2-VL vision, Whisper audio) on a Qwen3-MoE foundation (8 experts,
top-2), FSDP over 2 gloo ranks with ep=2; each rank has its own two micro-batches of media samples, so
the ranks route different numbers of tokens. One step is the trainer's: forward_backward, the global
grad-norm clip, the optimizer step that skips itself on the device. It runs under omni_dist.sync_guard's
HostSyncGuard (on CPU every tensor counts as a device tensor except the batch's declared host tensors and
what is computed from them alone).

- `ep_dispatch: padded` (omni_dist.expert_padded): two steps raise nothing, and train as the exact
  dispatch does (loss and grad norm, rel 1e-5).
- `ep_dispatch: exact`: the same step records the routing's syncs (bincount and repeat_interleave, whose
  output sizes depend on the routing; its split-size `.tolist()` reads do not reach a TorchDispatchMode
  on CPU), so the test can fail.
- On CUDA (`gpu` marker): the padded expert computation with CUDA's grouped_mm waits on nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.expert_compute import fused_gate_up_compute, fused_gate_up_padded, grouped_mm_status
from omni_dist.parallelize import ParallelizeConfig
from omni_dist.sync_guard import HostSyncGuard
from omni_dist.weights import materialize_
from omni_models.config import OmniModelConfig, build_omni_model
from omni_models.omni_weights import init_omni_weights_
from omni_models.parallel import parallelize_omni, run_settings
from tests.guarded_step import guarded_steps
from tests.harness import run_ranks
from tests.omni_models.omni_fixtures import chat_processor, foundation_config, micro_batch, omni_spec, sample

MAX_TOKENS = 256  # data.max_tokens of this test's "loader": every micro-batch fits, on every rank
MOE = {"moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2, "head_dim": 8,
       "router_aux_loss_coef": 0.05}  # fmt: skip


def _model(dispatch: str):
    mesh = ParallelMesh.build(ParallelDims(world_size=2, dp_shard=2, ep=2), device_type="cpu")
    cfg = OmniModelConfig.from_dict(
        omni_spec() | {"foundation": {"name": "qwen3_moe", "config": foundation_config(**MOE)}}
    )
    config = ParallelizeConfig(
        ep_dispatch=dispatch, ep_token_bound=MAX_TOKENS
    )  # the trainer's max_tokens // sp
    with torch.device("meta"):
        model = build_omni_model(cfg, run_settings(mesh, config, None, loss_chunk=0))
    report = parallelize_omni(model, mesh, cfg, config)
    assert len(report.expert_parallel) == 2
    materialize_(model, "cpu")
    init_omni_weights_(model, 0)
    return model, mesh


def _rank() -> dict:
    rank = dist.get_rank()
    model, mesh = _model("padded")
    proc = chat_processor(model)
    # Every micro-batch has an image or a video: a micro-batch without them runs the vision tower on a dummy
    # whose grid is made inside the step, which the CPU guard cannot tell from a device tensor (on CUDA it
    # stays on the host). Audio is absent from some (its dummy pass runs).
    first = ("image", "audio") if rank == 0 else ("video",)
    batches = [micro_batch(proc, [sample(rank, first)]), micro_batch(proc, [sample(10 + rank, ("image",))])]
    tokens = [b.num_tokens for b in batches]
    assert max(tokens) <= MAX_TOKENS, tokens
    # raise_on_sync: a sync in a padded step fails the rank, and the test with its traceback
    padded = guarded_steps(model, mesh, batches, steps=2, raise_on_sync=True)
    exact = guarded_steps(*_model("exact"), batches, steps=2, raise_on_sync=False)
    return {"tokens": tokens, "padded": padded, "exact": exact}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_rank, 2)


def test_padded_ep_dispatch_step_has_no_host_sync_and_trains_like_exact(ranks):
    assert ranks[0]["tokens"] != ranks[1]["tokens"]  # the ranks route different token counts
    padded, exact = ranks[0]["padded"]["steps"], ranks[0]["exact"]["steps"]
    for (loss, norm, finite), (loss_ref, norm_ref, finite_ref) in zip(padded, exact, strict=True):
        assert finite == finite_ref == 1.0
        assert math.isclose(loss, loss_ref, rel_tol=1e-5) and math.isclose(norm, norm_ref, rel_tol=1e-5)
    assert padded[1][0] < padded[0][0]  # the optimizer step ran: the second step's loss is lower


def test_exact_ep_dispatch_syncs_and_the_guard_sees_it(ranks):
    for r in ranks:
        ops = {op for op, why in r["exact"]["events"] if why == "output size depends on device data"}
        assert {"aten.bincount.default", "aten.repeat_interleave.Tensor"} <= ops, r["exact"]["events"]


@pytest.mark.gpu
def test_padded_expert_function_on_cuda_waits_on_nothing_and_equals_exact():
    """The padded dispatch's local computation with CUDA's grouped_mm (bf16): forward and backward under
    HostSyncGuard("cuda") raise nothing; outputs and gradients equal the exact computation's."""
    experts, k, tokens, hidden, inter = 8, 4, 512, 256, 128
    reason = grouped_mm_status(torch.device("cuda"), torch.bfloat16, (hidden, inter))
    if reason != "ok":
        pytest.skip(reason)
    g = torch.Generator(device="cuda").manual_seed(0)
    index = torch.rand(tokens, experts * 2, generator=g, device="cuda").topk(k).indices  # 2 ranks' experts
    local = torch.where(index < experts, index, experts)  # the other rank's experts: not here
    local[-64:] = experts  # padding rows
    params = [
        torch.randn(experts, 2 * inter, hidden, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05,
        torch.randn(experts, hidden, inter, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05,
        torch.randn(tokens, hidden, generator=g, device="cuda", dtype=torch.bfloat16),
        torch.rand(tokens, k, generator=g, device="cuda", dtype=torch.bfloat16),
    ]
    grad = torch.randn(tokens, hidden, generator=g, device="cuda", dtype=torch.bfloat16)

    gate_up, down, x, w = (p.clone().requires_grad_() for p in params)
    with HostSyncGuard("cuda", raise_on_sync=True):
        out = fused_gate_up_padded(gate_up, down, F.silu, "grouped_mm")(x, local, w)
        (out * grad).sum().backward()
    padded = (out, x.grad, w.grad, gate_up.grad, down.grad)

    gate_up, down, x, w = (p.clone().requires_grad_() for p in params)
    slot = (local < experts).reshape(-1).nonzero().squeeze(1)  # the exact way: host counts
    slot = slot[torch.argsort(local.reshape(-1)[slot], stable=True)]
    counts = torch.bincount(local.reshape(-1)[slot], minlength=experts).tolist()
    y = fused_gate_up_compute(gate_up, down, F.silu, "grouped_mm")(x[slot // k], counts)
    out = torch.zeros_like(x).index_add(0, slot // k, (y * w.reshape(-1)[slot, None]).to(x.dtype))
    (out * grad).sum().backward()
    for a, b in zip(padded, (out, x.grad, w.grad, gate_up.grad, down.grad), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
