"""Unreadable data stops the run at once with one error naming the source, its paths and why; missing
shards are counted as shards (and by the samples index.parquet says they held); an epoch with no usable
sample is an error, not an endless loop; SP peers whose loaders diverge stop with the ranks named."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist

from omni_data.config import DataConfig
from omni_data.errors import DataUnreadable
from omni_data.loader import OmniLoader
from omni_data.peers import DataPeerMismatch
from omni_data.preflight import merge_reports, summary
from tests.harness import run_ranks
from tests.omni_data.fixtures import processor, write_wds


def _config(paths, **kw) -> DataConfig:
    kind = kw.pop("kind", "webdataset")
    return DataConfig.from_dict({"sources": [{"kind": kind, "paths": paths}], "max_tokens": 256, **kw})


@pytest.mark.parametrize("kind", ["webdataset", "jsonl", "parquet"])
def test_all_shards_missing_stops_at_once_naming_the_paths(tmp_path, kind):
    t0 = time.perf_counter()
    with pytest.raises(DataUnreadable) as e:
        OmniLoader(_config(f"{tmp_path}/nope/x-{{0..3}}.data", kind=kind), processor())
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "data.sources[0]" in msg and "none of its 4 shards can be read" in msg
    assert f"{tmp_path}/nope/x-0.data (No such file or directory)" in msg and "and 1 more" in msg


def test_half_the_shards_missing_trains_and_reports_them(tmp_path):
    shards = write_wds(str(tmp_path), [6, 7, 8, 9])
    gone = shards[1::2]
    # the preprocessing job's index: one row per sample, by shard name
    rows = [os.path.basename(s) for s, n in zip(shards, [6, 7, 8, 9], strict=True) for _ in range(n)]
    pq.write_table(pa.table({"shard": rows}), tmp_path / "index.parquet")
    for s in gone:
        os.remove(s)
    with pytest.raises(
        DataUnreadable, match=r"2 of its 4 shards cannot be read \(more than data.max_bad_shards=0.1"
    ):
        OmniLoader(_config(shards, epochs=1), processor())
    loader = OmniLoader(_config(shards, epochs=1, max_bad_shards=0.5), processor())
    ids = [i for step in loader for b in step.micro_batches for i in b.sample_ids]
    assert len(ids) == 6 + 8 and len(set(ids)) == len(ids)
    report = merge_reports([loader.report()])
    (source,) = report["sources"]
    assert sorted(source["bad_shards"]) == sorted(os.path.abspath(s) for s in gone)
    assert source["lost_samples"] == 7 + 9 and source["shards"] == 4
    assert "2 of 4 shards unreadable (~16 samples per index.parquet)" in summary(report)
    json.dumps(report)  # written as RUN_DIR/data_report.json


def test_broken_shards_count_as_shards_and_a_limit_stops_reading(tmp_path):
    good = write_wds(str(tmp_path / "good"), [20])[0]
    (tmp_path / "notatar.tar").write_bytes(b"garbage" * 100)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(good).read_bytes()[:4000])  # a member cut mid-way
    paths = [good, str(tmp_path / "notatar.tar"), str(truncated)]
    loader = OmniLoader(_config(paths, epochs=1, max_bad_shards=1.0, shuffle_shards=False), processor())
    ids = [i for step in loader for b in step.micro_batches for i in b.sample_ids]
    assert ids and loader.errors.total_skipped == 0  # whole-shard failures are not skipped samples
    (bad,) = loader.bad_shards()
    assert set(bad) == {str(tmp_path / "notatar.tar"), str(truncated)}
    assert bad[str(truncated)].split(":")[0] in ("shard_open", "shard_read")
    with pytest.raises(DataUnreadable, match=r"2 of its 3 shards cannot be read"):
        list(OmniLoader(_config(paths, epochs=1, max_bad_shards=0.5, shuffle_shards=False), processor()))


def test_an_epoch_without_one_usable_sample_is_an_error_not_a_loop(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text("{not json\n" * 20 + json.dumps({"id": "x"}) + "\n")  # nothing parses into a sample
    loader = OmniLoader(_config(str(path), kind="jsonl"), processor())  # epochs: None (until stopped)
    t0 = time.perf_counter()
    with pytest.raises(DataUnreadable, match=r"epoch 0 produced no usable sample.*bad_json=20"):
        next(iter(loader))
    assert time.perf_counter() - t0 < 30


def _peer_rank(shard_dir: str, desync: bool) -> str:
    # Two SP peers: one data stream, the same loader on both ranks; rank 1 may read another order.
    seed = 1 if desync and dist.get_rank() == 1 else 0
    cfg = _config(f"{shard_dir}/shard-*.tar", epochs=1, seed=seed, shuffle_buffer=4)
    loader = OmniLoader(cfg, processor(), peers=dist.group.WORLD)
    try:
        return str(sum(len(s.micro_batches) for s in loader))
    except DataPeerMismatch as e:
        return f"mismatch: {e}"


def test_sp_peers_that_diverge_stop_naming_the_ranks_and_samples(tmp_path):
    write_wds(str(tmp_path), [10, 10, 10])
    same = run_ranks(_peer_rank, 2, str(tmp_path), False)
    assert same[0] == same[1] and not same[0].startswith("mismatch")
    diverged = run_ranks(_peer_rank, 2, str(tmp_path), True)
    for text in diverged:
        assert text.startswith("mismatch: data loader step 1: ranks 0 and 1 must train on the same"), text
        assert "[s000" in text
