"""Which kernel is faster here: torch's formula or liger's, forward + backward at the model's widths.

`parallel.kernels: auto` asks this once at parallelize time (CUDA only): each kernel runs on random
inputs of the foundation's shapes (`tokens` rows) a few times after a warm-up, timed with CUDA events,
against the torch code it would replace (HF's RMSNorm and rotary formulas, silu x up, the torch chunk
kernel of the loss head). The first GPU run measured liger's RMSNorm and RoPE faster (0.62x, 0.67x of
torch's time) and SwiGLU even (0.97x) at Qwen2-7B widths, so the answer depends on the shapes and the
device: it is measured, not assumed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from omni_dist.loss_head import torch_chunk_cross_entropy
from omni_models.kernels import KernelSet


@dataclass(frozen=True)
class KernelShapes:
    tokens: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    chunk: int  # rows of the loss head at a time
    eps: float = 1e-6

    @classmethod
    def of(cls, config: Any, tokens: int, chunk: int) -> KernelShapes:
        """From an HF text config (the foundation's)."""
        heads = config.num_attention_heads
        return cls(
            tokens=tokens,
            hidden=config.hidden_size,
            intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            chunk=min(chunk or tokens, tokens),
            eps=getattr(config, "rms_norm_eps", 1e-6),
        )


def _rms_norm(x, weight, eps):  # HF's Llama/Qwen RMSNorm
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _cases(s: KernelShapes, kernels: KernelSet, device, dtype) -> dict[str, tuple[Callable, Callable]]:
    """kernel -> (torch's step, liger's step): each a forward and backward on fresh-grad inputs."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, grad=True, scale=1.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale
        return t.requires_grad_(grad)

    cases = {}
    if kernels.rms_norm is not None:
        x, weight = rand(s.tokens, s.hidden), rand(s.hidden)
        cases["rms_norm"] = tuple(
            lambda f=f, x=x, weight=weight: f(x, weight, s.eps).sum().backward()
            for f in (_rms_norm, kernels.rms_norm)
        )
    if kernels.silu_mul is not None:
        a, b = rand(s.tokens, s.intermediate), rand(s.tokens, s.intermediate)
        cases["swiglu"] = tuple(
            lambda f=f, a=a, b=b: f(a, b).sum().backward()
            for f in (lambda u, v: F.silu(u) * v, kernels.silu_mul)
        )
    if kernels.rope is not None:
        q, k = rand(1, s.heads, s.tokens, s.head_dim), rand(1, s.kv_heads, s.tokens, s.head_dim)
        cos, sin = rand(1, s.tokens, s.head_dim, grad=False), rand(1, s.tokens, s.head_dim, grad=False)

        def rope_step(f):
            qq, kk = f(q, k, cos, sin)
            (qq.sum() + kk.sum()).backward()

        cases["rope"] = (lambda: rope_step(apply_rotary_pos_emb), lambda: rope_step(kernels.rope))
    if kernels.chunk_cross_entropy is not None:
        h, w = rand(s.chunk, s.hidden, grad=False), rand(s.vocab, s.hidden, grad=False, scale=0.02)
        t = torch.randint(0, s.vocab, (s.chunk,), generator=g, device=device)

        def ce_step(f):  # one chunk of the loss head: logits, the kernel, the two gradient matmuls
            _, grad = f(F.linear(h, w).contiguous(), t, True)
            grad @ w, grad.T @ h

        cases["cross_entropy"] = (
            lambda: ce_step(torch_chunk_cross_entropy),
            lambda: ce_step(kernels.chunk_cross_entropy),
        )
    return cases


def _time_ms(step: Callable, repeats: int, device: torch.device) -> float:
    step()
    step()  # warm-up: Triton compiles on the first call
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_kernels(
    shapes: KernelShapes, kernels: KernelSet, device: torch.device, dtype: torch.dtype, repeats: int = 5
) -> dict[str, tuple[float, float]]:
    """kernel -> (torch ms, candidate ms), forward + backward, for each kernel `kernels` has."""
    out = {}
    for name, (torch_step, candidate_step) in _cases(shapes, kernels, device, dtype).items():
        out[name] = (_time_ms(torch_step, repeats, device), _time_ms(candidate_step, repeats, device))
    return out
