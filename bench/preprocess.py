"""Preprocessing job throughput on 1 vs 2 CPUs, and shard sizes vs the target.

    uv run python bench/preprocess.py [--shard-bytes 1000000]

Uses the quickstart raw data (made once into a temporary directory) and the quickstart model's
processors, runs the Ray Data job into fresh output directories with an embedded cluster of 1 and
then 2 CPUs, and prints one JSON object: samples/s and MB/s (of shard bytes written) for each, the
2-CPU/1-CPU ratio, and shard sizes relative to `shard_bytes`. Times include starting Ray (~5 s) and
one processor build per worker (~2 s): `--copies` repeats the manifests so the work dominates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "quickstart"))

import make_data  # noqa: E402

from omni_data.preprocess.job import run_preprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard-bytes", type=int, default=1_000_000)
    ap.add_argument("--copies", type=int, default=12, help="repeat the manifests (more work per fixed cost)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        manifests = make_data.make_raw(root)
        tokenizer = make_data.train_tokenizer(root, manifests)
        for path in manifests.values():
            path.write_text(path.read_text() * args.copies)
        results = {}
        for cpus in (1, 2):
            spec = make_data.preprocess_spec(
                root,
                manifests,
                tokenizer,
                str(ROOT / "apps/quickstart/recipe.yaml"),
                output=str(root / f"out{cpus}"),
                shard_samples=100000,
                shard_bytes=args.shard_bytes,
                ray={"num_cpus": cpus},
            )
            t0 = time.perf_counter()
            summary = run_preprocess(spec)
            seconds = time.perf_counter() - t0
            sizes = [p.stat().st_size for p in (root / f"out{cpus}").glob("shard-*.tar")]
            results[f"cpus_{cpus}"] = {
                "seconds": seconds,
                "samples": summary.samples,
                "shards": summary.shards,
                "samples_per_s": summary.samples / seconds,
                "mb_per_s": summary.bytes / seconds / 1e6,
                "write_seconds": summary.write_seconds,
                "write_samples_per_s": summary.samples / summary.write_seconds,
                "shard_size_vs_target": {
                    "mean": statistics.mean(sizes) / args.shard_bytes,
                    "min": min(sizes) / args.shard_bytes,
                    "max": max(sizes) / args.shard_bytes,
                },
            }
    results["ratio_2cpu_vs_1cpu"] = results["cpus_2"]["samples_per_s"] / results["cpus_1"]["samples_per_s"]
    results["write_ratio_2cpu_vs_1cpu"] = (
        results["cpus_2"]["write_samples_per_s"] / results["cpus_1"]["write_samples_per_s"]
    )
    print(
        json.dumps(
            {"bench": "preprocess", "device": "cpu", "shard_bytes_target": args.shard_bytes, **results},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
