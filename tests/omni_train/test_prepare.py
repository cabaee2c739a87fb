"""data.prepare: runs in the working directory; a failure or still-missing data is one line, exit 2.

Every case stops before any training process starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_train.cli import app
from omni_train.config import ConfigError, load_config
from omni_train.local import prepare_data

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "apps/quickstart/recipe.yaml")
MISSING = [
    'data.sources=[{kind: webdataset, paths: "nope/x-{0..3}.tar"}]',
    "data.eval_sources=[]",
]


def _args(command: str, prepare: str, tmp_path: Path) -> list[str]:
    sets = [*MISSING, f"data.prepare={prepare}", f"logging.run_dir={tmp_path / 'run'}"]
    return [command, QUICKSTART, *[x for s in sets for x in ("--set", s)]]


def test_a_failing_prepare_is_one_line_naming_command_status_and_directory(tmp_path):
    """Through the real console script: stderr is exactly one line, no traceback."""
    exe = Path(sys.executable).parent / "omni-train"
    proc = subprocess.run(
        [str(exe), *_args("run", "'exit 3'", tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "data.prepare failed (exit status 3): 'exit 3'" in lines[0] and f"run in {tmp_path}" in lines[0]


@pytest.mark.parametrize("command", ["run", "launch"])
def test_run_and_launch_turn_prepare_errors_into_exit_2(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    failed = runner.invoke(app, _args(command, "'exit 3'", tmp_path))
    assert failed.exit_code == 2 and failed.exception is not None and isinstance(failed.exception, SystemExit)
    assert "exit status 3" in failed.stderr and str(tmp_path) in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    still = runner.invoke(app, _args(command, "'true'", tmp_path))
    assert still.exit_code == 2, still.output
    message = still.stderr.strip()
    assert "data.prepare ('true', run in" in message and "still match no files" in message
    assert f"data.sources[0].paths: nope/x-{{0..3}}.tar (resolved {tmp_path}/nope/x-{{0..3}}.tar)" in message
    assert "Traceback" not in still.output and len(message.splitlines()) == 1


def test_prepare_runs_in_the_working_directory_and_relative_paths_resolve_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make = "mkdir -p nope && for i in 0 1 2 3; do : > nope/x-$i.tar; done"
    cfg = load_config(QUICKSTART, [*MISSING, f"data.prepare='{make}'"])
    prepare_data(cfg)  # makes the shards relative to the working directory, then finds them
    assert sorted(os.listdir(tmp_path / "nope")) == [f"x-{i}.tar" for i in range(4)]
    prepare_data(load_config(QUICKSTART, [*MISSING, "data.prepare='exit 9'"]))  # data present: not run
    # No data.prepare: the missing pattern with its absolute path, and the key it came from.
    cfg = load_config(
        QUICKSTART, [*MISSING, "data.eval_sources=[{kind: jsonl, paths: [~/none.jsonl, e/*.jsonl]}]"]
    )
    with pytest.raises(ConfigError) as e:
        prepare_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"prepare": None})}))
    home = os.path.expanduser("~")
    assert str(e.value).startswith(
        f"data sources match no files: data.eval_sources[0].paths: ~/none.jsonl (resolved {home}/none.jsonl)"
        " (and 1 more pattern(s)); fix the paths or set data.prepare"
    )
