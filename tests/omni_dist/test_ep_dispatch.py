"""Dispatch/combine alone: unequal token counts per rank (fewer tokens than chunks on one), sync,
chunked and padded, against the same routing computed in one process (outputs and gradients).
Both checks run in one spawn (fixture `ranks`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from omni_dist import ParallelConfigError, ParallelDims, ParallelMesh
from omni_dist.expert_padded import moe_padded_dispatch
from omni_dist.expert_parallel import ExpertParallel, moe_dispatch_combine
from tests.harness import run_checks

E, K, H = 4, 2, 3
TOKENS = [5, 2]  # per rank: rank 1 has fewer tokens than chunks


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS[rank], H, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(TOKENS[rank])])
    w = torch.rand(TOKENS[rank], K, generator=g, dtype=torch.float64)
    return x, idx, w


def _weights() -> torch.Tensor:
    return torch.randn(E, H, H, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _reference(rank: int):
    x, idx, w = _inputs(rank)
    x.requires_grad_()
    w.requires_grad_()
    weights = _weights().requires_grad_()
    out = sum(w[:, k, None] * torch.einsum("th,tgh->tg", x, weights[idx[:, k]]) for k in range(K))
    out.sum().backward()
    return out.detach(), x.grad, weights.grad, w.grad


def _ep(chunks: int, dispatch: str = "exact") -> dict:
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), ep=2), device_type="cpu")
    rank = mesh.ep_rank
    ep = ExpertParallel(mesh["ep"].get_group(), 2, rank, E, overlap_chunks=chunks, dispatch=dispatch)
    full = _weights()
    local = full[rank * 2 : (rank + 1) * 2].clone().requires_grad_()

    def experts(rows, counts):
        outs, start = [], 0
        for e, n in enumerate(counts):
            outs.append(rows[start : start + n] @ local[e].T)
            start += n
        return torch.cat(outs)

    def padded(x, local_index, weights):  # the same experts on every gathered token, weighted
        return sum((weights * (local_index == e)).sum(-1, keepdim=True) * (x @ local[e].T) for e in range(2))

    x, idx, w = _inputs(dist.get_rank())
    x.requires_grad_()
    w.requires_grad_()
    if dispatch == "padded":
        out = moe_padded_dispatch(x, idx, w, padded, ep, bound=max(TOKENS) + 1)
    else:
        out = moe_dispatch_combine(x, idx, w, experts, ep)
    out.sum().backward()
    grads = [torch.zeros_like(full) for _ in range(2)]
    dist.all_gather(grads, torch.cat([torch.zeros(rank * 2, H, H, dtype=full.dtype), local.grad,
                                      torch.zeros((1 - rank) * 2, H, H, dtype=full.dtype)]))  # fmt: skip
    return {"out": out.detach(), "x_grad": x.grad, "w_grad": sum(grads), "route_grad": w.grad}


def _padded_errors() -> dict[str, str]:
    errors, rank = {}, dist.get_rank()
    try:  # both ranks have more tokens than the bound: each fails before any collective
        ep = ExpertParallel(dist.group.WORLD, 2, rank, E, dispatch="padded")
        moe_padded_dispatch(*_inputs(rank), lambda *a: None, ep, bound=1)
    except RuntimeError as e:
        errors["bound"] = str(e)
    try:
        ExpertParallel(dist.group.WORLD, 2, rank, E, overlap_chunks=2, dispatch="padded")
    except ParallelConfigError as e:
        errors["chunks"] = str(e)
    return errors


def _both() -> dict:
    runs = {chunks: _ep(chunks) for chunks in (1, 4)} | {"padded": _ep(1, "padded")}
    return {"runs": runs, "errors": _padded_errors()}


@pytest.fixture(scope="module")
def ranks():
    return run_checks(2, {"both": (_both, ()), "backward_trace": (_backward_trace, ())})


def test_dispatch_combine_matches_local_routing_with_unequal_tokens(ranks):
    results = ranks["both"]
    w_grad_ref = sum(_reference(r)[2] for r in range(2))
    for rank, both in enumerate(results):
        out_ref, x_grad_ref, _, route_grad_ref = _reference(rank)
        for chunks, got in both["runs"].items():
            torch.testing.assert_close(got["out"], out_ref, msg=f"rank {rank} chunks {chunks}")
            torch.testing.assert_close(got["x_grad"], x_grad_ref, msg=f"rank {rank} chunks {chunks}")
            torch.testing.assert_close(got["w_grad"], w_grad_ref, msg=f"rank {rank} chunks {chunks}")
            torch.testing.assert_close(got["route_grad"], route_grad_ref, msg=f"rank {rank} chunks {chunks}")
        bound_error = both["errors"]["bound"]
        assert (
            f"got {TOKENS[rank]} tokens on this rank, more than the padded EP dispatch's bound of 1"
            in bound_error
        )
        assert "the padded dispatch does not chunk: set ep_async=1" in both["errors"]["chunks"]


class _Traced:
    """A c10d Work whose wait is logged."""

    def __init__(self, work, log: list, n: int):
        self.work, self.log, self.n = work, log, n

    def wait(self):
        self.log.append(("wait", self.n))
        return self.work.wait()


def _backward_trace() -> list:
    from omni_dist import expert_parallel

    real, log = dist.all_to_all_single, []

    def traced(*args, async_op=False, **kwargs):
        work = real(*args, async_op=async_op, **kwargs)
        if not async_op:
            log.append(("sync", None))
            return work
        log.append(("issue", len(log)))
        return _Traced(work, log, log[-1][1])

    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), ep=2), device_type="cpu")
    ep = ExpertParallel(mesh["ep"].get_group(), 2, mesh.ep_rank, E, overlap_chunks=4)
    local = _weights()[mesh.ep_rank * 2 : (mesh.ep_rank + 1) * 2].clone().requires_grad_()
    x, idx, w = _inputs(dist.get_rank())
    expert_parallel.dist.all_to_all_single = traced
    try:
        out = moe_dispatch_combine(x.requires_grad_(), idx, w, lambda rows, counts: rows @ local[0].T, ep)
        log.clear()
        out.sum().backward()
    finally:
        expert_parallel.dist.all_to_all_single = real
    return log


def test_chunked_backward_keeps_several_gradient_exchanges_in_flight(ranks):
    for log in ranks["backward_trace"]:
        assert not [e for e in log if e[0] == "sync"], log  # every backward exchange is async
        issued = [n for kind, n in log if kind == "issue"]
        assert len(issued) == 8 and sorted(n for kind, n in log if kind == "wait") == sorted(issued)
        in_flight, most = 0, 0
        for kind, _ in log:
            in_flight += 1 if kind == "issue" else -1
            most = max(most, in_flight)
        assert most >= 4, log  # the 4 combine gradients go out before the first one is waited for
