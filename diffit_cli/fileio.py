"""Files and downloads: atomic writes (a temporary file beside the target, flushed and fsynced, then renamed
over it: a crash or a kill never leaves a half-written checkpoint, shard, sample or manifest behind), JSON
files, and whether downloads are switched off.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "DIFFIT_OFFLINE")


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # (disk full, I/O error): nothing half-written remains, and the error names the file
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_json(path: Path | str, data: Any) -> Path:
    """`data` as indented JSON at `path`, atomically (values JSON cannot hold are written as text)."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def read_json(path: Path | str) -> Any | None:
    """The JSON at `path`, or None when it is missing or unreadable (a result not written yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def offline() -> bool:
    """Whether downloads are off: HF_HUB_OFFLINE or DIFFIT_OFFLINE set to 1/true/yes/on (Hub models, Inception
    weights and datasets then fail at once with a message instead of waiting on the network)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_VARIABLES)
