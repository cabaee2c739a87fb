"""Cost balancing across DP ranks: move whole micro-batches so every rank's step costs about the same.

Costs (LLM tokens + encoder units^2 per item, a proxy for attention-dominated compute) are gathered,
every rank computes the same longest-processing-time assignment (each rank keeps its micro-batch
count), and micro-batches travel to their new rank in one all_to_all of bytes in the tensor encoding
of `omni_data.wire` (a JSON header and raw tensor bytes: bytes from a peer never run code).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from omni_data import wire
from omni_dist.packed import PackedBatch


def assign(costs: list[list[int]]) -> list[list[tuple[int, int]]]:
    """costs[rank][i] -> for each rank, the (source rank, index) pairs it runs; same count per rank."""
    world, per_rank = len(costs), len(costs[0])
    load = [0] * world
    out: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    order = sorted(
        ((c, r, i) for r, row in enumerate(costs) for i, c in enumerate(row)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    for c, r, i in order:
        # The least-loaded rank with room; ties go to the owner (no move) and then to the lowest rank.
        dest = min((d for d in range(world) if len(out[d]) < per_rank), key=lambda d: (load[d], d != r, d))
        out[dest].append((r, i))
        load[dest] += c
    return [sorted(x) for x in out]


def balance_step(
    batches: list[PackedBatch], group: dist.ProcessGroup | None, device: torch.device
) -> list[PackedBatch]:
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = torch.tensor([b.cost for b in batches], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    plan = assign([g.tolist() for g in gathered])
    outgoing = [wire.encode([batches[i] for src, i in plan[d] if src == rank]) for d in range(world)]
    send_sizes = torch.tensor([t.numel() for t in outgoing], dtype=torch.int64, device=device)
    recv_sizes = torch.empty_like(send_sizes)
    dist.all_to_all_single(recv_sizes, send_sizes, group=group)
    received = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8, device=device)
    dist.all_to_all_single(
        received, torch.cat(outgoing).to(device), recv_sizes.tolist(), send_sizes.tolist(), group=group
    )
    parts = received.cpu().split(recv_sizes.tolist())
    by_source = [wire.decode(p) for p in parts]
    # Restore plan order: the pairs for this rank are sorted by (source rank, index).
    cursor = [0] * world
    out = []
    for src, _ in plan[rank]:
        out.append(by_source[src][cursor[src]])
        cursor[src] += 1
    return out
