"""Trainer tokens/s when the data is one JSONL file vs the same samples in 8 files (2 ranks), and the
time from start to the error when every shard is missing.

    uv run python bench/data_files.py [--steps 30] [--samples 6000]

The quickstart model trains on text conversations (arithmetic, like the quickstart's text part)
through `omni-train run --nproc 2`: once from one JSONL file, once from 8. With record-level splitting
every reader gets its share of the single file; without it one rank would step on filler batches.
Prints one JSON object: tokens/s of both (median over the steps after the first 5) and their ratio,
plus the seconds `omni-train run` takes to exit on all-missing data and the seconds the loader takes
to raise on it in process, and the cost of the SP peers' per-step check (one 8-byte digest
all_gather, 2 gloo ranks) against the step time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "apps/quickstart/recipe.yaml"
TOKENIZER = ROOT / "data/quickstart/tokenizer"


def _conversations(n: int) -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(n):
        terms = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
        q = " + ".join(map(str, terms))
        doc = {
            "id": f"t{i:06d}",
            "messages": [
                {"role": "user", "content": f"What is {q}?"},
                {"role": "assistant", "content": f"{q} = {sum(terms)}."},
            ],
        }
        lines.append(json.dumps(doc))
    return lines


def _write(root: Path, lines: list[str], files: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        (root / f"part-{f:02d}.jsonl").write_text("\n".join(lines[f::files]) + "\n")
    return str(root / "part-*.jsonl")


def _train(paths: str, run_dir: Path, steps: int) -> tuple[float, float]:
    """(median tokens/s, median step seconds) over the steps after the first 5."""
    sets = [
        f"data.tokenizer={TOKENIZER}",
        f"data.sources=[{{kind: jsonl, paths: '{paths}'}}]",
        "data.eval_sources=[]",
        "data.num_workers=1",
        "data.prepare=null",
        f"train.steps={steps}",
        "train.eval_every=0",
        "checkpoint.resume=none",
        "checkpoint.interval=0",
        "logging.console=none",
        "logging.tensorboard=false",
        f"logging.run_dir={run_dir}",
    ]
    cmd = [sys.executable, "-m", "omni_train.cli", "run", str(RECIPE), "--nproc", "2"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > 5]
    rates = [r["tokens_per_s"] for r in timed]
    return statistics.median(rates), statistics.median(r["tokens"] / r["tokens_per_s"] for r in timed)


def _time_to_error(missing: str) -> dict[str, float]:
    import torch

    from omni_data.errors import DataUnreadable
    from omni_dist import ParallelMesh, distributed
    from omni_train.assembly import build_loader, preprocessing_processor, tokenizer
    from omni_train.config import load_config

    sets = [f"data.sources=[{{kind: webdataset, paths: '{missing}'}}]", "data.prepare=null"]
    cmd = [sys.executable, "-m", "omni_train.cli", "run", str(RECIPE), "--nproc", "2"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    cli_s = time.perf_counter() - t0
    assert proc.returncode != 0, proc.stdout
    # in process: the loader the trainer builds from the same recipe (one rank)
    cfg = load_config(RECIPE, [*sets, f"data.tokenizer={TOKENIZER}"])
    processor = preprocessing_processor(str(RECIPE), str(TOKENIZER))
    pad_id = tokenizer(cfg).pad_token_id or 0
    with distributed():
        mesh = ParallelMesh.build(cfg.dims(1), device_type="cpu")
        t0 = time.perf_counter()
        try:
            build_loader(cfg, processor, mesh, torch.device("cpu"), pad_id)
        except DataUnreadable:
            loader_s = time.perf_counter() - t0
    return {"cli_exit_s": cli_s, "loader_raise_s": loader_s}


def _peer_check_rank(calls: int) -> float:
    """Seconds per SP-peer check of a step of 8 micro-batches with 16 samples each (2 ranks, gloo)."""
    import torch
    import torch.distributed as dist

    from omni_data.peers import check_peers
    from omni_dist.packed import pack

    batches = []
    for m in range(8):
        b = pack([torch.arange(8)])
        b.sample_ids = [f"shard-{m:04d}@{i * 977}" for i in range(16)]
        batches.append(b)
    check_peers(batches, dist.group.WORLD, torch.device("cpu"), 0)
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(calls):
        check_peers(batches, dist.group.WORLD, torch.device("cpu"), step)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--samples", type=int, default=6000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if not TOKENIZER.exists():
        cmd = [
            sys.executable,
            "apps/quickstart/make_data.py",
            "--out",
            "data/quickstart",
            "--model",
            str(RECIPE),
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
    lines = _conversations(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one, _ = _train(_write(tmp / "one", lines, 1), tmp / "run-1", args.steps)
        eight, step_s = _train(_write(tmp / "eight", lines, 8), tmp / "run-8", args.steps)
        errors = _time_to_error(f"{tmp}/nope/x-{{0..3}}.tar")
    from omni_dist.spawn import run_ranks

    peer_check_s = run_ranks(_peer_check_rank, 2, args=(500,), threads_per_rank=1)[0]
    print(
        json.dumps(
            {
                "bench": "data_files",
                "device": "cpu (2 cores), 2 ranks",
                "steps": args.steps,
                "tokens_per_s_1_file": one,
                "tokens_per_s_8_files": eight,
                "ratio_1_vs_8_files": one / eight,
                "all_missing": errors,
                "sp_peer_check_ms": peer_check_s * 1e3,
                "sp_peer_check_share_of_step": peer_check_s / step_s,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
