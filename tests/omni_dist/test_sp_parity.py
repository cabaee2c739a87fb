"""Ulysses SP (sync and async), alone and with FSDP2, trains the same model as one process."""

from __future__ import annotations

import pytest

from tests.harness import run_ranks
from tests.omni_dist.tiny import assert_matches, packed_config, train_single_packed, train_sp


@pytest.fixture(scope="module")
def reference():
    return train_single_packed(packed_config())


def _sp_runs(cases: dict[str, tuple[dict, int]]) -> dict:
    config = packed_config()
    return {name: train_sp(config, dims, chunks) for name, (dims, chunks) in cases.items()}


def test_sp2_sync_and_async_match_single_process(reference):
    cases = {"sp2": ({"sp": 2}, 1), "sp2_async": ({"sp": 2}, 2)}
    out = run_ranks(_sp_runs, 2, cases)
    for name in cases:
        assert_matches(reference, out[0][name], name)
        assert out[1][name]["loss"] == out[0][name]["loss"]
    assert reference["loss"][-1] < reference["loss"][0]


def test_sp2_with_fsdp2_on_four_ranks_matches_single_process(reference):
    cases = {
        "dp_shard2_sp2": ({"dp_shard": 2, "sp": 2}, 1),
        "dp_shard2_sp2_async": ({"dp_shard": 2, "sp": 2}, 2),
    }
    out = run_ranks(_sp_runs, 4, cases)
    for name in cases:
        assert_matches(reference, out[0][name], name)
