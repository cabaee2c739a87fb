"""Encoder work shared by the ranks of an SP group.

The ranks of an SP group hold the same micro-batch and each keeps one contiguous slice of its sequence.
Instead of every rank encoding every media item and keeping the features of its slice, each rank
encodes a share of the items (balanced by cost: encoder units squared, as attention grows) and the
features travel by one all-to-all to the ranks whose slice holds their placeholders; backward sends
their gradients back the same way. Every rank computes the same assignment from the batch it holds,
so no metadata is exchanged.

    route = EncoderRoute.plan(media, sp_rank, sp_size, slice_length)
    feats = encode(route.mine)                      # this rank's items, in route order
    rows, at = route.exchange(projected_feats, group)  # the features of this rank's slice, where they go
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from omni_dist.expert_parallel import all_to_all_v
from omni_dist.packed import MediaBatch


def assign(costs: Sequence[float], ranks: int) -> list[int]:
    """Each item's rank: the largest first, each to the least loaded rank (ties: the lowest rank)."""
    loads = [(0.0, r) for r in range(ranks)]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owner


@dataclass
class EncoderRoute:
    mine: dict[str, MediaBatch]  # the items this rank encodes, by modality (empty: none)
    send_order: torch.Tensor  # this rank's feature rows, ordered by the rank they go to
    send_splits: list[int]
    recv_splits: list[int]
    recv_at: torch.Tensor  # where the received rows go in this rank's slice

    @classmethod
    def plan(cls, media: Mapping[str, MediaBatch], rank: int, size: int, length: int) -> EncoderRoute:
        """`media`: one encoder's modalities in the micro-batch; `length`: tokens per SP slice."""
        items = [(m, i) for m, b in media.items() for i in range(b.num_items)]
        costs = [
            float(b.encoder_units[i] if b.encoder_units is not None else b.llm_tokens[i]) ** 2
            for m, b in media.items()
            for i in range(b.num_items)
        ]
        owner = assign(costs, size)
        share = [
            {m: [i for (mm, i), o in zip(items, owner, strict=True) if mm == m and o == r] for m in media}
            for r in range(size)
        ]
        positions = {m: b.item_positions() for m, b in media.items()}
        device = next(iter(media.values())).positions.device

        def rows_of(r: int) -> torch.Tensor:  # rank r's feature rows' positions, in its encoding order
            parts = [positions[m][i] for m, picked in share[r].items() for i in picked]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

        mine = {m: media[m].select(picked) for m, picked in share[rank].items() if picked}
        dest = rows_of(rank) // length
        send_order = torch.argsort(dest, stable=True)
        send_splits = torch.bincount(dest, minlength=size).tolist()
        recv = [p[p // length == rank] for p in (rows_of(r) for r in range(size))]
        return cls(mine, send_order, send_splits, [len(p) for p in recv], torch.cat(recv) - rank * length)

    def exchange(self, feats: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of this rank's slice, their positions in it) from this rank's `feats` (rows of `mine`
        in order; none when it encodes nothing)."""
        send = feats[self.send_order.to(feats.device)]
        return all_to_all_v(send, self.recv_splits, self.send_splits, group), self.recv_at.to(feats.device)
