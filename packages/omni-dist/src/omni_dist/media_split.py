"""Encoder work shared by ranks instead of repeated on each.

EncoderRoute (`encoder_balance: sp`): the ranks of an SP group hold the same micro-batch and each keeps
one contiguous slice of its sequence. Instead of every rank encoding every media item and keeping the
features of its slice, each encodes a share of the items (balanced by cost: encoder units squared, as
attention grows) and the features travel by one all-to-all to the ranks whose slices hold their
placeholders; backward sends their gradients back the same way. Every rank computes the same routes
from the batch it holds, so nothing but features is exchanged.

WorldRoute (`encoder_balance: world`): the same over all ranks, whose micro-batches differ: the items'
metadata is gathered, inputs travel to the rank that encodes them, features to their slices.

    route = EncoderRoute.plan(media, sp_rank, sp_size, slice_length)
    feats = encode(route.mine or dummy)                # this rank's items, in route order
    rows, at = route.exchange(projected_feats, group)  # the features of this rank's slice, where they go
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
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
        share = _shares(media, size)
        positions = {m: b.item_positions() for m, b in media.items()}
        device = next(iter(media.values())).positions.device

        def rows_of(r: int) -> torch.Tensor:  # rank r's feature rows' positions, in its encoding order
            parts = [positions[m][i] for m, picked in share[r].items() for i in picked]
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

        mine = _select(media, share[rank])
        dest = rows_of(rank) // length
        send_order = torch.argsort(dest, stable=True)
        send_splits = torch.bincount(dest, minlength=size).tolist()
        recv = [p[p // length == rank] for p in (rows_of(r) for r in range(size))]
        return cls(mine, send_order, send_splits, [len(p) for p in recv], torch.cat(recv) - rank * length)

    @staticmethod
    def share(media: Mapping[str, MediaBatch], rank: int, size: int) -> dict[str, MediaBatch]:
        """The items `plan` gives this rank to encode, without the routes of their features."""
        return _select(media, _shares(media, size)[rank])

    def exchange(self, feats: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of this rank's slice, their positions in it) from this rank's `feats` (rows of `mine`
        in order; none when it encodes nothing)."""
        send = feats[self.send_order.to(feats.device)]
        return all_to_all_v(send, self.recv_splits, self.send_splits, group), self.recv_at.to(feats.device)


@dataclass
class WorldRoute:
    """Encoder work balanced over every rank of a group (`encoder_balance: world`): ranks with media-heavy
    micro-batches hand items to ranks with text-heavy ones.

    Each rank offers its SP share of its micro-batch's items (all of them without SP); the ranks learn
    every offer (one all_gather_object), assign the items by cost (each keeps its own while under the
    mean load, the rest go largest first to the least loaded), send the inputs by all-to-all, encode
    what they were given, and send the features by a differentiable all-to-all straight to the ranks
    whose slices hold their placeholders."""

    mine: dict[str, MediaBatch]  # the items this rank encodes (received or its own), by modality
    send_order: torch.Tensor  # feature rows of `mine`, ordered by the rank they go to
    send_splits: list[int]
    recv_splits: list[int]
    recv_at: torch.Tensor  # where the received rows go in this rank's slice

    @classmethod
    def plan(
        cls,
        media: Mapping[str, MediaBatch],
        group: ProcessGroup,
        slice_owners: list[int],
        length: int,
        device: torch.device,
    ) -> WorldRoute:
        """`media`: this rank's offer (its SP share); `slice_owners`: the group ranks holding the slices
        of this rank's sequence, in order; `length`: tokens per slice; `device`: where inputs travel."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        offers: list = [None] * size
        dist.all_gather_object(offers, _offer(media, slice_owners, length), group=group)
        items = [(o, j) for o in range(size) for j in range(len(offers[o]["items"]))]
        if not items:
            empty = torch.zeros(0, dtype=torch.long)
            return cls({}, empty, [0] * size, [0] * size, empty)
        owner = _keep_local_then_balance(items, [offers[o]["items"][j]["cost"] for o, j in items], size)
        shapes = {m: s for off in offers for m, s in off["shapes"].items()}

        # inputs: origin -> encoding rank, per modality and tensor key, in (origin, item) order
        given = [(o, j) for (o, j), e in zip(items, owner, strict=True) if e == rank]
        mine = {}
        for m in shapes:
            mine_m = [(o, j) for o, j in given if offers[o]["items"][j]["m"] == m]
            outgoing = [
                (o, j, e)
                for (o, j), e in zip(items, owner, strict=True)
                if o == rank and offers[o]["items"][j]["m"] == m
            ]
            tensors = {}
            for k, (trailing, dtype) in shapes[m].items():
                local = media[m].tensors[k].split(media[m].sizes[k]) if m in media else ()
                ours = offers[rank]["items"]
                send = [local[ours[j]["i"]] for _, j, e in sorted(outgoing, key=lambda x: x[2])]
                splits_out = [sum(ours[j]["sizes"][k] for _, j, e in outgoing if e == d) for d in range(size)]
                splits_in = [
                    sum(offers[o]["items"][j]["sizes"][k] for o, j in mine_m if o == s) for s in range(size)
                ]
                flat = (
                    torch.cat(send)
                    if send
                    else torch.zeros(
                        (0, *trailing), dtype=getattr(torch, dtype.split(".")[-1]), device=device
                    )
                )
                tensors[k] = all_to_all_v(flat, splits_in, splits_out, group)
            if mine_m:
                meta = [offers[o]["items"][j] for o, j in mine_m]
                mine[m] = MediaBatch(
                    tensors,
                    {k: [x["sizes"][k] for x in meta] for k in tensors},
                    torch.tensor([x["tokens"] for x in meta]),
                    torch.tensor([x["units"] for x in meta]),
                    torch.cat([torch.tensor(x["positions"], dtype=torch.long) for x in meta]),
                )

        # features: encoding rank -> the rank holding each placeholder's slice
        def rows_of(e: int) -> tuple[list[int], list[int]]:  # (destination rank, position) per row
            dests, positions = [], []
            for m in shapes:
                for (o, j), who in zip(items, owner, strict=True):
                    if who != e or offers[o]["items"][j]["m"] != m:
                        continue
                    for p in offers[o]["items"][j]["positions"]:
                        dests.append(offers[o]["owners"][p // offers[o]["length"]])
                        positions.append(p % offers[o]["length"])
            return dests, positions

        dest, _ = rows_of(rank)
        dest_t = torch.tensor(dest, dtype=torch.long)
        send_order = torch.argsort(dest_t, stable=True)
        send_splits = torch.bincount(dest_t, minlength=size).tolist()
        recv, recv_splits = [], []
        for e in range(size):
            d, p = rows_of(e)
            here = [q for q, x in zip(p, d, strict=True) if x == rank]
            recv += here
            recv_splits.append(len(here))
        return cls(mine, send_order, send_splits, recv_splits, torch.tensor(recv, dtype=torch.long))

    def exchange(self, feats: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of this rank's slice, their positions in it) from the features of `mine` in order."""
        send = feats[self.send_order.to(feats.device)]
        return all_to_all_v(send, self.recv_splits, self.send_splits, group), self.recv_at.to(feats.device)


