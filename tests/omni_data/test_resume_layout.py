"""The data position survives a layout change: a loader state saved by 2 DP ranks resumes on 1 rank,
on 4 ranks, and on 2 SP peers of one DP rank; the remaining steps hold exactly the micro-batches the
uninterrupted run trains (nothing twice, nothing skipped), buffered samples included."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from omni_data.config import DataConfig
from omni_data.loader import DataResumeError, OmniLoader
from tests.harness import run_ranks
from tests.omni_data.fixtures import processor, write_jsonl, write_wds

STOP = 2  # steps trained before the save


def _config(root: str, **kw) -> DataConfig:
    base = {
        "sources": [
            {"kind": "webdataset", "paths": f"{root}/tars/shard-*.tar", "weight": 2},
            {"kind": "jsonl", "paths": f"{root}/one.jsonl"},  # one file, split across the readers
        ],
        "max_tokens": 160,
        "num_workers": 1,
        "shuffle_buffer": 4,
        "pack_buffer": 6,
        "epochs": 1,
        "seed": 5,
    }
    return DataConfig.from_dict({**base, **kw})


def _ids(step) -> list[list[str]]:
    return [sorted(b.sample_ids) for b in step.micro_batches if not b.is_padding]


def _saving_rank(root: str) -> dict:
    loader = OmniLoader(_config(root), processor(), dp_rank=dist.get_rank(), dp_size=2)
    steps, state = [], None
    for i, step in enumerate(loader):
        steps.append(_ids(step))
        if i + 1 == STOP:
            state = json.dumps(loader.state_dict())  # what the checkpoint keeps
    return {"steps": steps, "state": state}


def _resuming_rank(root: str, states: list[str], layout: str) -> list[list[list[str]]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    if layout == "sp":  # two SP peers of one data-parallel rank: the same micro-batches, checked
        loader = OmniLoader(_config(root), processor(), peers=dist.group.WORLD)
    else:
        loader = OmniLoader(_config(root), processor(), dp_rank=rank, dp_size=world)
    loader.load_state_dict({"ranks": [json.loads(s) for s in states]})
    return [_ids(step) for step in loader]


def _global(per_rank_steps: list[list[list[list[str]]]]) -> list[list[str]]:
    """Each step's micro-batches over all ranks, as a sorted list (placement on ranks may differ)."""
    n = max(len(s) for s in per_rank_steps)
    return [sorted(mb for steps in per_rank_steps if i < len(steps) for mb in steps[i]) for i in range(n)]


def test_a_position_saved_on_two_ranks_resumes_on_any_layout(tmp_path):
    write_wds(str(tmp_path / "tars"), [7, 12, 5], image_every=0)
    write_jsonl(str(tmp_path / "one.jsonl"), 30, start=1000, image_every=0)
    ref = run_ranks(_saving_rank, 2, str(tmp_path))
    full = _global([r["steps"] for r in ref])
    everything = sorted(i for step in full for mb in step for i in mb)
    assert len(everything) == len(set(everything)) == 7 + 12 + 5 + 30
    assert len(full) > STOP + 2
    states = [r["state"] for r in ref]
    for layout, world in (("dp1", 1), ("dp4", 4), ("sp", 2)):
        resumed = run_ranks(_resuming_rank, world, str(tmp_path), states, layout)
        per_rank = resumed[:1] if layout == "sp" else resumed
        if layout == "sp":
            assert resumed[0] == resumed[1]
        # the same micro-batches per step as the uninterrupted run, wherever they now run
        assert _global(per_rank) == full[STOP:], layout
        seen = [i for step in full[:STOP] + _global(per_rank) for mb in step for i in mb]
        assert sorted(seen) == everything, layout  # every sample of the epoch once: no gap, no repeat


def test_changing_loader_workers_mid_epoch_is_an_error_naming_the_options(tmp_path):
    write_wds(str(tmp_path / "tars"), [7, 12, 5], image_every=0)
    write_jsonl(str(tmp_path / "one.jsonl"), 30, start=1000, image_every=0)
    loader = OmniLoader(_config(str(tmp_path), num_workers=0), processor())
    next(iter(loader))
    state = json.loads(json.dumps(loader.state_dict()))
    other = OmniLoader(_config(str(tmp_path), num_workers=1), processor())
    with pytest.raises(
        DataResumeError, match=r"saved with data.num_workers=0 .* resume with data.num_workers=0"
    ):
        other.load_state_dict({"ranks": [state]})
