"""Data sources, the latent-shard format and a deterministic, resumable loader (DESIGN §3 Source).

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
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from diffit_cli.errors import DiffitError
from diffit_cli.fileio import atomic_write_bytes

NO_LABEL = -1
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"})
SYNTHETIC_SIZE = 50_000
SYNTHETIC_CLASSES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "crescent")
# Built-in synthetic styles. "varied": anywhere in the frame, rotated up to ±25°, bright-on-dark or dark-on-bright,
# textured backgrounds. "simple": near the centre, upright, larger, always bright on a dark untextured gradient.
# A network of the `demo` preset's size draws recognizable shapes from "simple" after 90 kimg; from "varied", and
# from variants that fix only the polarity or only the placement, it still draws blobs after 60-100 kimg.
SYNTHETIC_STYLES = {
    "varied": {"size": (0.4, 0.25), "offset": 1.0, "rotation": 25.0, "texture": 1.0, "always_dark": False},
    "simple": {"size": (0.55, 0.2), "offset": 0.3, "rotation": 0.0, "texture": 0.0, "always_dark": True},
}
SKIP_HINT = "fix or remove the file, or pass --skip-bad-images to skip unreadable images with a warning"


class DataError(DiffitError):
    """Missing/empty/unreadable data or a resolution the data cannot provide."""


# ------------------------------------------------------------------------------------------ image helpers
def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side is ≥ 2·size, BICUBIC-resize the short side to
    `size`, then crop the centre. Returns HWC (or HW for mode L) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    ratio = size / min(image.size)
    image = image.resize(tuple(round(s * ratio) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch (any layout) → float32 in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def _pil_to_chw(image: Image.Image, size: int, channels: int) -> np.ndarray:
    mode = "RGB" if channels == 3 else "L"
    if image.mode != mode:
        image = image.convert(mode)
    arr = center_crop_arr(image, size) if image.size != (size, size) else np.asarray(image)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _check_resolution(resolution: Any) -> int:
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise DataError(f"pixel data has 1 (grey) or 3 (RGB) channels; the preset asks for {channels}")
    return channels


# ---------------------------------------------------------------------------------------------- sources
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
        return (f"{type(self).__name__}({self.name!r}, {len(self)} items, {self.resolution}², "
                f"{self.num_channels} ch, {self.num_classes} classes)")


class PixelSource(Source):
    """Base of the image sources: x-flip doubling (EDM's `xflip`), checked decoding, label plumbing.

    Subclasses set `_raw_labels` (int64 per stored image) and implement `_decode(i)` → CHW uint8 at
    `resolution`, and `_item_name(i)`.
    """

    _raw_labels: np.ndarray

    def __init__(self, resolution: int, channels: int, xflip: bool, skip_bad_images: bool):
        self.resolution = _check_resolution(resolution)
        self.num_channels = _check_channels(channels)
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


def _hash_lines(lines: Sequence[str], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()[:16]


class ImageFolderSource(PixelSource):
    """Images anywhere under `root` (recursive, sorted). Class = first-level subfolder name (sorted) when
    every image lies in a subfolder; unconditional when any image lies directly in the root."""

    def __init__(self, root: str | Path, resolution: int, *, channels: int = 3, xflip: bool = False,
                 skip_bad_images: bool = False):
        super().__init__(resolution, channels, xflip, skip_bad_images)
        self.root = Path(root)
        self.name = str(self.root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.name!r} does not exist")
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            for f in filenames:
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        if not files:
            raise DataError(f"no images found in {self.name!r} (looked recursively for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.files = sorted(files)
        self._raw_labels, self.class_names = _labels_from_names(self.files, self.name)

    def _item_name(self, i: int) -> str:
        return str(self.root / self.files[i])

    def _decode(self, i: int) -> np.ndarray:
        with Image.open(self.root / self.files[i]) as im:
            return _pil_to_chw(im, self.resolution, self.num_channels)

    def fingerprint(self) -> str:
        return _hash_lines(self.files, self._raw_labels)


class ZipSource(PixelSource):
    """A zip archive in EDM `dataset_tool` layout: images anywhere inside, optional `dataset.json` with
    `{"labels": [[name, class_index], ...]}` (or `null`), optionally `"class_names": [...]`."""

    def __init__(self, path: str | Path, resolution: int, *, channels: int = 3, xflip: bool = False,
                 skip_bad_images: bool = False):
        super().__init__(resolution, channels, xflip, skip_bad_images)
        self.path = Path(path)
        self.name = str(self.path)
        try:
            with zipfile.ZipFile(self.path) as z:
                infos = {i.filename: i for i in z.infolist() if not i.is_dir()}
                meta = json.loads(z.read("dataset.json")) if "dataset.json" in infos else None
        except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read zip archive {self.name!r}: {e}") from None
        self.files = sorted(n for n in infos if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                            and not os.path.basename(n).startswith("."))
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
            return _pil_to_chw(im, self.resolution, self.num_channels)

    def fingerprint(self) -> str:
        return _hash_lines([f"{n}:{c}" for n, c in zip(self.files, self._crc)], self._raw_labels)


def _npz_member(path: Path, member: str) -> np.ndarray | None:
    """Array `member` of an npz: memory-mapped when stored uncompressed (np.savez), else loaded."""
    with zipfile.ZipFile(path) as z:
        info = next((i for i in z.infolist() if i.filename == member + ".npy"), None)
        if info is None:
            return None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                    int.from_bytes(local[28:30], "little")
                f.seek(start)
                fmt = np.lib.format
                version = fmt.read_magic(f)
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                if not fortran and not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
        with z.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


class NpzSource(PixelSource):
    """`.npz` with `arr_0` uint8 NHWC images (ADM/DiT sample layout) and optional `arr_1` int labels."""

    def __init__(self, path: str | Path, resolution: int, *, channels: int = 3, xflip: bool = False,
                 skip_bad_images: bool = False):
        super().__init__(resolution, channels, xflip, skip_bad_images)
        self.path = Path(path)
        self.name = str(self.path)
        try:
            images = _npz_member(self.path, "arr_0")
            labels = _npz_member(self.path, "arr_1")
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise DataError(f"cannot read {self.name!r} as .npz: {e}") from None
        if images is None:
            raise DataError(f"{self.name!r} has no arr_0 (uint8 NHWC images)")
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            hint = " (it looks NCHW; store NHWC)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
            raise DataError(f"{self.name}: arr_0 must be uint8 NHWC images, got {images.dtype} "
                            f"{tuple(images.shape)}{hint}")
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
            self._images = _npz_member(self.path, "arr_0")
            if self._images.ndim == 3:
                self._images = self._images[..., None]
        return self._images

    def _decode(self, i: int) -> np.ndarray:
        arr = np.asarray(self._array()[i])
        h, w, c = arr.shape
        if c == 4 or c != self.num_channels or (h, w) != (self.resolution,) * 2:
            im = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3])
            return _pil_to_chw(im, self.resolution, self.num_channels)
        return arr.transpose(2, 0, 1)

    def fingerprint(self) -> str:
        st = self.path.stat()
        return _hash_lines([f"{self.path.name}:{st.st_size}:{self._shape}"], self._raw_labels)


# ------------------------------------------------------------------------------------------ synthetic data
def _fold_sdf(u: np.ndarray, v: np.ndarray, k: int, inner: float, phase: float) -> np.ndarray:
    """Approximate signed distance to a k-gon (inner = cos(π/k)) or k-point star (smaller inner radius)
    with unit circumradius and a vertex at angle `phase`: fold the plane into half a sector."""
    a = 2 * math.pi / k
    ang = np.mod(np.arctan2(v, u) - phase, a)
    ang = np.minimum(ang, a - ang)
    r = np.hypot(u, v)
    qx, qy = r * np.cos(ang), r * np.sin(ang)
    bx, by = inner * math.cos(a / 2), inner * math.sin(a / 2)
    ex, ey = bx - 1.0, by
    n = math.hypot(ex, ey)
    nx, ny = ey / n, -ex / n  # outward normal of the edge from the vertex (1, 0) to b
    return (qx - 1.0) * nx + qy * ny


def _rhombus(u, v, a, b):
    return (np.abs(u) / a + np.abs(v) / b - 1) * (a * b / math.hypot(a, b))


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: np.hypot(u, v) - 0.9,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.75,
    "triangle": lambda u, v: _fold_sdf(u / 1.1, v / 1.1 - 0.1, 3, 0.5, -math.pi / 2) * 1.1,
    "cross": lambda u, v: np.minimum(np.maximum(np.abs(u) - 0.95, np.abs(v) - 0.3),
                                     np.maximum(np.abs(u) - 0.3, np.abs(v) - 0.95)),
    "diamond": lambda u, v: _rhombus(u, v, 0.62, 1.0),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.7) - 0.25,
    "star": lambda u, v: _fold_sdf(u, v, 5, 0.45, -math.pi / 2),
    "crescent": lambda u, v: np.maximum(np.hypot(u, v) - 0.95, 0.8 - np.hypot(u - 0.5, v + 0.25)),
}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


class SyntheticShapes(PixelSource):
    """Built-in procedural dataset: a coloured shape (class) on a gradient (+ sinusoid texture) background.

    Item i is a pure function of (style, seed, i): class = i mod 8 (balanced), the rest from a NumPy generator
    seeded with (seed, i). Vectorised NumPy per item (≈0.1 ms at 32²); any resolution; anti-aliased. `style`
    is a key of SYNTHETIC_STYLES: "varied" shapes span 40–65 % of the width, rotated by at most ±25° (so square
    and diamond stay distinct); "simple" ones 55–75 %, upright, near the centre.
    """

    def __init__(self, resolution: int = 32, *, channels: int = 3, size: int = SYNTHETIC_SIZE, seed: int = 0,
                 xflip: bool = False, style: str = "varied"):
        super().__init__(resolution, channels, xflip, False)
        if size < 1:
            raise DataError(f"the synthetic dataset needs at least one item, got size={size}")
        if style not in SYNTHETIC_STYLES:
            raise DataError(f"unknown synthetic style {style!r}; choose one of {', '.join(SYNTHETIC_STYLES)}")
        self.size, self.seed, self.style = int(size), int(seed), style
        self.name = f"synthetic-shapes(style={style}, seed={self.seed}, size={self.size})"
        self.class_names = SYNTHETIC_CLASSES
        self._raw_labels = np.arange(self.size, dtype=np.int64) % len(SYNTHETIC_CLASSES)
        c = (np.arange(self.resolution, dtype=np.float32) + 0.5) * (2.0 / self.resolution) - 1.0
        self._ys, self._xs = np.meshgrid(c, c, indexing="ij")

    def _decode(self, i: int) -> np.ndarray:
        return self.render(i)

    def render(self, i: int) -> np.ndarray:
        """CHW uint8 image of item i (no x-flip)."""
        st = SYNTHETIC_STYLES[self.style]
        rng = np.random.default_rng((self.seed, int(i)))
        xs, ys = self._xs, self._ys
        u01 = rng.random(16)
        dark = st["always_dark"] or u01[0] < 0.5  # dark background + bright shape, or the reverse
        lo, hi = (0.08, 0.42) if dark else (0.62, 0.95)
        c0 = _hsv(u01[1], 0.15 + 0.45 * u01[2], lo + (hi - lo) * u01[3])
        c1 = _hsv((u01[1] + 0.1 + 0.3 * u01[4]) % 1, 0.15 + 0.45 * u01[5], lo + (hi - lo) * u01[6])
        t = 2 * math.pi * u01[7]
        g = np.clip((xs * math.cos(t) + ys * math.sin(t)) * 0.5 + 0.5, 0, 1)
        f, phi, phase = 1.5 + 3.5 * u01[8], 2 * math.pi * u01[9], 2 * math.pi * u01[10]
        tex = st["texture"] * (0.04 + 0.06 * u01[11]) * np.sin(
            math.pi * f * (xs * math.cos(phi) + ys * math.sin(phi)) + phase)
        bg = c0[:, None, None] + (c1 - c0)[:, None, None] * g + tex

        s = st["size"][0] + st["size"][1] * u01[12]
        cx, cy = st["offset"] * (0.9 - s) * (2 * rng.random(2) - 1)
        rot = math.radians(st["rotation"]) * (2 * u01[13] - 1)
        dx, dy = xs - cx, ys - cy
        u = (dx * math.cos(rot) + dy * math.sin(rot)) / s
        v = (-dx * math.sin(rot) + dy * math.cos(rot)) / s
        sdf = _SHAPES[SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]](u, v)
        alpha = np.clip(0.5 - sdf * (s * self.resolution / 2), 0, 1)
        fv = (0.8 + 0.2 * u01[15]) if dark else (0.12 + 0.25 * u01[15])
        fg = _hsv(u01[14], 0.55 + 0.45 * rng.random(), fv)
        shade = 1 + 0.12 * np.clip(u - v, -1.5, 1.5)
        img = bg + (fg[:, None, None] * shade - bg) * alpha
        img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        if self.num_channels == 1:
            img = np.round(img.astype(np.float32).transpose(1, 2, 0) @ np.array([0.299, 0.587, 0.114],
                                                                                  np.float32))[None]
            img = img.astype(np.uint8)
        return img

    def fingerprint(self) -> str:
        style = "" if self.style == "varied" else f"{self.style}-"  # "varied" keeps the v1 fingerprint
        return f"synthetic-shapes-v1-{style}{self.seed}-{self.size}"


# --------------------------------------------------------------------------------------- latent shards
MANIFEST_NAME = "manifest.json"
LATENT_FORMAT = "diffit-latents"
LATENT_FORMAT_VERSION = 1
DEFAULT_LATENT_SCALE = 0.18215


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(path: str | Path, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor,
                dtype: torch.dtype = torch.float16) -> None:
    """Atomically write one latent shard: `mean`, `std` (N, 2, C, h, w) in `dtype`, `labels` (N,) int64."""
    from safetensors.torch import save

    if mean.shape != std.shape or mean.ndim != 5 or mean.shape[1] != 2 or labels.shape != mean.shape[:1]:
        raise ValueError(f"bad shard shapes: mean {tuple(mean.shape)}, std {tuple(std.shape)}, "
                         f"labels {tuple(labels.shape)}")
    tensors = {"mean": mean.to(dtype).contiguous(), "std": std.to(dtype).contiguous(),
               "labels": labels.to(torch.int64).contiguous()}
    # one metadata key only: safetensors writes metadata from a hash map, so several keys come out in a
    # random order and identical shards would differ in bytes
    atomic_write_bytes(path, save(tensors, metadata={"format": f"{LATENT_FORMAT}/{LATENT_FORMAT_VERSION}"}))


def shard_count(path: str | Path) -> int | None:
    """Number of items in a complete shard file, or None when it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("labels").get_shape()[0]
            ok = (f.metadata() or {}).get("format", "").startswith(LATENT_FORMAT) and \
                f.get_slice("mean").get_shape()[0] == f.get_slice("std").get_shape()[0] == n
            return n if ok else None
    except Exception:
        return None


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read latent manifest {str(path)!r}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != LATENT_FORMAT:
        raise DataError(f"{str(path)!r} is not a diffit latent manifest (format {LATENT_FORMAT!r})")
    if manifest.get("version", 0) > LATENT_FORMAT_VERSION:
        raise DataError(f"{str(path)!r} has latent format version {manifest['version']}; this diffit reads "
                        f"up to {LATENT_FORMAT_VERSION} (upgrade diffit)")
    return manifest


def write_manifest(root: str | Path, manifest: dict) -> None:
    atomic_write_bytes(Path(root) / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())


class LatentShardSource(Source):
    """Latents written by `diffit encode-latents`: item = (stats (2, 2, C, h, w) in the stored dtype,
    label). `resolution` is the image resolution, `num_channels` the latent channels."""

    kind = "latent"

    def __init__(self, root: str | Path, resolution: int | None = None):
        self.root = Path(root)
        self.name = str(self.root)
        m = self.manifest = read_manifest(self.root)
        if not m.get("complete"):
            raise DataError(f"latent folder {self.name!r} is incomplete (encoding was interrupted); rerun the "
                            "same `diffit encode-latents` command to finish it")
        self.resolution = int(m["resolution"])
        if resolution is not None and _check_resolution(resolution) != self.resolution:
            raise DataError(f"latents in {self.name!r} were encoded at {self.resolution}² but {resolution}² is "
                            f"wanted; run `diffit encode-latents SRC OUT --resolution {resolution}`")
        self.num_channels = int(m["latent_channels"])
        self.latent_size = int(m["latent_size"])
        self.scaling_factor = float(m.get("scaling_factor", DEFAULT_LATENT_SCALE))
        self.vae = m.get("vae", {})
        self.class_names = tuple(m.get("class_names") or ())
        self.shard_size = int(m["shard_size"])
        self.shards = [s["file"] for s in m["shards"]]
        counts = [int(s["count"]) for s in m["shards"]]
        if sum(counts) != int(m["count"]) or any(c != self.shard_size for c in counts[:-1]):
            raise DataError(f"latent manifest {self.name!r} is inconsistent (shard counts vs count)")
        self._count = int(m["count"])
        self._labels = self._read_labels()
        self._handles: dict[int, Any] = {}
        self._pid = -1

    def _read_labels(self) -> np.ndarray:
        from safetensors import safe_open

        out = []
        for f in self.shards:
            try:
                with safe_open(str(self.root / f), framework="np") as h:
                    out.append(h.get_tensor("labels"))
            except Exception as e:
                raise DataError(f"cannot read latent shard {str(self.root / f)!r}: {e}; rerun "
                                "`diffit encode-latents` to rewrite it") from None
        return np.concatenate(out).astype(np.int64)

    def __len__(self) -> int:
        return self._count

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def fingerprint(self) -> str:
        return str(self.manifest.get("source", {}).get("fingerprint", ""))

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _handles={}, _pid=-1)

    def _shard(self, k: int):
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.root / self.shards[k]), framework="pt")
        return self._handles[k]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < self._count:
            raise IndexError(idx)
        k, j = divmod(idx, self.shard_size)
        h = self._shard(k)
        stats = torch.stack([h.get_slice("mean")[j : j + 1][0], h.get_slice("std")[j : j + 1][0]])
        return stats, torch.tensor(int(self._labels[idx]))


