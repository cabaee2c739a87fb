"""Every valid layout for 1, 2 and 4 ranks builds, and each named view holds exactly the right ranks.

The expected groups are computed here from rank coordinates (rank = (r * dp_shard + s) * sp + p, and
inside a replica ep groups are consecutive blocks of ep ranks), independently of how the mesh is built;
each 1-D view is also exercised with a real all-reduce.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from omni_dist import MESH_NAMES, ParallelConfigError, ParallelDims, ParallelMesh
from tests.harness import run_ranks


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_layouts(world: int) -> list[dict[str, int]]:
    out = []
    for r in _divisors(world):
        for p in _divisors(world // r):
            s = world // (r * p)
            out += [{"dp_replicate": r, "dp_shard": s, "sp": p, "ep": e} for e in _divisors(s * p)]
    return out


def expected_groups(world: int, rank: int, layout: dict[str, int]) -> dict[str, list[int]]:
    R, S, P, E = layout["dp_replicate"], layout["dp_shard"], layout["sp"], layout["ep"]
    block = S * P
    r, i = divmod(rank, block)
    s, p = divmod(i, P)
    base = r * block
    return {
        "dp_replicate": [x * block + i for x in range(R)],
        "dp_shard": [base + x * P + p for x in range(S)],
        "sp": [base + s * P + x for x in range(P)],
        "fsdp": [base + x for x in range(block)],
        "dp": [x * block + y * P + p for x in range(R) for y in range(S)],
        "loss": list(range(world)),
        "ep": [base + (i // E) * E + x for x in range(E)],
        "ep_fsdp": [base + x * E + i % E for x in range(block // E)],
    }


def _check_all_layouts(layouts: list[dict[str, int]]) -> int:
    world, rank = dist.get_world_size(), dist.get_rank()
    for layout in layouts:
        mesh = ParallelMesh.build(ParallelDims(world_size=world, **layout), device_type="cpu")
        want = expected_groups(world, rank, layout)
        for name, members in want.items():
            view = mesh[name]
            got = view.mesh.flatten().tolist()
            assert got == members, f"{layout} view {name}: got {got}, want {members}"
            assert view.get_local_rank() == members.index(rank)
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=view.get_group())
            assert t.item() == sum(members), f"{layout} view {name}: all-reduce gave {t.item()}"
        # 2-D views for FSDP2: (dp_replicate, fsdp) and (dp_replicate, ep_fsdp), one row per replica.
        R, block, E = layout["dp_replicate"], world // layout["dp_replicate"], layout["ep"]
        assert mesh["hsdp"].mesh_dim_names == ("dp_replicate", "fsdp")
        assert mesh["hsdp"].mesh.tolist() == [[x * block + y for y in range(block)] for x in range(R)]
        assert mesh["ep_hsdp"].mesh_dim_names == ("dp_replicate", "ep_fsdp")
        assert mesh["ep_hsdp"].mesh.tolist() == [
            [x * block + j * E + rank % E for j in range(block // E)] for x in range(R)
        ]
        assert mesh.data_parallel_mesh(replicate=True) is mesh["hsdp"]
        assert mesh.data_parallel_mesh(replicate=False) is mesh["fsdp"]
        assert mesh.dp_rank == want["dp"].index(rank) and mesh.sp_rank == want["sp"].index(rank)
        assert mesh.ep_rank == want["ep"].index(rank)
    # A layout for another world size fails before any collective, naming the fix.
    try:
        ParallelMesh.build(ParallelDims(world_size=2 * world), device_type="cpu")
    except ParallelConfigError as e:
        assert f"build ParallelDims with world_size={world}" in str(e)
    else:
        raise AssertionError("mismatched world size was accepted")
    try:
        mesh["tp"]
    except KeyError as e:
        assert "no mesh view named 'tp'" in str(e)
    else:
        raise AssertionError("unknown view name was accepted")
    dist.barrier()
    return len(layouts)


def test_layout_enumeration_covers_the_named_cases():
    four = valid_layouts(4)
    assert {"dp_replicate": 2, "dp_shard": 2, "sp": 1, "ep": 1} in four
    assert {"dp_replicate": 1, "dp_shard": 2, "sp": 2, "ep": 1} in four
    assert {"dp_replicate": 1, "dp_shard": 4, "sp": 1, "ep": 2} in four
    assert {"dp_replicate": 1, "dp_shard": 2, "sp": 2, "ep": 2} in four
    assert len(four) == 14 and len(valid_layouts(2)) == 5 and len(valid_layouts(1)) == 1
    assert set(expected_groups(4, 0, four[0])) | {"hsdp", "ep_hsdp"} == set(MESH_NAMES)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_valid_layout_builds_with_the_right_members(world):
    layouts = valid_layouts(world)
    assert run_ranks(_check_all_layouts, world, layouts) == [len(layouts)] * world
