"""Ulysses sequence parallelism for attention over a packed sequence split across the SP group.

Each SP rank holds a contiguous slice of the (padded) packed sequence. Attention exchanges q, k, v with
an all-to-all from (local tokens, all heads) to (all tokens, heads/sp), runs the backend on the full
sequence for its heads (cu_seqlens are those of the full sequence), and exchanges the output back.

Sync (`overlap_chunks == 1`): three all-to-alls in, one out, each a blocking autograd op.
Async (`overlap_chunks = C > 1`): the heads of each rank are split into C chunks; all all-to-alls are
issued at once as async work, and attention of chunk c runs while chunks c+1.. are still in flight,
in forward and in backward. The backward recomputes each chunk's attention from the gathered inputs
(as flash attention does), so activation recompute of the enclosing block keeps working unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from omni_dist.attention.backends import AttentionFn
from omni_dist.parallel_dims import ParallelConfigError, check_sp_heads


@dataclass(frozen=True)
class SequenceParallel:
    """What attention needs to know about the SP group (build it from the mesh's `sp` view)."""

    group: ProcessGroup
    size: int
    rank: int
    overlap_chunks: int = 1

    @classmethod
    def from_mesh(cls, sp_mesh, overlap_chunks: int = 1) -> SequenceParallel:
        if overlap_chunks < 1:
            raise ParallelConfigError(f"overlap_chunks must be >= 1, got {overlap_chunks}.")
        return cls(sp_mesh.get_group(), sp_mesh.size(), sp_mesh.get_local_rank(), overlap_chunks)


def _a2a(x: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    src = x.contiguous()
    out = torch.empty_like(src)
    work = dist.all_to_all_single(out, src, group=group, async_op=async_op)
    return (out, _Pending(work, src)) if async_op else out


class _Pending:
    """An in-flight collective; keeps its send buffer alive until it is waited on."""

    def __init__(self, work, src: torch.Tensor):
        self.work, self.src = work, src

    def wait(self) -> None:
        self.work.wait()
        self.src = None


class _AllToAll(torch.autograd.Function):
    """Exchange dim-0 blocks with the group; its own inverse, so backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _a2a(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _a2a(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(T/sp, H, D) on each rank -> (T, H/sp, D): all tokens, this rank's block of heads."""
    t, h, d = x.shape
    blocks = x.view(t, sp.size, h // sp.size, d).transpose(0, 1)
    return _AllToAll.apply(blocks.contiguous(), sp.group).reshape(sp.size * t, h // sp.size, d)


def heads_to_seq(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Inverse of seq_to_heads: (T, H/sp, D) -> (T/sp, H, D)."""
    t, h, d = x.shape
    blocks = _AllToAll.apply(x.reshape(sp.size, t // sp.size, h, d), sp.group)
    return blocks.transpose(0, 1).reshape(t // sp.size, sp.size * h, d)


def expand_kv_heads(k: torch.Tensor, sp: int) -> torch.Tensor:
    """GQA with fewer kv heads than SP ranks: repeat each kv head so every rank gets the one it needs."""
    return k.repeat_interleave(sp // k.shape[1], dim=1) if k.shape[1] < sp else k


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None,
    causal: bool,
    attn_fn: AttentionFn,
    sp: SequenceParallel,
) -> torch.Tensor:
    """Attention of the local slice q (T/sp, H, D), k/v (T/sp, Hkv, D) -> (T/sp, H, D)."""
    check_sp_heads(sp.size, q.shape[1], k.shape[1])
    k, v = expand_kv_heads(k, sp.size), expand_kv_heads(v, sp.size)
    if sp.overlap_chunks > 1:
        return _PipelinedUlysses.apply(q, k, v, cu_seqlens, max_seqlen, scale, causal, attn_fn, sp)
    out = attn_fn(
        seq_to_heads(q, sp), seq_to_heads(k, sp), seq_to_heads(v, sp), cu_seqlens, max_seqlen, scale, causal
    )
    return heads_to_seq(out, sp)


def _chunk_layout(hq: int, hk: int, chunks: int) -> list[tuple[slice, slice]]:
    """Per chunk: (its q heads, the kv heads they use) among one rank's hq q heads and hk kv heads."""
    if hq % chunks or (hk % chunks and chunks % hk):
        raise ParallelConfigError(
            f"overlap_chunks ({chunks}) must divide the {hq} query heads per SP rank and divide or be a "
            f"multiple of the {hk} kv heads per SP rank; use a smaller value (1 disables overlap)."
        )
    s, kv_len = hq // chunks, max(1, hk // chunks)
    return [
        (slice(c * s, (c + 1) * s), slice(c * hk // chunks, c * hk // chunks + kv_len)) for c in range(chunks)
    ]


class _PipelinedUlysses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal, attn_fn, sp):
        n, t_local, d = sp.size, q.shape[0], q.shape[2]
        hq, hk = q.shape[1] // n, k.shape[1] // n
        layout = _chunk_layout(hq, hk, sp.overlap_chunks)
        # Issue everything now; the group runs them in order while this thread computes.
        kv_blocks = torch.stack([k.view(t_local, n, hk, d), v.view(t_local, n, hk, d)], dim=2).transpose(0, 1)
        kv_pending = _a2a(kv_blocks, sp.group, async_op=True)
        q_blocks = q.view(t_local, n, hq, d).transpose(0, 1)
        q_pending = [_a2a(q_blocks[:, :, qs], sp.group, async_op=True) for qs, _ in layout]
        kv, work = kv_pending
        work.wait()
        kv = kv.reshape(n * t_local, 2, hk, d)
        k_full, v_full = kv[:, 0], kv[:, 1]
        out = q.new_empty(t_local, n, hq, d)
        out_pending, q_full = [], []
        for (qs, ks), (qc, work) in zip(layout, q_pending, strict=True):
            work.wait()
            qc = qc.reshape(n * t_local, -1, d)
            q_full.append(qc)
            oc = attn_fn(qc, k_full[:, ks], v_full[:, ks], cu_seqlens, max_seqlen, scale, causal)
            out_pending.append((qs, _a2a(oc.reshape(n, t_local, -1, d), sp.group, async_op=True)))
        for qs, (oc, work) in out_pending:
            work.wait()
            out[:, :, qs] = oc.transpose(0, 1)
        ctx.save_for_backward(k_full, v_full, cu_seqlens, *q_full)
        ctx.meta = (max_seqlen, scale, causal, attn_fn, sp, layout)
        return out.view(t_local, n * hq, d)

    @staticmethod
    def backward(ctx, grad_out):
        k_full, v_full, cu_seqlens, *q_full = ctx.saved_tensors
        max_seqlen, scale, causal, attn_fn, sp, layout = ctx.meta
        n, t_local, d = sp.size, grad_out.shape[0], grad_out.shape[2]
        hq, hk = grad_out.shape[1] // n, k_full.shape[1]
        g_blocks = grad_out.view(t_local, n, hq, d).transpose(0, 1)
        g_pending = [_a2a(g_blocks[:, :, qs], sp.group, async_op=True) for qs, _ in layout]
        gk, gv = torch.zeros_like(k_full), torch.zeros_like(v_full)
        gq_pending = []
        for (qs, ks), qc, (gc, work) in zip(layout, q_full, g_pending, strict=True):
            work.wait()
            with torch.enable_grad():
                qc, kc, vc = (x.detach().requires_grad_() for x in (qc, k_full[:, ks], v_full[:, ks]))
                oc = attn_fn(qc, kc, vc, cu_seqlens, max_seqlen, scale, causal)
                dq, dk, dv = torch.autograd.grad(oc, (qc, kc, vc), gc.reshape(oc.shape))
            gk[:, ks] += dk
            gv[:, ks] += dv
            gq_pending.append((qs, _a2a(dq.reshape(n, t_local, -1, d), sp.group, async_op=True)))
        gkv, kv_work = _a2a(
            torch.stack([gk, gv], dim=1).reshape(n, t_local, 2, hk, d), sp.group, async_op=True
        )
        grad_q = grad_out.new_empty(t_local, n, hq, d)
        for qs, (gq, work) in gq_pending:
            work.wait()
            grad_q[:, :, qs] = gq.transpose(0, 1)
        kv_work.wait()
        gkv = gkv.transpose(0, 1)  # (T/sp, n, 2, hk, d)
        grad_k = gkv[:, :, 0].reshape(t_local, n * hk, d)
        grad_v = gkv[:, :, 1].reshape(t_local, n * hk, d)
        return grad_q.view(t_local, n * hq, d), grad_k, grad_v, None, None, None, None, None, None
