"""Launch overheads: time to the first training step with `omni-train launch` (Ray) vs `omni-train run`
(local processes), and from a worker's SIGKILL to the first step after the automatic restart.

    uv run python bench/launcher.py

Runs the quickstart recipe (2 workers, FSDP) as the real CLI in subprocesses and times from outside
by watching RUN_DIR/metrics.jsonl: launch -> first step record, and kill -> first record past the
checkpoint resumed from. Prints one JSON object; the baseline is the local launcher in the same run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "apps/quickstart/recipe.yaml"


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"loss"' in x]


def _wait(pred, timeout: float = 300) -> float:
    start = time.perf_counter()
    while not pred():
        if time.perf_counter() - start > timeout:
            raise TimeoutError
        time.sleep(0.02)
    return time.perf_counter()


def _start(command: str, run_dir: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "omni_train.cli",
        command,
        str(RECIPE),
        "--set",
        f"logging.run_dir={run_dir}",
        "--set",
        "logging.console=none",
        "--set",
        "checkpoint.interval=5",
        "--set",
        "train.steps=40",
    ]
    for e in extra:
        cmd += ["--set", e]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


def main() -> None:
    subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "run", str(RECIPE), "--dry-run"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    if not (ROOT / "data/quickstart/shards/index.parquet").exists():
        subprocess.run(["python", "apps/quickstart/make_data.py"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as d:
        local_dir, ray_dir = Path(d) / "local", Path(d) / "ray"
        t0 = time.perf_counter()
        proc = _start("run", local_dir, ["launcher.num_workers=2"])
        local_first = _wait(lambda: _steps(local_dir)) - t0
        proc.wait()
        t0 = time.perf_counter()
        proc = _start("launch", ray_dir, ["launcher.num_workers=2", "launcher.max_failures=1"])
        ray_first = _wait(lambda: _steps(ray_dir)) - t0
        latest = ray_dir / "checkpoints" / "latest"
        _wait(lambda: latest.exists() and latest.read_text().strip() >= "step-00000010")
        resumed_from = int(latest.read_text().strip().split("-")[1])
        pid = json.loads((ray_dir / "workers.json").read_text())["1"]
        before = len(_steps(ray_dir))
        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        recovered = _wait(lambda: any(s == resumed_from + 1 for s in _steps(ray_dir)[before:])) - killed
        code = proc.wait(timeout=300)
    print(
        json.dumps(
            {
                "bench": "launcher",
                "device": "cpu (2 cores), embedded local Ray",
                "local_run_launch_to_first_step_s": local_first,
                "ray_launch_to_first_step_s": ray_first,
                "ratio_ray_vs_local_first_step": ray_first / local_first,
                "kill_to_resumed_first_step_s": recovered,
                "resumed_from_step": resumed_from,
                "launch_exit_code": code,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
