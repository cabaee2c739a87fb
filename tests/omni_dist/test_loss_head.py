"""The chunked loss head equals one cross-entropy over all the logits: loss, and the gradients of the
hidden states and of every head parameter (fp32), for linear heads (gradients made in forward) and a
two-layer head (chunks recomputed in backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omni_dist.loss_head import head_cross_entropy

VOCAB, WIDTH = 50, 12


def _heads() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(WIDTH, VOCAB, bias=False),
        "linear_bias": nn.Linear(WIDTH, VOCAB),
        "mlp": nn.Sequential(nn.Linear(WIDTH, 16), nn.GELU(), nn.Linear(16, VOCAB)),
    }


def _run(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int):
    head.zero_grad(set_to_none=True)
    h = hidden.clone().requires_grad_(True)
    loss = head_cross_entropy(head, h, targets, chunk)
    (loss * 0.37).backward()  # a scale: the chunks pass the incoming gradient on
    return loss.detach(), h.grad, {n: p.grad.clone() for n, p in head.named_parameters()}


@pytest.mark.parametrize("name", ["linear", "linear_bias", "mlp"])
@pytest.mark.parametrize("rows,chunk", [(23, 5), (20, 5), (7, 64), (0, 4)])
def test_chunked_equals_all_logits(name, rows, chunk):
    head = _heads()[name]
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, WIDTH, generator=gen)
    targets = torch.randint(VOCAB, (rows,), generator=gen)
    full_loss, full_h, full_p = _run(head, hidden, targets, 0)
    loss, h, grads = _run(head, hidden, targets, chunk)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, full_h, rtol=1e-5, atol=1e-7)
    for n, g in full_p.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7)
    if rows:
        assert full_loss > 0 and full_h.abs().sum() > 0


@pytest.mark.parametrize("linear", [True, False])
def test_chunks_hold_no_logits_for_backward(linear):
    """Forward keeps no (rows x vocab) tensor for backward (a linear head: d(hidden) and d(weight); any
    other: each chunk's input)."""
    head = nn.Linear(WIDTH, 1000, bias=False) if linear else nn.Sequential(nn.Linear(WIDTH, 1000), nn.Tanh())
    hidden = torch.randn(64, WIDTH, requires_grad=True)
    targets = torch.randint(1000, (64,))
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    for chunk, biggest in ((8, 64 * 1000), (0, 64 * 1000)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            head_cross_entropy(head, hidden, targets, chunk)
        largest = max(s.numel() for s in saved)
        assert (largest < biggest // 4) if chunk else (largest >= biggest), (chunk, saved)
