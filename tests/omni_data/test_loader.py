"""The distributed loader: disjoint coverage, equal steps, exact resume, cost balancing, collective abort.

Ranks are real processes joined by gloo, each with real loader worker processes.
"""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from omni_data.config import DataConfig, DataConfigError
from omni_data.errors import DataErrorRateExceeded
from omni_data.loader import OmniLoader
from tests.harness import run_ranks
from tests.omni_data.fixtures import processor, write_wds

UNEQUAL = [23, 5, 17, 9, 30, 2, 11]  # 97 samples in 7 shards for 4 readers


def _config(shard_dir: str, **kw) -> DataConfig:
    base = {
        "sources": [{"kind": "webdataset", "paths": f"{shard_dir}/shard-*.tar"}],
        "max_tokens": 192,
        "max_media_items": 2,
        "micro_batches_per_step": 2,
        "num_workers": 2,
        "shuffle_buffer": 8,
        "pack_buffer": 12,
        "epochs": 2,
        "seed": 3,
    }
    return DataConfig.from_dict({**base, **kw})


def _loader(shard_dir: str, **kw) -> OmniLoader:
    return OmniLoader(
        _config(shard_dir, **kw), processor(), dp_rank=dist.get_rank(), dp_size=dist.get_world_size()
    )


def _record(step) -> dict:
    return {
        "epoch": step.epoch,
        "ids": [b.sample_ids for b in step.micro_batches],
        "padding": [b.is_padding for b in step.micro_batches],
        "cost": sum(b.cost for b in step.micro_batches),
        "within_budget": all(
            b.num_tokens <= 192
            and b.input_ids.shape[1] <= 192
            and sum(m.num_items for m in b.media.values()) <= 2
            for b in step.micro_batches
        ),
    }


def _coverage_rank(shard_dir: str) -> dict:
    plain = [_record(s) for s in _loader(shard_dir)]
    balanced = [_record(s) for s in _loader(shard_dir, balance=True)]
    return {"plain": plain, "balanced": balanced}


