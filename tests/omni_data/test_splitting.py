"""Record-level splitting: one file read by many readers in equal, disjoint shares; resume by seeking.

Real files: one JSONL, one Parquet with many row groups and one with a single row group, one tar.
In process: the split arithmetic, cuts at every position, every piece of a plan read back. Across
processes (gloo ranks x loader workers): every reader's share and an exact resume mid-piece.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from omni_data.config import DataConfig
from omni_data.dataset import StreamingDataset
from omni_data.loader import OmniLoader
from omni_data.sources import JsonlSource, ParquetSource, WebDatasetSource
from omni_data.splits import Piece, cut_points, layout, plan_epoch, probe, read_piece
from tests.harness import run_ranks
from tests.omni_data.fixtures import processor, write_jsonl, write_parquet, write_wds

N = 1000
FORMATS = ("jsonl", "parquet", "parquet1", "tar")


def _files(root: str, n: int = N) -> dict[str, tuple[str, str]]:
    """kind and path of one file per format; format k holds the sample ids s{k}0000... (`_everything`)."""
    os.makedirs(root, exist_ok=True)
    start = {name: k * 10000 for k, name in enumerate(FORMATS)}
    return {
        "jsonl": ("jsonl", write_jsonl(f"{root}/one.jsonl", n, start=start["jsonl"])),
        "parquet": (
            "parquet",
            write_parquet(f"{root}/groups.parquet", n, start=start["parquet"], row_group_size=16),
        ),
        "parquet1": ("parquet", write_parquet(f"{root}/single.parquet", n, start=start["parquet1"])),
        "tar": ("webdataset", write_wds(f"{root}/tar", [n], start=start["tar"], image_every=5)[0]),
    }


def _everything(name: str, n: int = N) -> list[str]:
    first = FORMATS.index(name) * 10000
    return [f"s{i:05d}" for i in range(first, first + n)]


def _format(sample_id: str) -> str:
    return FORMATS[int(sample_id[1:]) // 10000]


def _source(kind: str, path: str):
    return {"jsonl": JsonlSource, "parquet": ParquetSource, "webdataset": WebDatasetSource}[kind]("s", path)


def _ids(records) -> list[str]:
    return [r.sample.id for r in records]


# -- arithmetic -----------------------------------------------------------------------------------


def test_layout_partitions_every_position_once_in_equal_spans():
    sizes = [10, 0, 7, 3, 41, 1]
    shards = [f"f{i}" for i in range(len(sizes))]
    for readers in (1, 2, 3, 4, 7, 62, 70):
        plan = layout(shards, sizes, readers)
        owner: dict[tuple[str, int], int] = {}
        for r, pieces in enumerate(plan):
            for p in pieces:
                assert 0 <= p.start < p.end <= sizes[shards.index(p.shard)]
                for pos in range(p.start, p.end):
                    assert (p.shard, pos) not in owner
                    owner[(p.shard, pos)] = r
        assert len(owner) == sum(sizes)
        shares = [sum(p.end - p.start for p in pieces) for pieces in plan]
        assert max(shares) - min(shares) <= 1, (readers, shares)
        # A reader's pieces follow the shard order: it reads one contiguous span of the whole.
        flat = [(shards.index(p.shard), p.start) for pieces in plan for p in pieces]
        assert flat == sorted(flat)
    assert cut_points(10, 4) == [0, 2, 5, 7, 10]
    # Shards of unknown size are dealt whole, round robin: all unknown is the old shards[r::R].
    assert layout(["a", "b", "c"], [None, None, None], 2) == [
        [Piece("a", 0, None), Piece("c", 0, None)],
        [Piece("b", 0, None)],
    ]
    mixed = layout(["a", "b", "c"], [4, None, 4], 2)
    assert mixed == [[Piece("a", 0, 4), Piece("b", 0, None)], [Piece("c", 0, 4)]]
    # The epoch's shard order is a seeded shuffle: the same everywhere, another next epoch.
    kw = {"seed": 1, "source_index": 0}
    names = [f"f{i}" for i in range(20)]
    a = plan_epoch(names, [5] * 20, 3, epoch=0, **kw)
    assert a == plan_epoch(names, [5] * 20, 3, epoch=0, **kw) != plan_epoch(names, [5] * 20, 3, epoch=1, **kw)
    assert plan_epoch(names, [5] * 20, 3, epoch=0, shuffle=False, **kw) == layout(names, [5] * 20, 3)


def test_any_cut_point_partitions_a_jsonl_file_by_line_start(tmp_path):
    path = str(tmp_path / "small.jsonl")
    lines = [
        json.dumps({"id": f"x{i}", "messages": [{"role": "user", "content": "w" * (i % 5)}]})
        for i in range(9)
    ]
    lines.insert(4, "{not json")  # a bad line is a record too (counted, never lost or doubled)
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "small.jsonl").write_bytes(data)
    src = JsonlSource("j", path)
    size = src.size(path)
    full = [(r.index, r.key, r.end, r.error is None) for r in src.read(path)]
    starts = [0, *(i + 1 for i, b in enumerate(data[:-1]) if b == ord("\n"))]
    assert [f[0] for f in full] == starts and size == len(data)
    assert full[0][1] == "small.jsonl@0" and full[4][3] is False
    for cut in range(size + 1):  # every byte: a line start, inside a line, exactly on a "\n"
        for cut2 in (cut, min(size, cut + 1), min(size, cut + 37), size):
            parts = [Piece(path, 0, cut), Piece(path, cut, cut2), Piece(path, cut2, size)]
            got = [(r.index, r.key, r.end, r.error is None) for p in parts for r in read_piece(src, p)]
            assert got == full, (cut, cut2)
    # A resume at a record's `end` continues with the next one (one seek, nothing re-read).
    for i, (_, _, end, _) in enumerate(full):
        assert [r.index for r in src.read(path, end)] == starts[i + 1 :]


def test_any_cut_point_partitions_parquet_rows_and_tar_samples(tmp_path):
    files = _files(str(tmp_path), n=23)
    for name in ("parquet", "parquet1", "tar"):
        kind, path = files[name]
        src = _source(kind, path)
        full = _ids(src.read(path))
        assert len(full) == src.size(path) == 23
        for a in range(24):
            for b in (a, min(a + 1, 23), min(a + 5, 23), 23):
                got = _ids(src.read(path, 0, a)) + _ids(src.read(path, a, b)) + _ids(src.read(path, b))
                assert got == full, (name, a, b)


def test_every_piece_of_a_plan_read_back_covers_the_file_once_in_balance(tmp_path):
    files = _files(str(tmp_path))
    for name, (kind, path) in files.items():
        everything = _everything(name)
        src = _source(kind, path)
        for readers in (2, 4):
            sizes = probe(src, [path], readers)
            assert sizes[0] is not None, name  # a single file is always sized
            plan = plan_epoch([path], sizes, readers, seed=0, epoch=0, source_index=0)
            per_reader = [[i for p in pieces for i in _ids(read_piece(src, p))] for pieces in plan]
            assert sorted(i for ids in per_reader for i in ids) == everything, (name, readers)
            counts = [len(ids) for ids in per_reader]
            if kind == "jsonl":  # balanced by bytes
                assert max(counts) <= 1.05 * min(counts), (name, readers, counts)
            else:
                assert max(counts) - min(counts) <= 1, (name, readers, counts)
    # A tar source with enough shards is not scanned: its shards go round whole.
    tars = write_wds(str(tmp_path / "many"), [3, 3, 3, 3])
    assert probe(WebDatasetSource("w", tars), tars, 4) == [None] * 4
    assert probe(WebDatasetSource("w", tars), tars, 5) == [3] * 4


# -- across ranks and loader workers ------------------------------------------------------------------


def _identity(x):
    return x


def _config(files: dict[str, tuple[str, str]], **kw) -> DataConfig:
    base = {
        "sources": [{"kind": kind, "paths": path, "name": name} for name, (kind, path) in files.items()],
        "max_tokens": 192,
        "max_media_items": 2,
        "micro_batches_per_step": 2,
        "shuffle_buffer": 8,
        "pack_buffer": 12,
        "epochs": 1,
        "seed": 3,
    }
    return DataConfig.from_dict({**base, **kw})


def _readers_rank(files: dict[str, tuple[str, str]]) -> dict:
    """Per num_workers, the ids each reader (slot = rank x worker) produced in one epoch of a mix of
    the four files; then the rank's loader end to end."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {}
    for workers in (0, 2):  # 2 and 4 readers
        ds = StreamingDataset(_config(files, num_workers=workers), processor(), dp_rank=rank, dp_size=world)
        loader = StatefulDataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_identity)
        slots: dict[int, list[str]] = {}
        for item in loader:
            if item.batch is not None:
                slots.setdefault(item.slot, []).extend(item.batch.sample_ids)
        out[workers] = slots
    loader = OmniLoader(_config(files, num_workers=0), processor(), dp_rank=rank, dp_size=world)
    out["loader"] = [[i for b in step.micro_batches for i in b.sample_ids] for step in loader]
    return out


