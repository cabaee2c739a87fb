"""Nothing a rank starts outlives it: loader workers blocked in a read that never returns (a FIFO as
the shard, like a hung mount) exit when their rank is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.procs import assert_all_gone, marked, new_marker, wait_for

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    from omni_data.config import DataConfig
    from omni_data.loader import OmniLoader
    from tests.omni_data.fixtures import processor

    cfg = DataConfig.from_dict({"sources": [{"kind": "webdataset", "paths": sys.argv[1]}],
                                "max_tokens": 64, "num_workers": 1})
    loader = OmniLoader(cfg, processor())
    print("ready", flush=True)
    next(iter(loader))  # the worker blocks opening the FIFO; this process waits for it
""")


def test_loader_workers_blocked_in_a_read_die_with_their_rank(tmp_path):
    fifo = tmp_path / "hung-shard.tar"
    os.mkfifo(fifo)
    env = new_marker()
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(fifo)],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        start_new_session=True,  # the kill below reaches the rank only, not a process group
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        # the rank and its worker, blocked in open()
        assert wait_for(lambda: len(marked(env)) >= 2, 60), marked(env)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert_all_gone(env, within_s=10)
    finally:
        if proc.poll() is None:
            proc.kill()
