"""Reading stored images, shared by training (`sources`) and FID (`diffit_cli.fid`): one extension list, one
hidden-file rule, one listing of folders and zips, one `.npz` reader (random access or streamed), ADM's crop.

A file is an image when its extension is in IMAGE_EXTENSIONS and no part of its path (below the folder, or inside
the zip) starts with "." (hidden files and folders such as `.ipynb_checkpoints/`) or is `__MACOSX`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffit_cli.errors import DiffitError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"})


class DataError(DiffitError):
    """Missing/empty/unreadable data or a resolution the data cannot provide."""


def is_image_name(name: str) -> bool:
    """Whether a relative path (`/`-separated) names an image under the shared rule (extension, nothing hidden)."""
    parts = name.split("/")
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not any(
        p.startswith(".") or p == "__MACOSX" for p in parts
    )


def folder_image_names(root: Path) -> list[str]:
    """Sorted `/`-separated paths, relative to `root`, of the images anywhere below it (symlinks followed)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        rel = os.path.relpath(dirpath, root)
        names += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in filenames]
    return sorted(n for n in names if is_image_name(n))


def zip_image_names(archive: zipfile.ZipFile) -> list[str]:
    """Sorted member names of the images in a zip archive."""
    return sorted(i.filename for i in archive.infolist() if not i.is_dir() and is_image_name(i.filename))


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side is ≥ 2·size, BICUBIC-resize the short side to
    `size`, then crop the centre. Returns HWC (or HW for mode L) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    ratio = size / min(image.size)
    image = image.resize(tuple(round(s * ratio) for s in image.size), resample=Image.BICUBIC)
    arr = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch (any layout) → float32 in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def pil_to_chw(image: Image.Image, size: int, channels: int) -> np.ndarray:
    mode = "RGB" if channels == 3 else "L"
    if image.mode != mode:
        image = image.convert(mode)
    arr = center_crop_arr(image, size) if image.size != (size, size) else np.array(image)  # (writable, as above)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def check_resolution(resolution: Any) -> int:
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise DataError(f"pixel data has 1 (grey) or 3 (RGB) channels; the preset asks for {channels}")
    return channels


# ------------------------------------------------------------------------------------------------ .npz files
def _read_npy_header(f) -> tuple:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return reader(f)


def npz_header(path: Path, member: str = "arr_0") -> tuple:
    """(shape, fortran_order, dtype) of one npz member, without reading its data."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(member + ".npy") as f:
            return _read_npy_header(f)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {member} in {path}: {e}") from None


def npz_member(path: Path, member: str) -> np.ndarray | None:
    """Array `member` of an npz: memory-mapped when stored uncompressed (np.savez), else loaded."""
    with zipfile.ZipFile(path) as z:
        info = next((i for i in z.infolist() if i.filename == member + ".npy"), None)
        if info is None:
            return None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                start = (
                    info.header_offset
                    + 30
                    + int.from_bytes(local[26:28], "little")
                    + int.from_bytes(local[28:30], "little")
                )
                f.seek(start)
                shape, fortran, dtype = _read_npy_header(f)
                if not fortran and not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
        with z.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


def npz_batches(path: Path, member: str, size: int) -> Iterator[np.ndarray]:
    """Stream `member` of an npz in batches along its first axis, never loading it whole (np.savez and
    np.savez_compressed alike; a Fortran-ordered array is the rare exception and is loaded)."""
    shape, fortran, dtype = npz_header(path, member)
    if fortran:
        arr = np.load(path, allow_pickle=False)[member]
        for start in range(0, len(arr), size):
            yield np.ascontiguousarray(arr[start : start + size])
        return
    per_item = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    with zipfile.ZipFile(path) as zf, zf.open(member + ".npy") as f:
        _read_npy_header(f)
        for start in range(0, shape[0], size):
            n = min(size, shape[0] - start)
            buf = f.read(n * per_item)
            if len(buf) != n * per_item:
                raise DataError(f"{path} is truncated ({member} ends after {start} items)")
            yield np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:]).copy()
