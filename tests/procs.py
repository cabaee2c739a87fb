"""Finding a test's processes by an environment marker (every process it starts inherits it)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

MARKER = "OMNI_TEST_MARKER"


def new_marker() -> dict[str, str]:
    return {MARKER: uuid.uuid4().hex}


def marked(env: dict[str, str]) -> dict[int, dict[str, str]]:
    """pid -> environment of this user's live processes that carry the marker of `env`."""
    needle = f"{MARKER}={env[MARKER]}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            raw = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in raw.split(b"\0") and state != "Z":  # zombies are dead, only not yet reaped
            found[int(proc.name)] = dict(
                item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item
            )
    return found


def wait_for(predicate, timeout_s: float, poll_s: float = 0.2):
    """The first truthy value of predicate() within timeout_s, else None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    return None


def assert_all_gone(env: dict[str, str], within_s: float) -> None:
    """No process with the marker is alive `within_s` seconds from now; leftovers are killed, then fail."""
    left = wait_for(lambda: not marked(env), within_s) is None and marked(env)
    if left:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"{len(left)} process(es) outlived their parent by {within_s} s: {sorted(left)}")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
