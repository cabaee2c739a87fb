"""ParallelDims arithmetic and its errors (no processes needed: it runs before any collective)."""

from __future__ import annotations

import pytest

from omni_dist import ParallelConfigError, ParallelDims


def test_dp_shard_is_inferred():
    d = ParallelDims(world_size=8, dp_replicate=2, sp=2)
    assert (d.dp_replicate, d.dp_shard, d.sp, d.ep) == (2, 2, 2, 1)
    assert d.dp == 4 and d.shard_group_size == 4 and d.ep_fsdp == 4


def test_ep_inside_replica():
    d = ParallelDims(world_size=8, dp_replicate=2, dp_shard=4, ep=2)
    assert d.ep_fsdp == 2 and d.ep_enabled and not d.sp_enabled


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"world_size": 4, "dp_shard": 3}, ["= 3", "world size is 4", "dp_shard=-1", "would be 4"]),
        ({"world_size": 4, "dp_replicate": 2, "dp_shard": 4}, ["= 8", "world size is 4", "would be 2"]),
        ({"world_size": 4, "sp": 3}, ["cannot infer dp_shard", "sp (3)", "divisors: [1, 2, 4]"]),
        ({"world_size": 6, "dp_replicate": 4, "dp_shard": 1}, ["must divide 6", "[1, 2, 3, 6]"]),
        ({"world_size": 4, "ep": 3}, ["ep (3) must divide dp_shard x sp = 4", "[1, 2, 4]"]),
        ({"world_size": 4, "dp_replicate": 2, "ep": 4}, ["ep (4) must divide dp_shard x sp = 2"]),
        ({"world_size": 4, "sp": 0}, ["parallel.sp must be a positive integer"]),
        ({"world_size": 4, "dp_shard": -2}, ["parallel.dp_shard must be a positive integer or -1"]),
        ({"world_size": 0}, ["world_size must be a positive integer"]),
    ],
)
def test_invalid_layouts_say_what_to_change(kwargs, needles):
    with pytest.raises(ParallelConfigError) as info:
        ParallelDims(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_model_shape_checks():
    d = ParallelDims(world_size=4, dp_shard=1, sp=4)
    d.check_model(num_attention_heads=8, num_key_value_heads=2, num_experts=None)
    with pytest.raises(
        ParallelConfigError, match=r"sp \(4\) must divide the number of attention heads \(6\)"
    ):
        d.check_model(num_attention_heads=6)
    with pytest.raises(ParallelConfigError, match="key/value heads"):
        d.check_model(num_attention_heads=12, num_key_value_heads=3)
    e = ParallelDims(world_size=4, ep=4)
    with pytest.raises(
        ParallelConfigError, match=r"parallel\.ep=4 must divide the model.s experts \(6\).*\[1, 2\]"
    ):
        e.check_model(num_experts=6)
    e.check_model(num_experts=None)  # unknown: not checked
    with pytest.raises(ParallelConfigError, match=r"parallel\.ep=4 must divide the model.s experts \(none\)"):
        e.check_model(num_experts=0)  # a dense model
    with pytest.raises(
        ParallelConfigError, match=r"parallel\.ep_async=2 overlaps the EP dispatch, but parallel\.ep=1"
    ):
        d.check_model(ep_async=2)
    e.check_model(num_experts=8, ep_async=2)
