"""The installed console scripts answer --help/--version, and `omni-train layout` runs real ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import omni_data
import omni_train

BIN = Path(sys.executable).parent


def _run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("script", "version"), [("omni-train", omni_train.__version__), ("omni-data", omni_data.__version__)]
)
def test_console_scripts_help_and_version(script, version):
    help_ = _run(script, "--help")
    assert help_.returncode == 0, help_.stderr
    assert f"Usage: {script}" in help_.stdout and "--version" in help_.stdout
    ver = _run(script, "--version")
    assert ver.returncode == 0 and ver.stdout.strip() == f"{script} {version}"


def test_layout_runs_ranks_and_prints_groups():
    proc = _run(
        "omni-train", "layout", "--nproc", "4", "--dp-shard", "2", "--sp", "2", "--ep", "2", timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world=4 = dp_replicate 1 x dp_shard 2 x sp 2 (ep 2 x ep_fsdp 2" in out
    assert "sp            2 ranks x 2 groups: [0,1] [2,3]" in out
    assert "dp_shard      2 ranks x 2 groups: [0,2] [1,3]" in out
    assert "fsdp          4 ranks x 1 groups: [0,1,2,3]" in out


def test_layout_rejects_an_impossible_layout_before_starting():
    proc = _run("omni-train", "layout", "--nproc", "4", "--sp", "3")
    assert proc.returncode == 2
    assert "cannot infer dp_shard" in proc.stderr
