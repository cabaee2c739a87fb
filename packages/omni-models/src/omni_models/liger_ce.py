"""liger-kernel's cross-entropy kernel as the chunk kernel of the chunked LM-head loss.

liger's own fused linear cross-entropy reads the number of labelled rows on the host (`.item()`) in
forward and compares the incoming gradient with 1.0 on the host (`torch.equal`) in backward: two waits on
the device per step. Here only its Triton kernel runs, on one chunk's logits, with `reduction="sum"` (so
no row count is needed); omni_dist.loss_head does the chunking and the matmuls and scales the gradients by
the incoming gradient on the device. The kernel writes d(loss)/d(logits) over the logits in place, so a
chunk costs rows x vocab in the compute dtype and no fp32 copy.

Checked against liger-kernel 0.8.5 (ops/cross_entropy.py, `liger_cross_entropy_kernel`): the argument
names are checked at the first call, so a liger release that changes them fails with a clear error.
"""

from __future__ import annotations

import torch

_ARGS = (
    "X_ptr", "X_stride", "Y_ptr", "Y_stride", "weight_ptr", "loss_ptr", "z_loss_ptr", "loss_stride",
    "token_accuracy_ptr", "token_accuracy_stride", "predicted_tokens_ptr", "predicted_tokens_stride",
    "n_cols", "n_non_ignore", "sum_non_ignore_weight", "weight_sum", "ignore_index", "lse_square_scale",
    "label_smoothing", "reduction", "softcap", "RETURN_Z_LOSS", "RETURN_TOKEN_ACCURACY",
    "RETURN_PREDICTED_TOKENS", "BLOCK_SIZE", "HAS_WEIGHT", "HAS_SOFTCAPPING", "HAS_GRADIENTS",
)  # fmt: skip
MAX_BLOCK = 32768  # liger's MAX_FUSED_SIZE on CUDA


def _kernel():
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    names = tuple(getattr(liger_cross_entropy_kernel, "arg_names", ()))
    if names != _ARGS:
        raise ImportError(
            "liger_cross_entropy_kernel's arguments differ from liger-kernel 0.8.5's (omni_models/liger_ce.py "
            f"was checked on those): {names}. Use parallel.kernels=torch, or the locked liger-kernel."
        )
    return liger_cross_entropy_kernel


def liger_chunk_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed fp32 loss, gradient in the logits' memory or None) of one contiguous (rows, vocab) chunk."""
    rows, vocab = logits.shape
    loss = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss.sum(), logits if grad else None
    _kernel()[(rows,)](
        X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=targets, Y_stride=targets.stride(-1),
        weight_ptr=None, loss_ptr=loss, z_loss_ptr=None, loss_stride=loss.stride(-1),
        token_accuracy_ptr=None, token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0,
        n_cols=vocab, n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=-100,
        lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None,
        RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
        BLOCK_SIZE=min(MAX_BLOCK, 1 << (vocab - 1).bit_length()),
        HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=grad, num_warps=32,
    )  # fmt: skip
    return loss.sum(), logits if grad else None
