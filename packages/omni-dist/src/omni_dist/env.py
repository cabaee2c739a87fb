"""Process-group setup from the environment that torchrun and our launchers provide.

RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe one process of a
job. With none of them set the process is a job of one (rank 0 of 1 on 127.0.0.1), so the same entry
point runs on a laptop. A partial set is an error: it means a launcher was misconfigured.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=10)
_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_ALL = (*_REQUIRED, "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class DistEnvError(RuntimeError):
    """The distributed environment variables are missing or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        environ = os.environ if environ is None else environ
        present = [k for k in _ALL if k in environ]
        if not present:
            return cls(0, 1, 0, 1, "127.0.0.1", 0)
        missing = [k for k in _REQUIRED if k not in environ]
        if missing:
            raise DistEnvError(
                f"{', '.join(present)} set but {', '.join(missing)} missing: a distributed launch needs all of "
                f"{', '.join(_REQUIRED)} (LOCAL_RANK/LOCAL_WORLD_SIZE optional). Launch with `omni-train launch` "
                "or torchrun, or unset them all to run as a single process."
            )
        rank = _int_var(environ, "RANK")
        world_size = _int_var(environ, "WORLD_SIZE")
        local_rank = _int_var(environ, "LOCAL_RANK", rank)
        local_world_size = _int_var(environ, "LOCAL_WORLD_SIZE", world_size)
        port = _int_var(environ, "MASTER_PORT")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DistEnvError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}).")
        if local_world_size < 1 or not 0 <= local_rank < local_world_size:
            raise DistEnvError(f"LOCAL_RANK={local_rank} is not in [0, LOCAL_WORLD_SIZE={local_world_size}).")
        if not 0 < port < 65536:
            raise DistEnvError(f"MASTER_PORT={port} is not a TCP port (1-65535).")
        return cls(rank, world_size, local_rank, local_world_size, environ["MASTER_ADDR"], port)


def _int_var(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in environ:
        assert default is not None
        return default
    try:
        return int(environ[key])
    except ValueError:
        raise DistEnvError(f"{key}={environ[key]!r} is not an integer.") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT, backend: str | None = None) -> DistEnv:
    """Create the default process group for this process and return where it sits.

    On CUDA the backend is nccl for GPU tensors plus gloo for CPU tensors (checkpoint metadata, object
    collectives); on CPU it is gloo. `timeout` bounds every collective so that a dead peer surfaces as
    an error instead of a hang (NCCL otherwise waits forever). Rendezvous is torch's env:// (so a
    torchrun agent's store is reused); a single process without the variables uses a local port.
    """
    if dist.is_initialized():
        raise DistEnvError(
            "torch.distributed is already initialised in this process; call destroy_distributed() first."
        )
    env = DistEnv.from_environ()
    device_type = default_device_type()
    device_id = None
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise DistEnvError(
                f"LOCAL_RANK={env.local_rank} but this node has {count} visible CUDA device(s); "
                "start at most one process per GPU or fix CUDA_VISIBLE_DEVICES."
            )
        device_id = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device_id)
    backend = backend or ("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    init_method = "env://" if env.master_port else f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device_id,
    )
    if env.rank == 0:
        log.info("initialised %s process group: world size %d, timeout %s", backend, env.world_size, timeout)
    return env


def destroy_distributed() -> None:
    """Tear down the default process group (and every group made from it); safe to call twice."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(timeout: timedelta = DEFAULT_TIMEOUT, backend: str | None = None) -> Iterator[DistEnv]:
    """`with distributed() as env:` — init from the environment, always tear down."""
    env = init_distributed(timeout=timeout, backend=backend)
    try:
        yield env
    finally:
        destroy_distributed()