def _shares(media: Mapping[str, MediaBatch], size: int) -> list[dict[str, list[int]]]:
    """Per rank of an SP group, per modality, the indices of the items it encodes (balanced by cost)."""
    items = [(m, i) for m, b in media.items() for i in range(b.num_items)]
    owner = assign([_cost(b, i) for b in media.values() for i in range(b.num_items)], size)
    return [
        {m: [i for (mm, i), o in zip(items, owner, strict=True) if mm == m and o == r] for m in media}
        for r in range(size)
    ]


def _select(media: Mapping[str, MediaBatch], picked: Mapping[str, list[int]]) -> dict[str, MediaBatch]:
    return {m: media[m].select(items) for m, items in picked.items() if items}


def _offer(media: Mapping[str, MediaBatch], owners: list[int], length: int) -> dict:
    """What a rank tells the others of its offered items: enough to route inputs and features."""
    return {
        "owners": owners,
        "length": length,
        "items": [
            {
                "m": m,
                "i": i,  # its index among the offer's items of modality m
                "sizes": {k: b.sizes[k][i] for k in b.tensors},
                "tokens": int(b.llm_tokens[i]),
                "units": int(b.encoder_units[i]) if b.encoder_units is not None else int(b.llm_tokens[i]),
                "cost": _cost(b, i),
                "positions": p.tolist(),
            }
            for m, b in media.items()
            for i, p in enumerate(b.item_positions())
        ],
        "shapes": {
            m: {k: (tuple(t.shape[1:]), str(t.dtype)) for k, t in b.tensors.items()} for m, b in media.items()
        },
    }


def _cost(batch: MediaBatch, i: int) -> float:
    """An item's encoder cost: its units squared (attention grows with them)."""
    return float(batch.encoder_units[i] if batch.encoder_units is not None else batch.llm_tokens[i]) ** 2


def _keep_local_then_balance(items: list[tuple[int, int]], costs: list[float], size: int) -> list[int]:
    """Each item's encoding rank: a rank keeps its own items (largest first) while under the mean
    load; the rest go, largest first, to the least loaded rank."""
    mean = sum(costs) / size
    loads, owner, rest = [0.0] * size, [-1] * len(items), []
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        origin = items[i][0]
        if loads[origin] + costs[i] <= mean or (loads[origin] == 0.0 and costs[i] >= mean):
            owner[i], loads[origin] = origin, loads[origin] + costs[i]
        else:
            rest.append(i)
    heap = [(load, r) for r, load in enumerate(loads)]
    heapq.heapify(heap)
    for i in rest:
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owner
