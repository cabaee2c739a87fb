"""Ranks that must train on the same micro-batches (the ranks of an SP group each run a loader over
the same stream) check it every step: one all_gather of an 8-byte digest of the step's sample ids.

Measured choice over one loader per group with a broadcast of its batches: the digest costs one tiny
collective per step, while a broadcast would move every micro-batch's media tensors to each peer.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from omni_dist.gather import all_gather_json
from omni_dist.packed import PackedBatch


class DataPeerMismatch(RuntimeError):
    """Peers that must hold the same micro-batches hold different ones (their loaders diverged)."""


def _ids(batches: list[PackedBatch]) -> list[list[str]]:
    return [["<padding>"] if b.is_padding else list(b.sample_ids) for b in batches]


def check_peers(
    batches: list[PackedBatch], group: dist.ProcessGroup, device: torch.device, step: int
) -> None:
    """Raise DataPeerMismatch on every peer unless all peers hold the same micro-batches."""
    ids = _ids(batches)
    digest = hashlib.blake2b(json.dumps(ids).encode(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if all(int(d) == int(mine) for d in every):
        return
    held = all_gather_json(ids, group, device)  # every peer got here: name what each one holds
    ranks = dist.get_process_group_ranks(group)
    first = next(i for i in range(world) if held[i] != held[0])
    raise DataPeerMismatch(
        f"data loader step {step}: ranks {ranks[0]} and {ranks[first]} must train on the same micro-batches "
        f"(they share a sequence-parallel group) but hold {_show(held[0])} and {_show(held[first])}: their "
        "loaders diverged (a read error on one of them?). Check that they read the same files."
    )


def _show(ids: list[list[str]]) -> str:
    flat = [i for mb in ids for i in mb]
    return "[" + ", ".join(flat[:6]) + (f", ... {len(flat)} in all" if len(flat) > 6 else "") + "]"
