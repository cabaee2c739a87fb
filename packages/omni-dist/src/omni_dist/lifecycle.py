"""Child processes that never outlive their parent (ranks of a launcher, data-loader workers of a rank).

Two mechanisms, because either alone leaves a gap:
- Linux `PR_SET_PDEATHSIG`: the kernel sends SIGKILL when the parent dies, however it dies, even while
  the child is blocked in a system call (e.g. `open()` of a FIFO or a file on a hung mount, where no
  Python code runs). It fires when the *thread* that started the child exits, and only on Linux.
- A daemon thread that polls the parent's pid and exits the process when it is gone: covers other
  platforms and start methods where the parent is not the process that created us (a blocked read
  releases the GIL, so the thread runs).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def die_with_parent(parent_pid: int, poll_s: float | None = 0.5, direct: bool = True) -> None:
    """Make this process exit when `parent_pid` (read in the parent, before starting us) dies.

    `direct=False`: `parent_pid` started us through an intermediary (a multiprocessing forkserver, which
    exits with it): the death signal then comes from the intermediary's death, and the watch follows
    `parent_pid` itself rather than our parent process."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # it died before the call took effect
    if not _alive(parent_pid) or (direct and os.getppid() != parent_pid):
        os._exit(1)
    if poll_s:
        threading.Thread(
            target=_watch, args=(parent_pid, poll_s, direct), daemon=True, name="die-with-parent"
        ).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _watch(parent_pid: int, poll_s: float, direct: bool) -> None:
    while _alive(parent_pid) and (not direct or os.getppid() == parent_pid):
        time.sleep(poll_s)
    os._exit(1)