def sample_latent(stats: torch.Tensor, *, scale: float = DEFAULT_LATENT_SCALE, xflip: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of latent stats (B, 2, 2, C, h, w) → model-space latents z = (mean + std·ε)·scale (float32).

    With `xflip` each sample uses its mirror entry with probability ½. Randomness comes from `generator`
    or the global RNG of the stats' device (so a saved RNG state replays it).
    """
    stats = stats.to(torch.float32)
    b = stats.shape[0]
    if xflip:
        pick = torch.randint(0, 2, (b,), generator=generator, device=stats.device)
    else:
        pick = torch.zeros(b, dtype=torch.int64, device=stats.device)
    rows = torch.arange(b, device=stats.device)
    mean, std = stats[rows, 0, pick], stats[rows, 1, pick]
    eps = torch.randn(mean.shape, generator=generator, device=stats.device, dtype=mean.dtype)
    return (mean + std * eps) * scale


# ----------------------------------------------------------------------------------------------- factory
def open_source(data: Any = None, resolution: int | None = None, *, channels: int | None = None,
                xflip: bool | None = None, skip_bad_images: bool = False, synthetic_size: int = SYNTHETIC_SIZE,
                synthetic_seed: int = 0, synthetic_style: str | None = None) -> Source:
    """Open the source named by a `DataConfig`, a path, or None (built-in synthetic shapes).

    Path → latent shards (a folder with manifest.json), image folder, `.zip` or `.npz`. Explicit keyword
    arguments override the config's values. For `space: latent` presets with an image path, the returned
    pixel source yields RGB images for on-the-fly VAE encoding.
    """
    use_labels = False
    if data is not None and not isinstance(data, (str, os.PathLike)):  # a DataConfig (duck-typed)
        cfg = data
        data, use_labels = cfg.path, cfg.use_labels
        synthetic_style = synthetic_style or getattr(cfg, "synthetic", None)
        resolution = cfg.resolution if resolution is None else resolution
        if channels is None:
            channels = cfg.channels if cfg.space == "pixel" else 3
        if xflip is None:
            xflip = cfg.xflip and cfg.space == "pixel"
    if resolution is not None:
        resolution = _check_resolution(resolution)
    channels = 3 if channels is None else channels
    xflip = bool(xflip)

    if data is None:
        src: Source = SyntheticShapes(resolution or 32, channels=channels, size=synthetic_size, seed=synthetic_seed,
                                      xflip=xflip, style=synthetic_style or "varied")
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"data path {str(path)!r} does not exist; pass an image folder, .zip, .npz or a "
                            "latent folder written by `diffit encode-latents`")
        if path.is_dir() and (path / MANIFEST_NAME).is_file():
            src = LatentShardSource(path, resolution)
        else:
            if resolution is None:
                raise DataError(f"opening {str(path)!r} needs a resolution")
            kwargs = dict(channels=channels, xflip=xflip, skip_bad_images=skip_bad_images)
            if path.is_dir():
                src = ImageFolderSource(path, resolution, **kwargs)
            elif path.suffix.lower() == ".zip":
                src = ZipSource(path, resolution, **kwargs)
            elif path.suffix.lower() == ".npz":
                src = NpzSource(path, resolution, **kwargs)
            else:
                raise DataError(f"cannot tell what {str(path)!r} is: pass an image folder, a .zip, a .npz or a "
                                "latent folder (with manifest.json)")
    if use_labels and src.num_classes == 0:
        raise DataError(f"data.use_labels is true but {src.name!r} has no class labels (put each class in its "
                        "own subfolder, add dataset.json labels / arr_1, or set data.use_labels=false)")
    return src


# ------------------------------------------------------------------------------------------------ loader
class StreamBatchSampler(torch.utils.data.Sampler):
    """This rank's part of an endless, deterministic stream of global batches.

    The global stream concatenates epochs; epoch e is a permutation of the dataset drawn from (seed, e)
    (or the identity when not shuffling). Global batch j covers stream positions [j·B, (j+1)·B) counted
    from `start`; rank r takes the contiguous slice [r·B/W, (r+1)·B/W). A run resumed at `start` = samples
    already consumed sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start: int = 0):
        if n < 1:
            raise DataError("the dataset is empty")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not a positive multiple of world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.start = rank, world_size, shuffle, int(start)
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = (np.random.default_rng((self.seed, epoch)).permutation(self.n)
                                  if self.shuffle else np.arange(self.n))
        return self._perms[epoch]

    def indices(self, first: int, count: int) -> np.ndarray:
        """Dataset indices at stream positions [first, first + count)."""
        pos = np.arange(first, first + count, dtype=np.int64)
        epoch, off = np.divmod(pos, self.n)
        out = np.empty(count, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.permutation(int(e))[off[sel]]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world_size
        pos = self.start
        while True:
            yield self.indices(pos + self.rank * local, local).tolist()
            pos += self.batch_size


def _unwrap_worker_error(message: str) -> str:
    """DataLoader re-raises worker errors with the whole traceback in the message; keep our message."""
    key = "DataError: "
    if message.startswith("Caught ") and key in message:
        return message[message.rfind(key) + len(key):].strip()
    return message


class InfiniteLoader:
    """Endless iterator of this rank's batches `(x, labels)`; `position` = global samples consumed.

    Iterating again (or after `load_state_dict`) restarts the stream at `position`.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, pin_memory: bool | None = None,
                 start_index: int = 0, shuffle: bool = True, prefetch_factor: int = 4):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.local_batch = self.batch_size // max(world_size, 1)
        self.position = int(start_index)
        self.sampler = StreamBatchSampler(len(dataset), self.batch_size, seed=seed, rank=rank,
                                          world_size=world_size, shuffle=shuffle, start=start_index)
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=num_workers, pin_memory=pin,
            persistent_workers=False, prefetch_factor=prefetch_factor if num_workers > 0 else None,
            # the loader draws its worker base seed from this generator, never from the global RNG
            generator=torch.Generator().manual_seed(seed))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[Any]:
        self.sampler.start = self.position
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except DataError as e:
                raise DataError(_unwrap_worker_error(str(e))) from None
            self.position += self.batch_size
            yield batch


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, *, seed: int = 0, rank: int = 0,
                world_size: int = 1, num_workers: int = 2, pin_memory: bool | None = None, start_index: int = 0,
                shuffle: bool = True) -> InfiniteLoader:
    """An endless, deterministic loader of this rank's share (batch_size / world_size) of each global batch.

    `batch_size` is the global batch of one loader step (use per-GPU batch × world size with gradient
    accumulation); `start_index` = global samples already consumed (resume); pinned memory defaults to
    CUDA availability.
    """
    return InfiniteLoader(dataset, batch_size, seed=seed, rank=rank, world_size=world_size,
                          num_workers=num_workers, pin_memory=pin_memory, start_index=start_index, shuffle=shuffle)
