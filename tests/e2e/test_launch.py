"""`omni-train launch` on a real local Ray cluster (2 CPUs, 127.0.0.1): supervision and restarts.

Each launch runs the real CLI in a subprocess and hurts a real worker process: SIGKILL (a crash) or
SIGSTOP (a hang, caught by the heartbeat timeout). One launch takes both, one after the other (fixture
`killed_then_hung`: a cluster start and a run fewer). The reference is the `omni-train run --nproc 2`
run of the same recipe and layout (fixture `runs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import RECIPE, STEPS, overrides, read_metrics
from tests.omni_dist.tiny import RTOL


def _launch(data: Path, run_dir: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "omni_train.cli", "launch", str(RECIPE)]
    for o in overrides(
        data, run_dir, ["parallel.dp_shard=2", "launcher.num_workers=2", "launcher.cpus_per_worker=1", *extra]
    ):
        cmd += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _hurt_after_checkpoint(
    proc: subprocess.Popen, run_dir: Path, sig: int, at: str = "step-00000004", spare: int | None = None
) -> int:
    """Once checkpoint `at` is complete, send `sig` to rank 1's process (one other than `spare`, the
    pid of a group already hurt); returns that pid."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        latest = run_dir / "checkpoints" / "latest"
        if latest.exists() and latest.read_text().strip() >= at and (run_dir / "workers.json").exists():
            pid = json.loads((run_dir / "workers.json").read_text())["1"]
            if pid == spare:
                time.sleep(0.05)
                continue
            os.kill(pid, sig)
            return pid
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
    pytest.fail(f"no checkpoint {at} seen; launcher output:\n{out[-3000:]}")


def _ids_by_step(run_dir: Path) -> dict[int, list[str]]:
    out: dict[int, dict[str, list[str]]] = {}
    for path in sorted((run_dir / "samples").glob("dp*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {})[path.name] = rec["ids"]  # a re-run step replaces the old record
    return {step: sorted(i for ids in per.values() for i in ids) for step, per in out.items()}


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    got, ref = read_metrics(run_dir), read_metrics(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=RTOL), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=RTOL), step
    ids, ref_ids = _ids_by_step(run_dir), _ids_by_step(reference)
    assert ids == ref_ids  # the data stream continued: nothing lost or repeated across the restart
    flat = [i for step in sorted(ids) for i in ids[step]]
    assert len(flat) == len(set(flat))


@pytest.fixture(scope="module")
def killed_then_hung(runs):
    """Rank 1 SIGKILLed after checkpoint step 4 (restart 1/2); in the restarted group, rank 1 SIGSTOPped
    after checkpoint step 8 (no heartbeat for 20 s: restart 2/2). Returns the run dir and the output."""
    data, root, _ = runs
    run_dir = root / "launch-kill-hang"
    proc = _launch(data, run_dir, ["launcher.max_failures=2", "launcher.heartbeat_timeout_s=20"])
    killed = _hurt_after_checkpoint(proc, run_dir, signal.SIGKILL)
    stopped = _hurt_after_checkpoint(proc, run_dir, signal.SIGSTOP, at="step-00000008", spare=killed)
    try:
        output = proc.communicate(timeout=300)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)  # if the launcher did not
    assert proc.returncode == 0, output[-3000:]
    return run_dir, output


def test_killed_worker_restarts_the_group_from_checkpoint(runs, killed_then_hung):
    _, _, out = runs
    run_dir, output = killed_then_hung
    assert "restart 1/2 from checkpoint step" in output and "ActorDiedError" in output
    assert "(rank0" in output or "rank0 pid" in output  # actor output streamed with rank prefixes
    _assert_same_run(run_dir, out["fsdp"][0])
    timings = json.loads((run_dir / "launch.json").read_text())
    assert timings["launch_to_first_step_s"] > 0 and timings["failure_to_resumed_step_s"] > 0


def test_without_restarts_a_killed_worker_ends_the_run_with_a_clear_message(runs):
    data, root, _ = runs
    run_dir = root / "launch-nofail"
    proc = _launch(data, run_dir, ["launcher.max_failures=0"])
    _hurt_after_checkpoint(proc, run_dir, signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1
    assert (
        "launch failed: worker failure: rank" in output
        and "launcher.max_failures=0 restarts used up" in output
    )


def test_hung_worker_is_caught_by_the_heartbeat_and_restarted(runs, killed_then_hung):
    _, _, out = runs
    run_dir, output = killed_then_hung
    assert "no progress for 20 s" in output and "restart 2/2" in output
    _assert_same_run(run_dir, out["fsdp"][0])
