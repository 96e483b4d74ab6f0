"""What the metrics read: images (folder, zip, `.npz`, array; listed by `data.images`, so `eval-fid` sees the
image set `train` reads) and statistics files (EDM, ADM and our layout), opened by `open_input`."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffit_cli.data.images import IMAGE_EXTENSIONS, folder_image_names, npz_batches, npz_header, zip_image_names
from diffit_cli.errors import DiffitError


@dataclass
class Images:
    """Uint8 RGB images in NHWC batches from a folder, a zip, an npz or an array."""

    description: str
    count: int
    _batches: Callable[[int], Iterator[np.ndarray]]

    def batches(self, size: int) -> Iterator[np.ndarray]:
        return self._batches(size)


def _to_rgb_array(img: Image.Image, origin: str) -> np.ndarray:
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise DiffitError(f"cannot decode image {origin}: {e}") from None


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    first = images[0].shape
    for im, name in zip(images, names):
        if im.shape != first:
            raise DiffitError(
                f"images differ in size ({names[0]} is {first[1]}×{first[0]}, "
                f"{name} is {im.shape[1]}×{im.shape[0]}); "
                "resize them to one resolution first"
            )
    return np.stack(images)


def _decoded_batches(names: list[str], load: Callable[[str], np.ndarray], size: int) -> Iterator[np.ndarray]:
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
        for start in range(0, len(names), size):
            chunk = names[start : start + size]
            yield _stack(list(pool.map(load, chunk)), chunk)


def _folder_images(path: Path) -> Images:
    files = [str(path / name) for name in folder_image_names(path)]  # the image set training reads, too
    if not files:
        raise DiffitError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under folder {path}")

    def load(f: str) -> np.ndarray:
        try:
            with Image.open(f) as img:
                return _to_rgb_array(img, f)
        except OSError as e:
            raise DiffitError(f"cannot read image {f}: {e}") from None

    return Images(f"folder {path}", len(files), lambda size: _decoded_batches(files, load, size))


def _zip_images(path: Path) -> Images:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zip_image_names(zf)
    except (zipfile.BadZipFile, OSError) as e:
        raise DiffitError(f"{path} is not a readable zip file: {e}") from None
    if not names:
        raise DiffitError(f"zip {path} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")

    def batches(size: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as zf:

            def load(name: str) -> np.ndarray:
                with Image.open(BytesIO(zf.read(name))) as img:
                    return _to_rgb_array(img, f"{path}:{name}")

            yield from _decoded_batches(names, load, size)

    return Images(f"zip {path}", len(names), batches)


def check_image_array(shape: tuple, dtype: np.dtype, origin: str) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] < 1:
        raise DiffitError(
            f"{origin} must hold uint8 images shaped (N, H, W, 3) (the ADM evaluator's layout); "
            f"got {np.dtype(dtype).name} {tuple(shape)}"
        )


def rgb(batch: np.ndarray) -> np.ndarray:
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


def _npz_member_images(path: Path, member: str = "arr_0") -> Images:
    """Stream `member` of an npz in batches (works for np.savez and np.savez_compressed)."""
    shape, _, dtype = npz_header(path, member)
    check_image_array(shape, dtype, f"{member} in {path}")
    return Images(
        f"{path} ({member})", int(shape[0]), lambda size: (rgb(batch) for batch in npz_batches(path, member, size))
    )


def array_images(arr) -> Images:
    if torch.is_tensor(arr):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    check_image_array(arr.shape, arr.dtype, "the image array")

    def batches(size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(arr), size):
            yield rgb(np.ascontiguousarray(arr[start : start + size]))

    return Images(f"array {tuple(arr.shape)}", len(arr), batches)


@dataclass
class Statistics:
    mu: np.ndarray
    sigma: np.ndarray
    extractor: str | None
    feature_layer: str | None
    num_images: int | None
    features: np.ndarray | None
    images: Images | None  # ADM reference batches: arr_0 holds reference images
    path: Path
    # sFID's spatial statistics (ADM's reference batches and `save_reference`'s files): None when absent
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    spatial_layer: str | None = None


def npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DiffitError(f"{path} is not a readable .npz file: {e}") from None


def read_statistics(path: Path, keys: list[str]) -> Statistics:
    if "mu" not in keys or "sigma" not in keys:
        raise DiffitError(
            f"statistics file {path} needs both `mu` and `sigma` (EDM/ADM reference layout); "
            f"it holds: {', '.join(keys)}"
        )
    with np.load(path, allow_pickle=False) as z:
        mu = np.asarray(z["mu"], dtype=np.float64)
        sigma = np.asarray(z["sigma"], dtype=np.float64)
        extractor = str(z["extractor"]) if "extractor" in keys else None
        layer = str(z["feature_layer"]) if "feature_layer" in keys else None
        count = int(z["num_images"]) if "num_images" in keys else None
        features = np.asarray(z["features"], dtype=np.float32) if "features" in keys else None
    _check_gaussian(path, mu, sigma, "mu", "sigma")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise DiffitError(f"statistics file {path}: `features` must be (N, {mu.shape[0]}); got {features.shape}")
    images = None
    if "arr_0" in keys and features is None:
        shape = npz_header(path)[0]
        if len(shape) == 2:  # per-image features rather than images
            with np.load(path, allow_pickle=False) as z:
                features = np.asarray(z["arr_0"], dtype=np.float32)
            if features.shape[1] != mu.shape[0]:
                raise DiffitError(
                    f"statistics file {path}: `arr_0` features are {features.shape[1]}-dim, `mu` is {mu.shape[0]}-dim"
                )
        else:
            images = _npz_member_images(path)  # ADM: 10k reference images for KID / precision-recall
    mu_s, sigma_s, spatial_layer = _spatial_statistics(path, keys)
    return Statistics(mu, sigma, extractor, layer, count, features, images, path, mu_s, sigma_s, spatial_layer)


def _check_gaussian(path: Path, mu: np.ndarray, sigma: np.ndarray, mu_name: str, sigma_name: str) -> None:
    """A mean (D,) and covariance (D, D) of finite values, or one line naming the file and the keys."""
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DiffitError(
            f"statistics file {path}: `{mu_name}` must be (D,) and `{sigma_name}` (D, D); "
            f"got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DiffitError(f"statistics file {path} holds NaN or infinite values in `{mu_name}`/`{sigma_name}`")


def _spatial_statistics(path: Path, keys: list[str]) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """`mu_s`, `sigma_s` (sFID) and the layer they come from, when the file has them (both or neither)."""
    if "mu_s" not in keys and "sigma_s" not in keys:
        return None, None, None
    if "mu_s" not in keys or "sigma_s" not in keys:
        raise DiffitError(
            f"statistics file {path} holds only one of `mu_s` and `sigma_s` (sFID's spatial statistics); "
            f"it holds: {', '.join(keys)}"
        )
    with np.load(path, allow_pickle=False) as z:
        mu_s = np.asarray(z["mu_s"], dtype=np.float64)
        sigma_s = np.asarray(z["sigma_s"], dtype=np.float64)
        layer = str(z["spatial_layer"]) if "spatial_layer" in keys else None
    _check_gaussian(path, mu_s, sigma_s, "mu_s", "sigma_s")
    return mu_s, sigma_s, layer


def read_stats(path: str | os.PathLike) -> dict:
    """Read a statistics file (EDM, ADM or :func:`save_reference` layout): mu, sigma and what else it says
    (`has_spatial`: whether it carries sFID's `mu_s`/`sigma_s`)."""
    path = Path(path)
    if not path.is_file():
        raise DiffitError(f"statistics file not found: {path}")
    s = read_statistics(path, npz_keys(path))
    return {
        "mu": s.mu,
        "sigma": s.sigma,
        "extractor": s.extractor,
        "feature_layer": s.feature_layer,
        "num_images": s.num_images,
        "has_features": s.features is not None,
        "has_images": s.images is not None,
        "has_spatial": s.mu_s is not None,
        "spatial_dim": None if s.mu_s is None else int(s.mu_s.shape[0]),
    }


def open_input(source, role: str, allow_stats: bool) -> Images | Statistics:
    if isinstance(source, Images):  # already open (e.g. a training data source, `fid.reference.source_images`)
        return source
    if isinstance(source, np.ndarray) or torch.is_tensor(source):
        return array_images(source)
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise DiffitError(f"{role} not found: {path}")
    if path.is_dir():
        return _folder_images(path)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return _zip_images(path)
    if suffix == ".npz":
        keys = npz_keys(path)
        if "mu" in keys or "sigma" in keys:
            if not allow_stats:
                raise DiffitError(f"{role} {path} is a statistics file (mu, sigma); {role} must be images")
            return read_statistics(path, keys)
        if "arr_0" not in keys:
            raise DiffitError(
                f"{path} has no `arr_0` (uint8 images, N×H×W×3, as the ADM evaluator reads)"
                + (" and no `mu`/`sigma` statistics" if allow_stats else "")
                + f"; it holds: {', '.join(keys) or 'nothing'}"
            )
        return _npz_member_images(path)
    kinds = "an image folder, a .zip of images or an .npz" + (" (images or mu/sigma statistics)" if allow_stats else "")
    raise DiffitError(f"{role} {path} is not {kinds}")
