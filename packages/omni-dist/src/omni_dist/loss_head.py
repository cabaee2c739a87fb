"""Cross-entropy through a vocabulary head without materialising all the logits.

At a 152K vocabulary, 16K labelled rows are ~10 GB of fp32 logits, plus their log-softmax and gradient.
Here the head runs on `chunk` rows at a time, so the loss holds O(chunk x vocab):

- a linear head (an LM head): each chunk's gradients are computed in forward, from its logits
  (softmax - one-hot), and only d(hidden) and d(weight) are kept for backward; three matmuls per row, as
  with all logits at once (no recompute);
- any other head (e.g. a decoder's MLP head): each chunk runs under non-reentrant activation
  checkpointing, its logits recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]
# (hidden, weight, bias or None, targets) -> summed fp32 cross-entropy, e.g. a fused linear CE kernel
LinearCrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def head_cross_entropy(
    head: Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 0,
    fused: LinearCrossEntropy | None = None,
) -> torch.Tensor:
    """Summed fp32 cross-entropy of `head(hidden)` (rows, vocab) against `targets` (rows,).

    `chunk` rows of logits at a time; 0 (or, for a non-linear head, no more rows than `chunk`): one call
    whose logits autograd keeps, as a plain `F.cross_entropy(head(hidden).float())`. Same loss and
    gradients either way (only the order of the sums differs). Under FSDP, call it inside the unit that
    owns the head (or a registered forward method), or keep that unit gathered until backward: the head
    is called per chunk, in forward and (non-linear heads) again in backward. `fused`: computes a linear
    head's loss instead (it chunks on its own)."""
    if fused is not None and isinstance(head, nn.Linear) and hidden.shape[0] > 0:
        return fused(hidden, head.weight, head.bias, targets)
    if chunk > 0 and isinstance(head, nn.Linear):
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _summed_cross_entropy(head, hidden, targets)
    total = None
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = checkpoint(_summed_cross_entropy, head, hidden[rows], targets[rows], use_reentrant=False)
        total = part if total is None else total + part
    return total


def _summed_cross_entropy(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), chunk by chunk; backward scales the gradients
    made in forward (d(weight) and d(bias) accumulate in fp32 over the chunks)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            g[torch.arange(len(t), device=g.device), t] -= 1.0
            if need_b:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)
            if need_h:
                grad_h[start : start + chunk] = g @ weight
            if need_w:
                grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_loss.float()
        return (
            None if grad_h is None else grad_h * scale.to(grad_h.dtype),
            None if grad_w is None else (grad_w * scale).to(w_dtype),
            None if grad_b is None else (grad_b * scale).to(b_dtype),
            None,
            None,
        )
