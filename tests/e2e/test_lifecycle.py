"""Nothing outlives its run: SIGKILL of one rank, or of the `omni-train run` process, mid-training with
loader workers (also while they are blocked in a read that never returns: a FIFO as the shard) leaves
no process of the run alive 10 s later. Processes are found by an environment marker they inherit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import RECIPE, overrides
from tests.procs import assert_all_gone, marked, new_marker, parent_of, wait_for


def _run(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "omni_train.cli", "run", str(RECIPE), "--nproc", "2"]
    for o in args:
        cmd += ["--set", o]
    return subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # signals below reach one process, never a group
    )


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ranks_and_workers(cli: int, env) -> tuple[list[int], list[int]]:
    procs = marked(env)
    ranks = [p for p in procs if parent_of(p) == cli and b"resource_tracker" not in _cmdline(p)]
    workers = [p for p in procs if p not in ranks and p != cli and parent_of(p) in ranks]
    return ranks, workers


def test_killing_the_cli_while_workers_hang_in_a_read_leaves_nothing(quickstart_data, tmp_path):
    data, _ = quickstart_data
    for i in range(2):  # one shard per reader: each worker blocks opening its own
        os.mkfifo(tmp_path / f"hung-{i}.tar")
    env = new_marker()
    args = overrides(data, tmp_path / "run", ["data.num_workers=1", "parallel.dp_shard=2"])
    args += [
        f"data.sources=[{{kind: webdataset, paths: '{tmp_path}/hung-{{0..1}}.tar'}}]",
        "data.eval_sources=[]",
    ]
    proc = _run(args, env)
    try:
        # two ranks, each with its loader worker blocked opening the FIFO
        found = wait_for(lambda: (r := _ranks_and_workers(proc.pid, env)) and len(r[1]) >= 2 and r, 120)
        assert found, marked(env)
        os.kill(proc.pid, signal.SIGKILL)
        assert_all_gone(env, within_s=10)
    finally:
        proc.kill()
        proc.wait()


def test_killing_one_rank_mid_training_leaves_nothing(quickstart_data, tmp_path):
    data, _ = quickstart_data
    env = new_marker()
    run_dir = tmp_path / "run"
    proc = _run(
        overrides(data, run_dir, ["data.num_workers=1", "parallel.dp_shard=2", "train.steps=200"]), env
    )
    try:
        samples = Path(run_dir, "samples", "dp0.jsonl")
        assert wait_for(lambda: samples.exists() and len(samples.read_text().splitlines()) >= 2, 120)
        ranks, workers = _ranks_and_workers(proc.pid, env)
        assert len(ranks) == 2 and len(workers) >= 2, (ranks, workers)
        rank1 = next(p for p in ranks if marked(env)[p].get("RANK") == "1")
        os.kill(rank1, signal.SIGKILL)
        assert_all_gone(env, within_s=10)
        assert proc.wait(timeout=5) != 0
    finally:
        proc.kill()
        proc.wait()
