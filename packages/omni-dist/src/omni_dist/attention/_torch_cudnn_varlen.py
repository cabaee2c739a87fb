"""cuDNN's fused attention over packed documents, through a private ATen op (quarantined here).

No public torch API reaches cuDNN with cumulative sequence lengths: varlen_attn's cuDNN branch is
switched off (`_should_use_cudnn` returns False in 2.11 and 2.13), and nested-jagged SDPA tries flash
first and, under sdpa_kernel(CUDNN_ATTENTION), calls this same op after building nested tensors.
The op's schema is the same in torch 2.11.0 and 2.13.0 (checked in both wheels' ATen headers):

    aten::_cudnn_attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_bias,
        Tensor? cum_seq_q, Tensor? cum_seq_k, SymInt max_q, SymInt max_k, bool compute_log_sumexp,
        float dropout_p=0.0, bool is_causal=False, bool return_debug_mask=False, *, float? scale=None)
        -> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_mask)

With cum_seq_q given it takes (T, H, D) tensors (Hkv may divide Hq) and runs cuDNN's ragged graph; it
is differentiable (CudnnAttentionBackward0 -> aten::_cudnn_attention_backward in both versions).

Known defect: until mid-2026 the backward read the maximum length from `query.size(2)`, which is the
head size for (T, H, D) inputs (pytorch/pytorch#186142): cuDNN's dQ accumulator is then sized for
128-token documents and longer ones write past it (illegal memory access). `MIN_TORCH` excludes the
releases that predate the fix; bench/attention.py runs this backend in a separate process to show
whether a given torch is affected. cuDNN also caches one execution graph per (documents, longest
document, T): a micro-batch with a new layout builds a graph first (the bench reports that cost).
"""

from __future__ import annotations

import torch

# Assumed: the first release branched after the fix (June 2026). Lower it when bench/attention.py shows
# the backward correct on an older torch.
MIN_TORCH = (2, 13)
MIN_CUDNN = 90500  # ragged (THD) forward and backward with padding masks


def torch_release() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def unusable_reason() -> str | None:
    """Why this torch build cannot run the cuDNN varlen path here, or None (device checks are the caller's)."""
    if torch_release() < MIN_TORCH:
        return (
            f"torch {torch.__version__} predates the fix of cuDNN's varlen backward (pytorch#186142: "
            f"max length read from the head size); needs torch >= {'.'.join(map(str, MIN_TORCH))}"
        )
    if not hasattr(torch.ops.aten, "_cudnn_attention_forward"):
        return f"torch {torch.__version__} has no aten::_cudnn_attention_forward"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    version = torch.backends.cudnn.version() or 0
    if version < MIN_CUDNN:
        return f"cuDNN {version} is older than {MIN_CUDNN} (ragged attention with a padding mask)"
    return None


def cudnn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """(T, Hq, D), (T, Hkv, D) x2 -> (T, Hq, D) through cuDNN's ragged SDPA graph."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}).")
    # cuDNN's ragged offsets assume token-major (T, H, D) rows; a strided view is copied once here.
    q, k, v = (x.contiguous() for x in (q, k, v))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.data_ptr() % 16:  # host metadata only; cuDNN silently misreads unaligned rows
            raise ValueError(
                f"cuDNN varlen attention needs 16-byte aligned {name}, got address {x.data_ptr()}."
            )
    cu = cu_seqlens.to(torch.int32).contiguous()
    needs_lse = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outputs = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu, cu, max_seqlen, max_seqlen, needs_lse, 0.0, causal, False, scale=scale
    )
    return outputs[0]
