"""Sharing an SP group's encoder work: the assignment balances cost, every feature row reaches the rank
whose slice holds its placeholder, and a MediaBatch selects items exactly (one process, no collectives;
the exchange itself is checked by the SP parity tests in tests/omni_models/test_omni_parity.py)."""

from __future__ import annotations

import torch

from omni_dist.media_split import EncoderRoute, assign
from omni_dist.packed import MediaBatch


def _media(units: list[int], tokens: list[int], start: int = 3) -> MediaBatch:
    items = [{"x": torch.full((u, 2), float(i)), "grid": torch.tensor([[i, u]])} for i, u in enumerate(units)]
    batch = MediaBatch.of(items, tokens)
    batch.encoder_units = torch.tensor(units)
    positions, at = [], start
    for n in tokens:
        positions.append(torch.arange(at, at + n))
        at += n + 5  # text between the items
    batch.positions = torch.cat(positions)
    return batch


def test_assign_balances_by_cost_largest_first():
    assert assign([9.0, 1.0, 1.0, 1.0], 2) == [0, 1, 1, 1]
    assert assign([4.0, 3.0, 3.0, 2.0], 2) == [0, 1, 1, 0]
    assert assign([1.0], 4) == [0]  # three ranks encode nothing
    owner = assign([float(c) for c in range(1, 21)], 4)
    loads = [sum(c for c, o in zip(range(1, 21), owner, strict=True) if o == r) for r in range(4)]
    assert max(loads) <= 1.1 * sum(loads) / 4 and min(loads) >= 0.9 * sum(loads) / 4


def test_select_keeps_the_chosen_items_whole():
    batch = _media([4, 2, 6], [2, 1, 3])
    picked = batch.select([2, 0])
    assert picked.sizes == {"x": [6, 4], "grid": [1, 1]}
    assert picked.tensors["x"][:6].eq(2).all() and picked.tensors["x"][6:].eq(0).all()
    assert picked.llm_tokens.tolist() == [3, 2] and picked.encoder_units.tolist() == [6, 4]
    assert (
        picked.positions.tolist() == batch.item_positions()[2].tolist() + batch.item_positions()[0].tolist()
    )
    assert batch.select([]).num_items == 0


def test_routes_deliver_every_row_to_its_slice_once():
    media = {"image": _media([16, 4, 4], [4, 1, 1]), "video": _media([32, 8], [8, 2], start=40)}
    size, length = 4, 16  # positions 3..49 over 4 slices of 16
    routes = [EncoderRoute.plan(media, r, size, length) for r in range(size)]
    # what rank s sends to rank d is what d expects from s
    for s in range(size):
        for d in range(size):
            assert routes[s].send_splits[d] == routes[d].recv_splits[s]
    # each placeholder arrives once, at its place in the owning slice
    arrived = sorted(int(a) + r * length for r, route in enumerate(routes) for a in route.recv_at)
    every = sorted(int(p) for b in media.values() for p in b.positions)
    assert arrived == every
    # the largest item (video 0, 32 units) is encoded alone; every item is encoded exactly once
    encoded = [(m, int(g[0])) for route in routes for m, b in route.mine.items() for g in b.tensors["grid"]]
    assert sorted(encoded) == sorted((m, i) for m, b in media.items() for i in range(b.num_items))
    alone = next(
        route
        for route in routes
        if ("video", 0) in [(m, int(g[0])) for m, b in route.mine.items() for g in b.tensors["grid"]]
    )
    assert sum(b.num_items for b in alone.mine.values()) == 1


def test_world_balance_keeps_local_items_under_the_mean_and_hands_the_rest_over():
    from omni_dist.media_split import _keep_local_then_balance

    # rank 0 offers four items, rank 1 one small item, ranks 2 and 3 none (text-only micro-batches)
    items = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    costs = [40.0, 30.0, 20.0, 10.0, 5.0]
    owner = _keep_local_then_balance(items, costs, 4)
    assert owner[0] == 0 and owner[4] == 1  # under the mean load (26.25): kept where they are
    assert sorted(owner[1:4]) == [1, 2, 3]  # the rest go to the least loaded ranks, largest first
    assert owner[1] in (2, 3) and owner[2] in (2, 3)
