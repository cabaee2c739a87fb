"""The quickstart dataset: generated offline through the preprocessing job, read back by the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from omni_data.config import DataConfig
from omni_data.loader import OmniLoader
from omni_train.assembly import preprocessing_processor
from tests.e2e.conftest import load_make_data

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_dataset_builds_and_its_counts_match_training_time_processing(quickstart_data):
    tmp_path, summary = quickstart_data
    make_data = load_make_data()
    expected = sum(make_data.COUNTS.values())
    assert summary.samples == expected and not summary.errors
    index = pq.read_table(tmp_path / "shards/index.parquet").to_pylist()
    assert {r["source"] for r in index} == {"image_qa", "video_qa", "audio_qa", "text_qa", "draw"}
    assert len({r["modalities"] for r in index if r["shard"] == "shard-000009.tar"}) > 2  # shards mix sources
    assert {m for r in index for m in r["modalities"].split(",") if m} == {"image", "video", "audio"}
    # The loader, with counts recomputed by the model's processors, sees the same tokens as the index.
    proc = preprocessing_processor(
        str(ROOT / "apps/quickstart/recipe.yaml"), str(tmp_path / "tokenizer"), use_recorded_counts=False
    )
    cfg = DataConfig.from_dict(
        {
            "sources": [{"kind": "webdataset", "paths": str(tmp_path / "shards/shard-*.tar")}],
            "max_tokens": 256,
            "epochs": 1,
            "shuffle_shards": False,
        }
    )
    by_id = {r["id"]: r for r in index}
    seen = 0
    for step in OmniLoader(cfg, proc):
        for b in step.micro_batches:
            cu = b.cu_seqlens.tolist()
            for k, sid in enumerate(b.sample_ids):
                assert cu[k + 1] - cu[k] == by_id[sid]["llm_tokens"]
                seen += 1
    assert seen == expected
    tokens = json.loads(next(r for r in index if r["source"] == "video_qa")["media_tokens"])
    assert tokens["video"][0][0] == 64  # 4 frames of 32x32: 4 x 8 x 8 patches (a patch per frame) / 2x2 merge
