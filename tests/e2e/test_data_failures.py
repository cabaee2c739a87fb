"""Unreadable data through the CLI: all shards missing fails fast naming a path; half of them missing
trains and the end-of-run report (RUN_DIR/data_report.json) counts the missing shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from tests.e2e.conftest import RECIPE, load_make_data, overrides


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "omni_train.cli", "run", str(RECIPE), "--nproc", "2"]
    for o in args:
        cmd += ["--set", o]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_all_shards_missing_fails_fast_and_half_missing_is_reported(quickstart_data, tmp_path):
    data, _ = quickstart_data
    t0 = time.perf_counter()
    gone = f"{tmp_path}/nope/x-{{0..3}}.tar"
    args = overrides(data, tmp_path / "run0", [f"data.sources=[{{kind: webdataset, paths: '{gone}'}}]"])
    proc = _run([*args, "data.prepare=null"], timeout=60)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 60
    assert f"{tmp_path}/nope/x-{{0..3}}.tar" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    for i in (1, 3, 5, 7):
        (shards / f"shard-{i:06d}.tar").unlink()
    run_dir = tmp_path / "run1"
    args = overrides(data, run_dir, ["train.steps=4", "data.max_bad_shards=0.5", "parallel.dp_shard=2"])
    args += [f"data.sources=[{{kind: webdataset, paths: '{shards}/shard-{{000000..000008}}.tar'}}]"]
    proc = _run(args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((run_dir / "data_report.json").read_text())
    (source,) = report["sources"]
    assert source["shards"] == 9 and len(source["bad_shards"]) == 4
    make_data = load_make_data()
    per_shard = -(-sum(make_data.COUNTS.values()) // make_data.SHARDS)
    assert source["lost_samples"] == 4 * per_shard  # per the preprocessing job's index.parquet
