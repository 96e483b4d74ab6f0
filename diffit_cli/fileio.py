"""Files: atomic writes (a temporary file beside the target, flushed and fsynced, then renamed over it: a crash or
a kill never leaves a half-written checkpoint, shard, sample or manifest behind), output paths checked before any
work, and JSON files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _umask() -> int:
    """The process's umask now (Linux reports it; elsewhere the one at the first atomic write)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return _umask_by_setting_it()


@functools.cache
def _umask_by_setting_it() -> int:
    """The umask where no /proc reports it: the only portable way to read it is to set it, so it is put back at
    once, and read only once (setting it briefly is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object], size: int | None = None) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, fsync, then rename over `path`.

    `size` (bytes, when known beforehand) goes into the message of a full disk, with the free space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it (mkstemp's 0600 hid results from the group)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # (disk full, I/O error): nothing half-written remains, and the error names the file
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            need = f"{format_bytes(size)} needed" if size else f"more than the {format_bytes(written)} written needed"
            raise OSError(
                e.errno,
                f"No space left on device ({need}, {format_bytes(shutil.disk_usage(path.parent).free)} free)",
                str(path),
            ) from None
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: Path | str, folder: bool = False) -> Path:
    """Before any work: the OSError a write to `path` (a file, or a folder with `folder`) would meet at the end, for
    a file or a folder in the way (the user's path is named; `commands` prints it as one line)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        code = errno.ENOTDIR if folder else errno.EISDIR
        raise OSError(code, os.strerror(code), str(path))
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data), size=len(data))


def format_bytes(n: float) -> str:
    """1234567 → '1.2 MB' (decimal units, as `df -H` and disk vendors count)."""
    units, i = ("B", "kB", "MB", "GB", "TB"), 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def write_json(path: Path | str, data: Any) -> Path:
    """`data` as indented JSON at `path`, atomically (values JSON cannot hold are written as text)."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def strict_json(data: Any) -> Any:
    """`data` with each non-finite float as the text "inf", "-inf" or "nan": Python writes them as Infinity/NaN,
    which strict parsers (jq, JavaScript, most JSON libraries) reject."""
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def read_json(path: Path | str) -> Any | None:
    """The JSON at `path`, or None when it is missing or unreadable (a result not written yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def new_output(path: Path | str, keep: Callable[[], bool], owner: bool = True) -> Iterator[None]:
    """Around a run that creates `path` (an output file or folder): if the run fails or is interrupted while `keep()`
    is false (no checkpoint, shard or image to resume from yet), `path` goes, so a failed new run leaves nothing
    behind. Only the `owner` (the main process) removes; output that existed before is never touched."""
    path = Path(path)
    fresh = not path.exists()
    try:
        yield
    except BaseException:  # Ctrl-C too
        if owner and fresh and not keep():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
