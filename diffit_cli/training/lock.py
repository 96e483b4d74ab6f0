"""One training process per run folder: `train.lock` holds the owner's host and PID while a run writes there.

A second `diffit train` on the same folder (not a process of the same `accelerate launch`, whose other ranks never
take the lock) is refused, naming the owner. A lock left by a crashed process on this host is stale and taken over
with a warning; one from another host cannot be checked from here, so the message says how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from diffit_cli.errors import DiffitError

LOCK_NAME = "train.lock"


class RunLocked(DiffitError):
    """Another process is training in this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire(run_dir: Path) -> str | None:
    """Take the lock of `run_dir` (created if needed); a warning text when a stale lock was taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path, me = run_dir / LOCK_NAME, {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    warning = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            host, pid = owner.get("host"), owner.get("pid")
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                path.unlink(missing_ok=True)
                warning = f"took over the lock of a crashed run (PID {pid} on {host}) in {run_dir}"
                continue
            raise RunLocked(
                f"{run_dir} is being trained by PID {pid} on {host} (lock {path}); wait for it, use "
                f"another --run-dir, or delete {path} if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return warning
    raise RunLocked(f"cannot take the lock {path}; delete it if no training runs there")


def release(run_dir: Path) -> None:
    """Remove the lock if this process holds it."""
    path = run_dir / LOCK_NAME
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
