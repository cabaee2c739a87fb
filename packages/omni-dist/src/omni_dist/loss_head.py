"""Cross-entropy through a vocabulary head without materialising all the logits.

At a 152K vocabulary, 16K labelled rows are ~10 GB of fp32 logits, plus their log-softmax and gradient.
Here the head runs on `chunk` rows at a time, so the loss holds O(chunk x vocab):

- a linear head (an LM head): each chunk's gradients are computed in forward, from its logits
  (softmax - one-hot, by a chunk kernel: torch's ops or liger-kernel's in-place Triton kernel), and only
  d(hidden) and d(weight) are kept for backward; three matmuls per row, as with all logits at once (no
  recompute), and backward scales them by the incoming gradient on the device (no host check);
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
# (logits (rows, vocab) in the head's dtype, targets (rows,), whether gradients are needed) -> (summed fp32
# cross-entropy, d(loss)/d(logits) in the logits' dtype or None; it may reuse the logits' memory): the
# kernel that computes each chunk of a linear head (torch's ops here; liger-kernel's in omni_models.kernels)
ChunkCrossEntropy = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def torch_chunk_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of one chunk in fp32 and its gradient (softmax - one-hot), in the fp32 logits' memory."""
    dtype, logits = logits.dtype, logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    if not grad:
        return loss, None
    g = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
    g[torch.arange(len(targets), device=g.device), targets] -= 1.0
    return loss, g.to(dtype)


def head_cross_entropy(
    head: Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 0,
    chunk_ce: ChunkCrossEntropy | None = None,
) -> torch.Tensor:
    """Summed fp32 cross-entropy of `head(hidden)` (rows, vocab) against `targets` (rows,).

    `chunk` rows of logits at a time; 0 (or, for a non-linear head, no more rows than `chunk`): one call
    whose logits autograd keeps, as a plain `F.cross_entropy(head(hidden).float())`. Same loss and
    gradients either way (only the order of the sums differs). Under FSDP, call it inside the unit that
    owns the head (or a registered forward method), or keep that unit gathered until backward: the head
    is called per chunk, in forward and (non-linear heads) again in backward. `chunk_ce`: the kernel of a
    linear head's chunks (default torch_chunk_cross_entropy; with it, chunk 0 is one chunk of all rows)."""
    linear = isinstance(head, nn.Linear)
    if linear and (chunk > 0 or chunk_ce is not None):
        rows = chunk if chunk > 0 else max(1, hidden.shape[0])
        return _LinearCrossEntropy.apply(
            hidden, head.weight, head.bias, targets, rows, chunk_ce or torch_chunk_cross_entropy
        )
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
    made in forward by the incoming gradient, on the device (d(weight) and d(bias) accumulate in fp32
    over the chunks)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, chunk_ce):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need = need_h or need_w or need_b
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            part, g = chunk_ce(F.linear(h, weight, bias).contiguous(), t.contiguous(), need)
            loss += part
            if not need:
                continue
            if need_b:
                grad_b += g.float().sum(0)
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
            None,
        )
