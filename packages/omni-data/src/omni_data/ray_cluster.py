"""Connecting to Ray: an existing cluster (address / RAY_ADDRESS) or an embedded local one.

Shared by the preprocessing job and omni-train's launcher. The embedded cluster binds to 127.0.0.1,
has no dashboard and no token auth (Ray 2.60 enables it by default), and its workers run this
interpreter with the driver's import path (so a factory named by import path resolves in them).
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType


def import_ray() -> ModuleType:
    """Import Ray with the settings an embedded cluster needs (Ray reads them at import time)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Under `uv run`, Ray would start every worker through `uv run` too and package the working
    # directory (seconds per worker); the workers here share this interpreter and environment.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    return ray


def pythonpath() -> str:
    return os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p and os.path.isdir(p))


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS) or start a local cluster; True if this call started Ray."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath()}},
        )
    return True