def _ids_by_epoch(per_rank: list[list[dict]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for steps in per_rank:
        for s in steps:
            out.setdefault(s["epoch"], []).extend(i for mb in s["ids"] for i in mb)
    return out


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch_with_equal_steps(tmp_path):
    write_wds(str(tmp_path), UNEQUAL)
    everything = sorted(f"s{i:05d}" for i in range(sum(UNEQUAL)))
    results = run_ranks(_coverage_rank, 2, str(tmp_path))
    for mode in ("plain", "balanced"):
        per_rank = [r[mode] for r in results]
        assert len(per_rank[0]) == len(per_rank[1]) > 0, mode
        assert all(len(s["ids"]) == 2 and s["within_budget"] for steps in per_rank for s in steps)
        assert [s["epoch"] for s in per_rank[0]] == [s["epoch"] for s in per_rank[1]]
        by_epoch = _ids_by_epoch(per_rank)
        assert sorted(by_epoch) == [0, 1]
        for ids in by_epoch.values():
            assert sorted(ids) == everything, mode  # each sample exactly once per epoch
    plain = [r["plain"] for r in results]
    assert any(any(s["padding"]) for steps in plain for s in steps)  # unequal shards needed filler
    first_epoch = [i for s in plain[0] if s["epoch"] == 0 for mb in s["ids"] for i in mb]
    second_epoch = [i for s in plain[0] if s["epoch"] == 1 for mb in s["ids"] for i in mb]
    assert first_epoch != second_epoch  # reshuffled per epoch
    # Balancing moves whole micro-batches within a step and evens out the per-rank cost.
    balanced = [r["balanced"] for r in results]
    for step in range(len(plain[0])):
        moved = sorted(i for r in balanced for mb in r[step]["ids"] for i in mb)
        assert moved == sorted(i for r in plain for mb in r[step]["ids"] for i in mb)
    # One process reading both streams sees each step's global batch exactly.
    # Its workers started by a forkserver (data.worker_start) read the same stream as forked ones.
    expected = [sorted(i for r in plain for mb in r[k]["ids"] for i in mb) for k in range(len(plain[0]))]
    for start in ("fork", "forkserver"):
        single = OmniLoader(_config(str(tmp_path), streams=2, worker_start=start), processor())
        steps = [sorted(i for b in step.micro_batches for i in b.sample_ids) for step in single]
        assert steps == expected, start
    spread = lambda runs: sum(abs(runs[0][k]["cost"] - runs[1][k]["cost"]) for k in range(len(runs[0])))  # noqa: E731
    assert spread(balanced) < spread(plain)


def test_an_unknown_worker_start_is_named(tmp_path):
    with pytest.raises(DataConfigError, match=r"data\.worker_start must be 'fork', 'forkserver' or 'spawn'"):
        _config(str(tmp_path), worker_start="thread")


def _reference_rank(shard_dir: str) -> dict:
    loader = _loader(shard_dir)
    states, steps = [json.dumps(loader.state_dict())], []
    for step in loader:
        steps.append(_record(step))
        states.append(json.dumps(loader.state_dict()))  # JSON: what a checkpoint keeps
    return {"steps": steps, "states": states}


def _resume_rank(
    shard_dir: str, states_per_rank: list[list[str]], points: list[int]
) -> dict[int, list[dict]]:
    out = {}
    for k, state in zip(points, states_per_rank[dist.get_rank()], strict=True):
        loader = _loader(shard_dir)
        loader.load_state_dict(json.loads(state))
        out[k] = [_record(s) for s in loader]
    return out


def _buffered(state: str) -> int:
    workers = json.loads(state)["streams"][0]["loader"]["_snapshot"]["_worker_snapshots"].values()
    return sum(len(w["dataset_state"]["pack"]) + len(w["dataset_state"]["shuffle"]) for w in workers)


def test_resume_in_new_processes_continues_the_identical_stream(tmp_path):
    write_wds(str(tmp_path), UNEQUAL)
    ref = run_ranks(_reference_rank, 2, str(tmp_path))
    n = len(ref[0]["steps"])
    epoch0 = sum(s["epoch"] == 0 for s in ref[0]["steps"])
    # Early, mid-buffer, the last step of epoch 0 (one rank already padding) and mid epoch 1.
    points = sorted({1, epoch0 // 2, epoch0 - 1, epoch0 + 2})
    assert all(0 < k < n for k in points)
    assert all(_buffered(ref[r]["states"][k]) > 0 for r in range(2) for k in points[:2])
    states = [[r["states"][k] for k in points] for r in ref]
    resumed = run_ranks(_resume_rank, 2, str(tmp_path), states, points)
    for r in range(2):
        for k in points:
            assert resumed[r][k] == ref[r]["steps"][k:], (r, k)


def _abort_rank(bad: str, good: str) -> str:
    cfg = {
        "sources": [{"kind": "webdataset", "paths": [bad, good]}],
        "shuffle_shards": False,  # rank 0 reads the bad shard, rank 1 the good one
        "num_workers": 0,
        "max_error_rate": 0.1,
        "error_min_samples": 5,
    }
    try:
        list(_loader("unused", **cfg))
    except DataErrorRateExceeded as e:
        return str(e)
    return "no error"


def test_error_rate_on_one_rank_stops_every_rank(tmp_path):
    good = write_wds(str(tmp_path / "good"), [40])[0]
    bad = tmp_path / "bad.tar"
    import webdataset as wds

    with wds.TarWriter(str(bad)) as w:
        for i in range(20):
            w.write({"__key__": f"b{i}", "json": b"{broken"})
    msgs = run_ranks(_abort_rank, 2, str(bad), good)
    assert "5 of 5 samples were unusable" in msgs[0] and "bad_json=5" in msgs[0]
    assert "another data-parallel rank" in msgs[1]
