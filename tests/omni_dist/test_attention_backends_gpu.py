"""The per-document GPU backends (cudnn, flex, varlen) against float32 per-document attention, forward and
q/k/v gradients, and without a host sync: CUDA's sync debug mode set to "error" raises on any
synchronising call (.item(), blocking copies, data-dependent sizes). Skipped without CUDA; a backend
that backend_status calls unusable here is skipped with its reason."""

from __future__ import annotations

import contextlib

import pytest
import torch

from omni_dist.attention import BACKENDS, backend_status, sdpa_varlen

pytestmark = pytest.mark.gpu

LENGTHS = [
    300,
    1,
    129,
    1000,
    7,
    256,
    64,
    1,
]  # 1758 tokens: single tokens, tile-crossing, not a multiple of 128
OTHER_LENGTHS = [517, 1, 2000, 33]  # a second layout with a new T (flex must not recompile for it)
HEADS, KV_HEADS, DIM = 8, 2, 128


def _usable(backend: str) -> None:
    reason = backend_status("cuda", torch.bfloat16)[backend]
    if reason != "ok":
        pytest.skip(reason)


def _packed(lengths: list[int], seed: int):
    """bf16 leaves in HF's (H, T, D) memory layout, their (T, H, D) views, cu_seqlens and an output grad."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    leaves = [
        torch.randn(h, total, DIM, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for h in (HEADS, KV_HEADS, KV_HEADS)
    ]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    grad = torch.randn(total, HEADS, DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    return leaves, cu, grad


def _run(backend: str, leaves, cu, max_len: int, grad, causal: bool = True):
    out = BACKENDS[backend](*(x.transpose(0, 1) for x in leaves), cu, max_len, None, causal)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextlib.contextmanager
def _no_host_sync():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["cudnn", "flex", "varlen"])
def test_backend_equals_float32_per_document_attention(backend, causal):
    _usable(backend)
    leaves, cu, grad = _packed(LENGTHS, seed=0)
    got = _run(backend, leaves, cu, max(LENGTHS), grad, causal)
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    want = _run("sdpa", ref_leaves, cu, max(LENGTHS), grad.float(), causal)
    assert got[0].shape == (sum(LENGTHS), HEADS, DIM) and got[0].dtype == torch.bfloat16
    errors = {name: _rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
    assert max(errors.values()) < 2e-2, errors  # bf16 kernels: ~3e-3 expected
    # the single-token documents attend to themselves only (causal or not)
    for start in (300, sum(LENGTHS) - 1):
        torch.testing.assert_close(
            got[0][start].float(), leaves[2][:, start].float().repeat_interleave(HEADS // KV_HEADS, 0)
        )


@pytest.mark.parametrize("backend", ["cudnn", "flex", "varlen"])
def test_backend_runs_without_host_sync(backend):
    """After a warm-up (flex compiles there), a new layout with a new T runs forward and backward with
    CUDA's sync debug mode set to "error"; flex also must not recompile for it."""
    _usable(backend)
    leaves, cu, grad = _packed(LENGTHS, seed=0)
    _run(backend, leaves, cu, max(LENGTHS), grad)
    leaves, cu, grad = _packed(OTHER_LENGTHS, seed=1)  # built (host-to-device copies) before the check
    torch.cuda.synchronize()
    stance = torch.compiler.set_stance("fail_on_recompile") if backend == "flex" else contextlib.nullcontext()
    with stance, _no_host_sync():
        out, *grads = _run(backend, leaves, cu, max(OTHER_LENGTHS), grad)
    torch.cuda.synchronize()
    ref = sdpa_varlen(*(x.detach().transpose(0, 1) for x in leaves), cu, max(OTHER_LENGTHS), None, True)
    assert _rel(out, ref) < 2e-2
    assert all(g.isfinite().all() for g in grads)


def test_sync_debug_mode_catches_a_host_read():
    """The check above can fail: a .item() on a CUDA tensor raises under the same mode."""
    x = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"), _no_host_sync():
        x.sum().item()


def test_flex_document_mask_matches_the_mask_mod_on_the_device():
    """The block classification from cu_seqlens equals flex's own create_block_mask on the device."""
    _usable("flex")
    from torch.nn.attention.flex_attention import create_block_mask

    from omni_dist.attention.flex_document import document_block_mask, document_ids, document_mask_mod

    _, cu, _ = _packed(LENGTHS, seed=0)
    total = sum(LENGTHS)
    mine = document_block_mask(cu, total, causal=True)
    ref = create_block_mask(
        document_mask_mod(document_ids(cu, total, total), True), None, None, total, total, device="cuda"
    )
    assert torch.equal(mine.to_dense(), ref.to_dense())
    assert torch.equal(mine.full_kv_num_blocks, ref.full_kv_num_blocks)
