"""Attention over packed variable-length sequences, one function per backend.

Every backend takes q (T, Hq, D), k and v (T, Hkv, D) for one packed sequence of T tokens whose samples
are delimited by `cu_seqlens` (int, [0, ..., T]), and returns (T, Hq, D). Hq must be a multiple of Hkv
(grouped-query attention). Tokens attend only within their own sample (causally when `causal`).

    sdpa        F.scaled_dot_product_attention per document (equal lengths batched): any device, the reference
    varlen      torch.nn.attention.varlen.varlen_attn (CUDA, torch builds that ship it): FlashAttention-2
    flash_attn  flash_attn.flash_attn_varlen_func (CUDA, with the flash-attn package)
    cudnn       cuDNN's ragged SDPA graph (CUDA, Hopper+, see _torch_cudnn_varlen for the torch versions)
    flex        compiled flex_attention with a document block mask built on the device (CUDA, triton)

On the GPU path no backend waits on the device: `max_seqlen` comes from the collator as a Python int.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from omni_dist.attention import _torch_cudnn_varlen
from omni_dist.attention._torch_cudnn_varlen import cudnn_varlen
from omni_dist.attention.flex_document import flex_varlen
from omni_dist.attention.sdpa_op import sdpa_varlen_op

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]
# `auto` takes the first backend that can run. The order is a prior until bench/attention.py has run on
# the target GPU: cuDNN's fused kernels are the fastest per FLOP on Hopper (one long sequence through
# SDPA picks them), FlashAttention-2 (flash_attn, varlen) next, flex's Triton kernels after it, and the
# per-document SDPA loop (host sync, one launch per length) last. Re-order by measured TFLOP/s.
AUTO_ORDER = ("cudnn", "flash_attn", "varlen", "flex", "sdpa")
CUDNN_MIN_CAPABILITY = (9, 0)  # Hopper: cuDNN's ragged SDPA kernels beat FA2 there, not on Ampere
FLEX_MIN_CAPABILITY = (8, 0)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, causal: bool = True) -> torch.Tensor:
    """(T, T) bool mask, True where query i may attend key j: same sample (and j <= i when causal)."""
    sample = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
    sample[cu_seqlens[1:-1].long()] = 1
    sample = sample.cumsum(0)
    mask = sample[:, None] == sample[None, :]
    if causal:
        mask &= torch.ones(total, total, dtype=torch.bool, device=mask.device).tril()
    return mask


def sdpa_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Each document attends within itself: documents of equal length run as one SDPA batch with
    `is_causal`, so the work is sum(l_i^2), not the T x T of a block-diagonal mask (which
    `block_causal_mask` still gives for reference)."""
    if torch.compiler.is_compiling():  # in a compiled block: one opaque op, not a host loop (sdpa_op)
        return sdpa_varlen_op(q, k, v, cu_seqlens, scale, causal)
    del max_seqlen  # the boundaries say it
    bounds = cu_seqlens.tolist()
    if len(bounds) == 2:  # one document: no gather
        return _sdpa(q[None], k[None], v[None], scale, causal)[0]
    by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    out = torch.empty_like(q)
    for length, starts in by_length.items():
        rows = (
            torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
        ).flatten()
        docs = [x[rows].unflatten(0, (len(starts), length)) for x in (q, k, v)]
        out[rows] = _sdpa(*docs, scale, causal).flatten(0, 1)
    return out


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool
) -> torch.Tensor:
    """(B, L, H, D) documents -> (B, L, Hq, D); grouped-query heads shared by SDPA itself."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=causal, scale=scale, enable_gqa=k.shape[2] != q.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


def torch_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    params = inspect.signature(varlen_attn).parameters
    # The keyword for causality changed between torch releases (is_causal -> window_size).
    extra = (
        {"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0) if causal else (-1, -1)}
    )
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, **extra)


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal)


BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_varlen,
    "varlen": torch_varlen,
    "flash_attn": flash_attn_varlen,
    "cudnn": cudnn_varlen,
    "flex": flex_varlen,
}


def backend_status(device_type: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Why each backend can or cannot run here for `dtype`: 'ok' or the reason."""
    status = {"sdpa": "ok"}
    gpu_backends = ("varlen", "flash_attn", "cudnn", "flex")
    if not (device_type == "cuda" and torch.cuda.is_available()):
        status.update(dict.fromkeys(gpu_backends, "needs a CUDA device"))
        return status
    capability = torch.cuda.get_device_capability()
    status["flex"] = _flex_status(capability)
    if dtype not in (torch.float16, torch.bfloat16):
        status.update(
            dict.fromkeys(
                ("varlen", "flash_attn", "cudnn"), f"its kernels need float16/bfloat16, not {dtype}"
            )
        )
        return status
    status["varlen"] = _importable("torch.nn.attention.varlen", "varlen_attn")
    status["flash_attn"] = _importable("flash_attn", "flash_attn_varlen_func")
    if capability < CUDNN_MIN_CAPABILITY:
        status["cudnn"] = f"compute capability {capability} is below {CUDNN_MIN_CAPABILITY} (Hopper)"
    else:
        status["cudnn"] = _torch_cudnn_varlen.unusable_reason() or "ok"
    return status


def _flex_status(capability: tuple[int, int]) -> str:
    if capability < FLEX_MIN_CAPABILITY:
        return f"compute capability {capability} is below {FLEX_MIN_CAPABILITY}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (torch.compile of flex_attention needs it)"
    return _importable("torch.nn.attention.flex_attention", "BlockMask")


def device_summary(device_type: str) -> str:
    """The facts the automatic choice rests on, for its log line."""
    if not (device_type == "cuda" and torch.cuda.is_available()):
        return f"{device_type}, torch {torch.__version__}"
    major, minor = torch.cuda.get_device_capability()
    return (
        f"{torch.cuda.get_device_name()} sm{major}{minor}, torch {torch.__version__}, "
        f"cuDNN {torch.backends.cudnn.version()}"
    )


def _importable(module: str, name: str) -> str:
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, OSError) as e:  # OSError: a binary built for another torch/CUDA
        return f"{module}.{name} is not usable: {e}"
    return "ok"


def resolve_backend(
    name: str, device_type: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[str, AttentionFn]:
    """The backend for `dtype`: `name`, or with 'auto' the first of AUTO_ORDER that can run here."""
    status = backend_status(device_type, dtype)
    if name == "auto":
        chosen = next(n for n in AUTO_ORDER if status[n] == "ok")
        skipped = [f"{n}: {status[n]}" for n in AUTO_ORDER[: AUTO_ORDER.index(chosen)]]
        log.info(
            "attention backend: %s (auto, order %s, on %s%s)",
            chosen, " > ".join(AUTO_ORDER), device_summary(device_type),
            f"; skipped {'; '.join(skipped)}" if skipped else "",
        )  # fmt: skip
        return chosen, BACKENDS[chosen]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}.")
    if status[name] != "ok":
        raise ValueError(f"attention backend {name!r} cannot run on {device_type}: {status[name]}.")
    log.info("attention backend: %s (requested)", name)
    return name, BACKENDS[name]