def test_one_file_is_shared_by_every_reader_equally_and_disjointly(tmp_path):
    files = _files(str(tmp_path))
    results = run_ranks(_readers_rank, 2, files)
    for workers, readers in ((0, 2), (2, 4)):
        slots: dict[int, list[str]] = {}
        for r in results:
            assert not set(slots) & set(r[workers])
            slots.update(r[workers])
        assert sorted(slots) == list(range(readers)), workers
        for name in FORMATS:
            per_reader = [[i for i in ids if _format(i) == name] for ids in slots.values()]
            assert sorted(i for ids in per_reader for i in ids) == _everything(name), (name, readers)
            counts = [len(ids) for ids in per_reader]
            assert min(counts) > 0 and max(counts) <= 1.05 * min(counts), (name, readers, counts)
    steps = [r["loader"] for r in results]
    assert len(steps[0]) == len(steps[1])  # equal steps (filler where a rank ran out first)
    ids = [i for rank in steps for step in rank for i in step]
    assert sorted(ids) == sorted(i for name in FORMATS for i in _everything(name))
    assert not [k for k, c in Counter(ids).items() if c > 1]
    per_rank = [sum(len(s) for s in rank) for rank in steps]
    assert max(per_rank) <= 1.05 * min(per_rank), per_rank


