"""The quickstart dataset: generated offline through the preprocessing job, read back by the loader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq

from omni_data.config import DataConfig
from omni_data.loader import OmniLoader
from omni_train.processing import chat_processor

ROOT = Path(__file__).resolve().parents[2]


def _make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "apps/quickstart/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_dataset_builds_and_its_counts_match_training_time_processing(tmp_path):
    make_data = _make_data()
    summary = make_data.build(str(tmp_path), str(ROOT / "apps/quickstart/recipe.yaml"), num_cpus=2)
    expected = sum(n for source, n in make_data.COUNTS.items() if source != "draw")
    assert summary.samples == expected and not summary.errors
    index = pq.read_table(tmp_path / "shards/index.parquet").to_pylist()
    assert {r["source"] for r in index} == {"image_qa", "video_qa", "audio_qa", "text_qa"}
    assert len({r["modalities"] for r in index if r["shard"] == "shard-000007.tar"}) > 2  # shards mix sources
    assert {m for r in index for m in r["modalities"].split(",") if m} == {"image", "video", "audio"}
    # The loader, with counts recomputed by the model's processors, sees the same tokens as the index.
    proc = chat_processor(
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
    tokens = json.loads(by_id[next(i for i in by_id if i.startswith("video"))]["media_tokens"])
    assert tokens["video"][0][0] == 32  # 4 frames of 32x32: 2 x 8 x 8 patches / 2x2 merge
