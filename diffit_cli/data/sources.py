"""Data sources (docs/architecture.md, 'Pipeline'): the `Source` interface, image folders, zips and `.npz` files.

Every source is a `torch.utils.data.Dataset` yielding `(x, label)`:

- pixel sources (image folder, zip, npz, built-in synthetic shapes): `x` is a uint8 CHW tensor at
  `resolution` (ADM centre crop + BICUBIC resize when the stored images differ);
- latent shards: `x` is the stored posterior statistics of the SD-VAE, a float tensor (2, 2, C, h, w):
  `x[0]` = mean, `x[1]` = std, and along the second axis 0 = the image, 1 = its horizontal mirror
  (`sample_latent` turns a batch of them into model-space latents).

`label` is a 0-d int64 tensor: the class index, or `NO_LABEL` (-1) when the source has no classes.
-1 (not 0) is deliberate: an unconditional source fed by mistake to a class embedding fails loudly
instead of silently training "class 0". The training loop passes `y=None` when the preset has no
classes. Every source exposes `resolution`, `num_channels`, `num_classes` (0 if none), `class_names`,
`kind` ("pixel" | "latent") and `__len__`.

Unreadable images are detected lazily, when an item is first decoded: an open-time `verify()` of every
file would read the whole dataset (minutes for ImageNet). By default a bad file raises `DataError` naming
it; with `skip_bad_images=True` it is replaced, with one warning per file, by the next readable item
(deterministically, so resumed runs still see the same batches). `PixelSource.find_bad_images()` scans
everything up front for those who want it.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffit_cli.data.images import (
    IMAGE_EXTENSIONS,
    DataError,
    check_channels,
    check_resolution,
    folder_image_names,
    npz_member,
    pil_to_chw,
    zip_image_names,
)

NO_LABEL = -1
SKIP_HINT = "fix or remove the file, or pass --skip-bad-images to skip unreadable images with a warning"


class Source(torch.utils.data.Dataset, abc.ABC):
    """Common attributes of every source (see the module docstring for the item contract)."""

    kind = "pixel"
    resolution: int
    num_channels: int
    class_names: tuple[str, ...] = ()
    name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """All labels in item order (int64, NO_LABEL when unconditional)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short hash identifying the content list (names, labels), used by latent manifests."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, {len(self)} items, {self.resolution}², "
            f"{self.num_channels} ch, {self.num_classes} classes)"
        )


class PixelSource(Source):
    """Base of the image sources: x-flip doubling (EDM's `xflip`), checked decoding, label plumbing.

    Subclasses set `_raw_labels` (int64 per stored image) and implement `_decode(i)` → CHW uint8 at
    `resolution`, and `_item_name(i)`.
    """

    _raw_labels: np.ndarray

    def __init__(self, resolution: int, channels: int, xflip: bool, skip_bad_images: bool):
        self.resolution = check_resolution(resolution)
        self.num_channels = check_channels(channels)
        self.xflip = bool(xflip)
        self.skip_bad_images = bool(skip_bad_images)
        self._warned: set[int] = set()

    @property
    def raw_count(self) -> int:
        return len(self._raw_labels)

    def __len__(self) -> int:
        return self.raw_count * (2 if self.xflip else 1)

    def labels(self) -> np.ndarray:
        return np.tile(self._raw_labels, 2) if self.xflip else self._raw_labels.copy()

    @abc.abstractmethod
    def _decode(self, i: int) -> np.ndarray:
        """Stored image i → CHW uint8 at `resolution`."""

    def _item_name(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        raw, flip = idx % self.raw_count, idx >= self.raw_count
        raw, arr = self._load_checked(raw)
        if flip:
            arr = arr[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)), torch.tensor(int(self._raw_labels[raw]))

    def _load_checked(self, raw: int) -> tuple[int, np.ndarray]:
        for step in range(self.raw_count):
            i = (raw + step) % self.raw_count
            try:
                return i, self._decode(i)
            except DataError:
                raise
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
                if not self.skip_bad_images:
                    raise DataError(f"cannot read image {self._item_name(i)}: {e}; {SKIP_HINT}") from None
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"skipping unreadable image {self._item_name(i)}: {e}", stacklevel=2)
        raise DataError(f"no readable image in {self.name}")

    def find_bad_images(self) -> list[str]:
        """Decode every stored image now; the names of those that fail (slow: reads the whole dataset)."""
        bad = []
        for i in range(self.raw_count):
            try:
                self._decode(i)
            except Exception:
                bad.append(self._item_name(i))
        return bad


def _labels_from_names(names: Sequence[str], root: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class = first-level folder, when every image sits in one; otherwise unconditional."""
    parts = [n.split("/") for n in names]
    if not all(len(p) >= 2 for p in parts):
        return np.full(len(names), NO_LABEL, np.int64), ()
    classes = tuple(sorted({p[0] for p in parts}))
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], np.int64), classes


def hash_lines(lines: Sequence[str], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()[:16]


class ImageFolderSource(PixelSource):
    """Images anywhere under `root` (recursive, sorted). Class = first-level subfolder name (sorted) when
    every image lies in a subfolder; unconditional when any image lies directly in the root."""

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        *,
        channels: int = 3,
        xflip: bool = False,
        skip_bad_images: bool = False,
    ):
        super().__init__(resolution, channels, xflip, skip_bad_images)
        self.root = Path(root)
        self.name = str(self.root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.name!r} does not exist")
        self.files = folder_image_names(self.root)
        if not self.files:
            raise DataError(
                f"no images found in {self.name!r} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self._raw_labels, self.class_names = _labels_from_names(self.files, self.name)

    def _item_name(self, i: int) -> str:
        return str(self.root / self.files[i])

    def _decode(self, i: int) -> np.ndarray:
        with Image.open(self.root / self.files[i]) as im:
            return pil_to_chw(im, self.resolution, self.num_channels)

    def fingerprint(self) -> str:
        return hash_lines(self.files, self._raw_labels)


class FileSource(PixelSource):
    """A pixel source stored in one file (zip archive, `.npz`): `path` and `name` are the file's."""

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        *,
        channels: int = 3,
        xflip: bool = False,
        skip_bad_images: bool = False,
    ):
        super().__init__(resolution, channels, xflip, skip_bad_images)
        self.path = Path(path)
        self.name = str(self.path)


