"""The preprocessing job on a real local Ray cluster: good rows in, broken rows named, idempotent."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import webdataset as wds
import yaml
from typer.testing import CliRunner

from omni_data.cli import app
from omni_data.preprocess.job import run_preprocess
from omni_data.preprocess.spec import PreprocessSpec
from omni_data.sources import WebDatasetSource
from tests.omni_data.fixtures import png, processor


def _wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), dtype="float32"), 16000, format="WAV")
    return buf.getvalue()


def _chat(i: int, media: dict | None = None) -> dict:
    user = [{"type": "text", "text": f"question {i}"}] + ([media] if media else [])
    return {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"answer {i}"}],
    }


def _raw(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good, lines = {}, []
    for i in range(7):
        if i % 3 == 0:
            (raw / f"{i}.png").write_bytes(png(16, 24, i))
            doc, data = _chat(i, {"type": "image", "path": f"{i}.png"}), (raw / f"{i}.png").read_bytes()
        elif i % 3 == 1:
            (raw / f"{i}.wav").write_bytes(_wav(0.1 * i))
            doc, data = _chat(i, {"type": "audio", "path": f"{i}.wav"}), (raw / f"{i}.wav").read_bytes()
        else:
            doc, data = _chat(i), None
        good[doc["id"]] = data
        lines.append(json.dumps(doc))
    inline = _chat(7, {"type": "image", "media": "x.png"})
    good["r7"] = png(8, 8, 7)
    lines.append(json.dumps({**inline, "files": {"x.png": base64.b64encode(good["r7"]).decode()}}))
    (raw / "broken.png").write_bytes(b"not a png at all")
    (raw / "weird.xyz").write_bytes(os.urandom(300))
    broken = [
        json.dumps(_chat(100, {"type": "image", "path": "missing.png"})),  # missing file
        json.dumps(_chat(101, {"type": "image", "path": "broken.png"})),  # corrupt image
        json.dumps(_chat(102, {"type": "audio", "path": "weird.xyz"})),  # unsupported audio
        "{this is not json",
    ]
    order = lines[:3] + broken[:2] + lines[3:6] + broken[2:] + lines[6:]
    (raw / "manifest.jsonl").write_text("\n".join(order) + "\n")
    return raw, good


def _spec(tmp_path, raw) -> dict:
    return {
        "inputs": [{"kind": "jsonl", "paths": str(raw / "manifest.jsonl"), "source": "qa"}],
        "output": str(tmp_path / "out"),
        "shard_samples": 3,
        "processor": {"factory": "tests.omni_data.fixtures:processor"},
        "ray": {"num_cpus": 2},
    }


def test_preprocess_writes_good_rows_names_broken_ones_and_reruns_only_missing_shards(tmp_path):
    raw, good = _raw(tmp_path)
    spec = _spec(tmp_path, raw)
    summary = run_preprocess(PreprocessSpec.from_dict(spec))
    out = tmp_path / "out"
    assert summary.samples == len(good) and summary.written == summary.shards == 4
    assert dict(summary.errors) == {"missing_media": 1, "decode_error": 2, "bad_json": 1}
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["origin"].rsplit(":", 1)[1] for e in errors) == ["10", "4", "5", "9"]  # manifest lines

    src = WebDatasetSource("check", str(out / "shard-*.tar"))
    recs = [r for s in src.shards() for r in src.read(s)]
    assert all(r.error is None for r in recs)
    assert {r.sample.id: (r.sample.media()[0].data if r.sample.media() else None) for r in recs} == good
    index = {row["key"]: row for row in pq.read_table(out / "index.parquet").to_pylist()}
    fresh = processor(use_recorded_counts=False)
    for r in recs:  # the index holds what the training-time processor computes
        m = fresh.measure(r.sample)
        assert index[r.key]["llm_tokens"] == m.llm_tokens and index[r.key]["text_tokens"] == m.text_tokens
    assert sum(1 for _ in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)) == 3  # plain wds

    # Delete one shard: a re-run (through the CLI) rewrites only it.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / "shard-000002.tar").unlink()
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "spec.yaml")])
    assert result.exit_code == 0, result.output
    assert "shards: 4 (1 written, 3 already done)" in result.output
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert {n for n in after if after[n] != before.get(n)} == {"shard-000002.tar"}

    result = CliRunner().invoke(app, ["inspect", str(out), "--plot", str(tmp_path / "h.png")])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output[: result.output.rindex("}") + 1])
    assert stats["samples"] == len(good) and set(stats["media_tokens"]) == {"image", "audio"}
    assert stats["errors"] == {"missing_media": 1, "decode_error": 2, "bad_json": 1}
    assert (tmp_path / "h.png").stat().st_size > 0


def test_spec_errors_name_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"inputs": [], "output": "x", "shard_sample": 3}))
    result = CliRunner().invoke(app, ["preprocess", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "did you mean 'shard_samples'" in result.output