# -- exact resume mid-piece -----------------------------------------------------------------------


def _record(step) -> dict:
    return {
        "epoch": step.epoch,
        "ids": [b.sample_ids for b in step.micro_batches],
        "padding": [b.is_padding for b in step.micro_batches],
        "tokens": [b.input_ids.tolist() for b in step.micro_batches],
    }


def _loader(files: dict[str, tuple[str, str]]) -> OmniLoader:
    cfg = _config(files, num_workers=2)
    return OmniLoader(cfg, processor(), dp_rank=dist.get_rank(), dp_size=dist.get_world_size())


def _reference_rank(files: dict[str, tuple[str, str]]) -> dict:
    loader = _loader(files)
    states, steps = [json.dumps(loader.state_dict())], []
    for step in loader:
        steps.append(_record(step))
        states.append(json.dumps(loader.state_dict()))  # JSON: what a checkpoint keeps
    return {"steps": steps, "states": states}


def _resume_rank(files: dict[str, tuple[str, str]], states: list[list[str]], points: list[int]) -> dict:
    out = {}
    for k, state in zip(points, states[dist.get_rank()], strict=True):
        loader = _loader(files)
        loader.load_state_dict(json.loads(state))
        out[k] = [_record(s) for s in loader]
    return out


def _workers(state: str) -> list[dict]:
    snapshots = json.loads(state)["streams"][0]["loader"]["_snapshot"]["_worker_snapshots"].values()
    return [w["dataset_state"] for w in snapshots]


def test_resume_mid_piece_in_new_processes_continues_the_identical_stream(tmp_path):
    """One JSONL file and one Parquet file (mixed), each split among 2 ranks x 2 workers."""
    files = {k: v for k, v in _files(str(tmp_path), n=240).items() if k in ("jsonl", "parquet")}
    ref = run_ranks(_reference_rank, 2, files)
    n = len(ref[0]["steps"])
    points = [1, n // 2]
    for r in range(2):  # mid-piece: every worker has a position to seek to in each file, and buffers
        for w in _workers(ref[r]["states"][1]):
            assert all(c[1] > 0 for c in w["cursors"]) and w["pack"], w["cursors"]
    states = [[r["states"][k] for k in points] for r in ref]
    resumed = run_ranks(_resume_rank, 2, files, states, points)
    for r in range(2):
        for k in points:
            assert resumed[r][k] == ref[r]["steps"][k:], (r, k)


def test_resume_in_process_seeks_instead_of_rereading_and_refuses_a_foreign_state(tmp_path, monkeypatch):
    path = write_jsonl(str(tmp_path / "d.jsonl"), 40)
    cfg = _config({"j": ("jsonl", path)}, num_workers=0, pack_buffer=6, shuffle_buffer=4)
    read = JsonlSource.read
    yielded = Counter()

    def counting_read(self, shard, start=0, end=None):
        for rec in read(self, shard, start, end):
            yielded[rec.index] += 1
            yield rec

    monkeypatch.setattr(JsonlSource, "read", counting_read)

    def run(state: dict | None = None, stop: int | None = None) -> tuple[list[list[str]], dict]:
        ds = StreamingDataset(cfg, processor(), dp_rank=0, dp_size=1)
        if state is not None:
            ds.load_state_dict(state)
        items = []
        for item in ds:
            items.append(item.batch.sample_ids if item.batch is not None else [])
            if len(items) == stop:
                break
        return items, json.loads(json.dumps(ds.state_dict()))

    full, _ = run()
    head, state = run(stop=3)
    position = state["cursors"][0][1]
    buffered = {k[2] for k in state["shuffle"] + state["pack"]}
    assert position > 0 and state["shuffle"]  # a byte offset to seek to, and buffered samples
    yielded.clear()
    assert head + run(state)[0] == full
    # The resume read each buffered sample once (by seeking to it) and the rest from the cursor on.
    assert set(yielded) == buffered | {i for i in yielded if i >= position}
    assert all(c == 1 for c in yielded.values()) and min(yielded) < position
    with pytest.raises(RuntimeError, match="version 1 cannot be restored"):
        run({k: v for k, v in state.items() if k != "version"})
    with open(path, "a") as f:
        f.write(json.dumps({"id": "late", "messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(RuntimeError, match="changed since the save"):
        run(state)
