"""Reading the launch environment and creating/tearing down the process group."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from omni_dist import DistEnv, DistEnvError, destroy_distributed, distributed, init_distributed

FULL = {
    "RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}


def test_reads_torchrun_variables():
    assert DistEnv.from_environ(FULL) == DistEnv(1, 4, 1, 2, "10.0.0.1", 29500)


def test_no_variables_means_a_single_process():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (0, 1, 0, "127.0.0.1")


def test_local_rank_defaults_to_rank_on_one_node():
    env = DistEnv.from_environ({k: v for k, v in FULL.items() if not k.startswith("LOCAL")})
    assert (env.local_rank, env.local_world_size) == (1, 4)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"MASTER_PORT": None}, "MASTER_PORT missing"),
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "4"}, "RANK=4 is not in [0, WORLD_SIZE=4)"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not in [0, LOCAL_WORLD_SIZE=2)"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ],
)
def test_bad_environment_is_named(change, needle):
    environ = {**FULL, **change}
    environ = {k: v for k, v in environ.items() if v is not None}
    with pytest.raises(DistEnvError) as info:
        DistEnv.from_environ(environ)
    assert needle in str(info.value)


def test_single_process_group_init_and_teardown(monkeypatch):
    for key in FULL:
        monkeypatch.delenv(key, raising=False)
    with distributed(timeout=timedelta(seconds=30)) as env:
        assert env.world_size == 1 and dist.is_initialized()
        assert ("nccl" if torch.cuda.is_available() else "gloo") in dist.get_backend()
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 1.0
        with pytest.raises(DistEnvError, match="already initialised"):
            init_distributed()
    assert not dist.is_initialized()
    destroy_distributed()  # a second teardown is harmless
