"""Sample schema and sources: WebDataset (ShardWriter and TarWriter), Parquet, JSONL; bad data."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omni_data.config import DataConfig, DataConfigError
from omni_data.errors import DataErrorRateExceeded
from omni_data.loader import OmniLoader
from omni_data.schema import SampleError, parse_sample
from omni_data.sources import JsonlSource, ParquetSource, WebDatasetSource
from tests.omni_data.fixtures import processor, sample_doc, write_wds


def _parse(doc, files=None):
    return parse_sample(doc, key="k", source="src", media_bytes=(files or {}).get, read_path=lambda p: b"")


def test_schema_parses_and_rejects_with_reasons():
    doc = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image", "media": "0.png"}],
            },
            {"role": "assistant", "content": "hello"},
        ],
        "meta": {"tokens": {"image": [[4, 16]]}},
    }
    s = _parse(doc, {"0.png": b"x"})
    assert s.id == "k" and s.source == "src" and [m.modality for m in s.media()] == ["image"]
    assert s.messages[1].content[0].text == "hello" and s.known_tokens() == {"image": [[4, 16]]}
    cases = {
        "bad_json": b"{not json",
        "missing_field": {"id": 1},
        "bad_field": {"messages": [{"role": "robot", "content": "x"}]},
        "missing_media": {"messages": [{"role": "user", "content": [{"type": "image", "media": "9.png"}]}]},
    }
    for reason, bad in cases.items():
        with pytest.raises(SampleError) as e:
            _parse(bad)
        assert e.value.reason == reason
    gen_in_user = {
        "messages": [{"role": "user", "content": [{"type": "image", "media": "0.png", "generate": True}]}]
    }
    with pytest.raises(SampleError, match="generation target"):
        _parse(gen_in_user, {"0.png": b"x"})


def test_webdataset_shardwriter_parquet_and_jsonl_read_the_same_samples(tmp_path):
    import random

    import webdataset as wds

    rng = random.Random(0)
    samples = [sample_doc(i, rng, image=i % 2 == 0) for i in range(7)]
    with wds.ShardWriter(str(tmp_path / "sw-%03d.tar"), maxcount=3) as w:
        for doc, files in samples:
            w.write({"__key__": doc["id"], "json": json.dumps(doc).encode(), **files})
    pq.write_table(
        pa.table(
            {
                "json": [json.dumps(d) for d, _ in samples],
                "media": [[{"name": k, "data": v} for k, v in f.items()] for _, f in samples],
            }
        ),
        tmp_path / "p.parquet",
        row_group_size=2,
    )
    with open(tmp_path / "j.jsonl", "w") as f:
        for d, files in samples:
            f.write(
                json.dumps({**d, "files": {k: base64.b64encode(v).decode() for k, v in files.items()}}) + "\n"
            )

    def read_all(src):
        return [r for shard in src.shards() for r in src.read(shard)]

    wds_recs = read_all(WebDatasetSource("w", str(tmp_path / "sw-*.tar")))
    assert len(WebDatasetSource("w", str(tmp_path / "sw-{000..002}.tar")).shards()) == 3
    for recs in (
        wds_recs,
        read_all(ParquetSource("p", str(tmp_path / "p.parquet"))),
        read_all(JsonlSource("j", str(tmp_path / "j.jsonl"))),
    ):
        assert [r.error for r in recs] == [None] * 7
        assert [r.sample.id for r in recs] == [d["id"] for d, _ in samples]
        assert [[m.data for m in r.sample.media()] for r in recs] == [list(f.values()) for _, f in samples]


def _corrupt_shards(tmp_path):
    """One good shard, then shards with each kind of damage."""
    good = write_wds(str(tmp_path / "good"), [40], image_every=2)[0]
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        add("a1.json", b"{broken")  # bad json
        add("a2.json", json.dumps({"id": "a2"}).encode())  # missing messages
        img = {
            "messages": [
                {"role": "user", "content": [{"type": "image", "media": "0.png"}]},
                {"role": "assistant", "content": "x"},
            ]
        }
        add("a3.json", json.dumps(img).encode())
        add("a3.0.png", b"\x89PNG not really")  # corrupt image
        add("a4.json", json.dumps(ok).encode())
    truncated = tmp_path / "truncated.tar"
    data = Path(good).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a member cut mid-way: the shard ends there
    (tmp_path / "notatar.tar").write_bytes(b"garbage" * 100)
    return [good, str(bad), str(truncated), str(tmp_path / "notatar.tar"), str(tmp_path / "missing.tar")]


def test_bad_data_is_skipped_counted_and_logged(tmp_path, caplog):
    shards = _corrupt_shards(tmp_path)
    cfg = DataConfig.from_dict(
        {
            "sources": [{"kind": "webdataset", "paths": shards[:3] + shards[3:]}],
            "max_tokens": 512,
            "epochs": 1,
            "max_error_rate": 0.5,
            "max_bad_shards": 0.6,  # 3 of the 5 shards cannot be read (fully)
            "shuffle_shards": False,
        }
    )
    loader = OmniLoader(cfg, processor())
    with caplog.at_level("WARNING", logger="omni_data"):
        ids = [i for step in loader for b in step.micro_batches for i in b.sample_ids]
    skipped = loader.errors.skipped
    assert skipped["bad_json"] == 1 and skipped["missing_field"] == 1 and skipped["decode_error"] == 1
    # shards that cannot be opened or read on are counted as shards, not as skipped samples
    (bad,) = loader.bad_shards()
    reasons = {os.path.basename(path): why.split(":")[0] for path, why in bad.items()}
    assert reasons == {
        "truncated.tar": "shard_read",
        "notatar.tar": "shard_open",
        "missing.tar": "No such file or directory",
    }
    assert not set(skipped) & {"shard_read", "shard_open"}
    assert "a4" in ids and len([i for i in ids if i.startswith("s")]) > 40  # good + readable half
    assert any("bad.tar" in r.message and "'a1'" in r.message for r in caplog.records)


def test_error_rate_limit_stops_with_a_clear_message(tmp_path):
    shards = _corrupt_shards(tmp_path)
    cfg = DataConfig.from_dict(
        {
            # bad samples only: unreadable shards are judged by data.max_bad_shards (test_failfast.py)
            "sources": [{"kind": "webdataset", "paths": shards[1:2]}],
            "max_tokens": 512,
            "epochs": 1,
            "max_error_rate": 0.2,
            "error_min_samples": 3,
        }
    )
    with pytest.raises(DataErrorRateExceeded, match=r"max_error_rate 20.0%.*bad_json=1"):
        list(OmniLoader(cfg, processor()))


def test_config_rejects_unknown_and_bad_values():
    base = {"sources": [{"kind": "jsonl", "paths": "x"}], "max_tokens": 64}
    with pytest.raises(DataConfigError, match="did you mean 'max_tokens'"):
        DataConfig.from_dict({**base, "max_token": 3})
    with pytest.raises(DataConfigError, match=r"sources\[0\].wieght.*'weight'"):
        DataConfig.from_dict({**base, "sources": [{"kind": "jsonl", "paths": "x", "wieght": 2}]})
    with pytest.raises(DataConfigError, match="multiple of pad_to_multiple"):
        DataConfig.from_dict({**base, "pad_to_multiple": 3})
    with pytest.raises(DataConfigError, match="overlong"):
        DataConfig.from_dict({**base, "overlong": "skip"})
    with pytest.raises(FileNotFoundError):
        OmniLoader(
            DataConfig.from_dict({**base, "sources": [{"kind": "jsonl", "paths": "/nope/*.jsonl"}]}),
            processor(),
        )
    with pytest.raises(ValueError, match="unknown source kind 'csv'"):
        OmniLoader(
            DataConfig.from_dict({**base, "sources": [{"kind": "csv", "paths": __file__}]}), processor()
        )


def _ids(cfg: dict) -> list[str]:
    return [
        i
        for step in OmniLoader(DataConfig.from_dict(cfg), processor())
        for b in step.micro_batches
        for i in b.sample_ids
    ]


def test_weighted_mixing_is_seeded_and_follows_the_weights(tmp_path):
    a = write_wds(str(tmp_path / "a"), [200], image_every=0)
    b = write_wds(str(tmp_path / "b"), [200], start=1000, image_every=0)
    cfg = {
        "sources": [{"kind": "webdataset", "paths": a, "weight": 3.0}, {"kind": "webdataset", "paths": b}],
        "max_tokens": 64,
        "pack_buffer": 1,
        "epochs": 1,
        "seed": 5,
    }
    ids = _ids(cfg)
    assert sorted(ids) == sorted([f"s{i:05d}" for i in range(200)] + [f"s{i:05d}" for i in range(1000, 1200)])
    first = ids[:160]
    share_a = sum(int(i[1:]) < 1000 for i in first) / len(first)
    assert 0.65 < share_a < 0.85, share_a  # 3:1 while both sources last
    assert _ids(cfg) == ids and _ids({**cfg, "seed": 6}) != ids


def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path):
    shard = write_wds(str(tmp_path), [60], image_every=2)
    base = {"sources": [{"kind": "webdataset", "paths": shard}], "max_tokens": 48, "epochs": 1}
    loader = OmniLoader(DataConfig.from_dict(base), processor())
    batches = [b for step in loader for b in step.micro_batches]
    assert loader.truncated > 0 and loader.dropped == 0 and sum(b.num_samples for b in batches) == 60
    assert all(b.num_tokens <= 48 for b in batches)
    loader = OmniLoader(DataConfig.from_dict({**base, "overlong": "drop"}), processor())
    kept = sum(b.num_samples for step in loader for b in step.micro_batches)
    assert loader.dropped > 0 and loader.truncated == 0 and kept == 60 - loader.dropped
