"""The harness itself: results come back by rank, and a broken rank fails the test in bounded time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.harness import RankFailedError, run_ranks

FLAG_AT_IMPORT = os.environ.get("OMNI_TEST_FLAG")  # read when a rank imports this module


def _rank_facts(offset: int) -> dict:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "threads": torch.get_num_threads(),
        "env": (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]),
        "sum": t.item() + offset,
        "tensor": torch.full((2,), float(dist.get_rank())),
        "flag_at_import": FLAG_AT_IMPORT,
    }


def test_results_come_back_in_rank_order():
    out = run_ranks(_rank_facts, 3, 10, env={"OMNI_TEST_FLAG": "on"})
    assert all(o["flag_at_import"] == "on" for o in out)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["threads"] == 1 and o["sum"] == 13.0 for o in out)
    assert [o["env"] for o in out] == [("0", "0", "3"), ("1", "1", "3"), ("2", "2", "3")]
    assert torch.equal(out[2]["tensor"], torch.tensor([2.0, 2.0]))


def test_forked_ranks_have_their_own_environment():
    """Without `env` the harness forks ranks from its preloading forkserver: each still sees its own
    rank variables, and its parent is the server, not this process (die_with_parent follows this one)."""
    out = run_ranks(_rank_facts_and_parent, 2, 0)
    assert [o["env"] for o in out] == [("0", "0", "2"), ("1", "1", "2")]
    assert all(o["threads"] == 1 and o["sum"] == 1.0 for o in out)
    assert all(o["parent"] not in (os.getpid(), 1) for o in out)


def _rank_facts_and_parent(offset: int) -> dict:
    return {**_rank_facts(offset), "parent": os.getppid()}


def _raise_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("bad shard 17 on purpose")
    dist.barrier()  # rank 0 would wait here forever without fail-fast


def _hang_on_rank_one() -> None:
    if dist.get_rank() == 1:
        time.sleep(3600)
    dist.barrier()


def _die_on_rank_one() -> None:
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def test_raising_rank_fails_fast_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_ranks(_raise_on_rank_one, 2, timeout_s=120)
    assert time.monotonic() - start < 60
    assert info.value.rank == 1
    assert "rank 1 of 2 raised" in str(info.value)
    assert "ValueError: bad shard 17 on purpose" in str(info.value)


def test_hanging_rank_fails_after_timeout_with_stacks():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_ranks(_hang_on_rank_one, 2, timeout_s=6)
    assert time.monotonic() - start < 60
    text = str(info.value)
    assert "did not finish within 6s" in text
    # Both stacks are dumped: rank 1 asleep in our function, rank 0 stuck in the barrier.
    assert "--- rank 1 ---" in text and "_hang_on_rank_one" in text
    assert "--- rank 0 ---" in text


def test_killed_rank_fails_with_its_signal():
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_ranks(_die_on_rank_one, 2, timeout_s=120)
    assert time.monotonic() - start < 60
    assert info.value.rank == 1
    assert "killed by signal SIGKILL" in str(info.value)


def _start_child_then_raise() -> None:
    if dist.get_rank() == 1:
        child = subprocess.Popen(["sleep", "300"])
        raise RuntimeError(f"failing with child pid={child.pid}")
    dist.barrier()


def test_processes_started_by_a_failed_rank_are_stopped_too():
    with pytest.raises(RankFailedError) as info:
        run_ranks(_start_child_then_raise, 2, timeout_s=120)
    pid = int(re.search(r"child pid=(\d+)", str(info.value)).group(1))
    assert _stopped_within(pid, 10.0)


def _stopped_within(pid: int, seconds: float) -> bool:
    """True once the process is gone or a zombie (killed, waiting to be reaped by init)."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
        except FileNotFoundError:
            return True
        if "zombie" in state:
            return True
        time.sleep(0.1)
    return False