class ZipSource(FileSource):
    """A zip archive in EDM `dataset_tool` layout: images anywhere inside, optional `dataset.json` with
    `{"labels": [[name, class_index], ...]}` (or `null`), optionally `"class_names": [...]`."""

    def __init__(self, path: str | Path, resolution: int, **kwargs):
        super().__init__(path, resolution, **kwargs)
        try:
            with zipfile.ZipFile(self.path) as z:
                infos = {i.filename: i for i in z.infolist() if not i.is_dir()}
                meta = json.loads(z.read("dataset.json")) if "dataset.json" in infos else None
                self.files = zip_image_names(z)
        except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read zip archive {self.name!r}: {e}") from None
        if not self.files:
            raise DataError(f"no images found in zip archive {self.name!r}")
        self._crc = [infos[n].CRC for n in self.files]
        self._raw_labels, self.class_names = self._read_labels(meta)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1

    def _read_labels(self, meta: Any) -> tuple[np.ndarray, tuple[str, ...]]:
        table = meta.get("labels") if isinstance(meta, dict) else None
        if table is None:
            return np.full(len(self.files), NO_LABEL, np.int64), ()
        try:
            mapping = {str(name): int(label) for name, label in table}
        except (TypeError, ValueError):
            raise DataError(f"{self.name}: dataset.json labels must be [[file name, class index], ...]") from None
        missing = [n for n in self.files if n not in mapping]
        if missing:
            raise DataError(f"{self.name}: dataset.json has no label for {missing[0]!r} ({len(missing)} missing)")
        labels = np.array([mapping[n] for n in self.files], np.int64)
        if labels.min() < 0:
            raise DataError(f"{self.name}: dataset.json has a negative class index")
        names = meta.get("class_names") or [str(k) for k in range(int(labels.max()) + 1)]
        if len(names) <= labels.max():
            raise DataError(f"{self.name}: class index {labels.max()} but only {len(names)} class_names")
        return labels, tuple(str(n) for n in names)

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # one handle per process (workers fork)
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zip=None, _zip_pid=-1)

    def _item_name(self, i: int) -> str:
        return f"{self.path}:{self.files[i]}"

    def _decode(self, i: int) -> np.ndarray:
        with Image.open(io.BytesIO(self._archive().read(self.files[i]))) as im:
            return pil_to_chw(im, self.resolution, self.num_channels)

    def fingerprint(self) -> str:
        return hash_lines([f"{n}:{c}" for n, c in zip(self.files, self._crc)], self._raw_labels)


class NpzSource(FileSource):
    """`.npz` with `arr_0` uint8 NHWC images (ADM/DiT sample layout) and optional `arr_1` int labels."""

    def __init__(self, path: str | Path, resolution: int, **kwargs):
        super().__init__(path, resolution, **kwargs)
        try:
            images = npz_member(self.path, "arr_0")
            labels = npz_member(self.path, "arr_1")
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise DataError(f"cannot read {self.name!r} as .npz: {e}") from None
        if images is None:
            raise DataError(f"{self.name!r} has no arr_0 (uint8 NHWC images)")
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            hint = " (it looks NCHW; store NHWC)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
            raise DataError(
                f"{self.name}: arr_0 must be uint8 NHWC images, got {images.dtype} {tuple(images.shape)}{hint}"
            )
        if len(images) == 0:
            raise DataError(f"{self.name}: arr_0 holds no images")
        self._images, self._shape = images, tuple(images.shape)
        if labels is None:
            self._raw_labels, self.class_names = np.full(len(images), NO_LABEL, np.int64), ()
        else:
            labels = np.asarray(labels).reshape(-1).astype(np.int64)
            if len(labels) != len(images) or labels.min() < 0:
                raise DataError(f"{self.name}: arr_1 must hold one non-negative class index per image")
            self._raw_labels = labels
            self.class_names = tuple(str(k) for k in range(int(labels.max()) + 1))

    def __getstate__(self) -> dict:  # workers re-map the file instead of pickling the array
        return dict(self.__dict__, _images=None)

    def _array(self) -> np.ndarray:
        if self._images is None:
            self._images = npz_member(self.path, "arr_0")
            if self._images.ndim == 3:
                self._images = self._images[..., None]
        return self._images

    def _decode(self, i: int) -> np.ndarray:
        arr = np.asarray(self._array()[i])
        h, w, c = arr.shape
        if c == 4 or c != self.num_channels or (h, w) != (self.resolution,) * 2:
            im = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3])
            return pil_to_chw(im, self.resolution, self.num_channels)
        return arr.transpose(2, 0, 1)

    def fingerprint(self) -> str:
        st = self.path.stat()
        return hash_lines([f"{self.path.name}:{st.st_size}:{self._shape}"], self._raw_labels)
