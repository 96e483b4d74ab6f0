"""Sample-quality metrics through torch-fidelity: FID, IS, KID, precision/recall, reference statistics.

Inputs are uint8 images from an image folder (searched recursively), an EDM `dataset_tool` zip, an
ADM-style `.npz` (`arr_0`, uint8 NHWC; read in batches, never loaded whole) or an in-memory uint8
NHWC array. A reference is any of those or a **statistics file** (`.npz` with `mu`, `sigma`):

- EDM reference files (`cifar10-32x32.npz`, `ffhq-64x64.npz`): `mu`, `sigma` of the full training set.
- ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`): `mu`, `sigma` of the full training set
  (used for FID, as the ADM evaluator does) plus `arr_0`, 10,000 reference *images* whose features
  feed KID and precision/recall. `mu_s`/`sigma_s` (sFID) are ignored.
- Files written by :func:`save_reference`: `mu`, `sigma`, `extractor`, `feature_layer`,
  `num_images`, and optionally `features` (per-image features, for KID and precision/recall).

Both published families were computed with the TensorFlow Inception-v3 graph of 2015-12-05
(`pool_3`, 2048 features; EDM through its TorchScript port of that graph). torch-fidelity's
`inception-v3-compat` extractor is a PyTorch port of the same graph, TF1-style bilinear resize to
299 included, and reproduces those features to float precision, so FID against these files is
comparable; small device- and precision-dependent differences remain (cuDNN TF32 is switched off
while features are extracted). The Fréchet distance itself is torch-fidelity's
(`fid_statistics_to_metric`), as are IS, KID and precision/recall (k = 3 neighbours, as in ADM's
evaluator; unlike torch-fidelity's default, precision/recall use the same extractor as FID, i.e.
Inception pool features as in ADM, not VGG-16).

Feature extractors are torch-fidelity registry names. `inception-v3-compat` (default) downloads its
weights into the torch hub cache on first use, or loads `inception_weights=PATH`; offline
(`HF_HUB_OFFLINE=1` or `DIFFIT_OFFLINE=1`) without weights it fails at once with a message saying
where the file goes. :func:`register_test_extractor` registers `diffit-randconv-v1`, a small fixed
random conv net that runs anywhere with no files; its numbers are **not** comparable with Inception
FID and every result computed with it says so.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import urllib.error
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from diffit_cli.data.images import IMAGE_EXTENSIONS, folder_image_names, npz_batches, npz_header, zip_image_names
from diffit_cli.errors import DiffitError
from diffit_cli.fileio import atomic_write, offline

__all__ = [
    "INCEPTION",
    "TEST_EXTRACTOR",
    "METRICS",
    "compute_metrics",
    "save_reference",
    "read_stats",
    "register_test_extractor",
    "inception_weights_cache_path",
]

INCEPTION = "inception-v3-compat"
TEST_EXTRACTOR = "diffit-randconv-v1"
METRICS = ("fid", "is", "kid", "pr")
_ALIASES = {"fid": "fid", "is": "is", "isc": "is", "kid": "kid", "pr": "pr", "prc": "pr"}
_ALIASES.update(precision="pr", recall="pr")
_LABEL = {"fid": "FID", "is": "IS", "kid": "KID", "pr": "precision/recall"}
FID_PROTOCOL_SAMPLES = 50_000
DOWNLOAD_TIMEOUT_S = 30
SEED = 2020  # torch-fidelity's default rng_seed: IS split shuffle, KID subsets

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ----------------------------------------------------------------------------------------------
# The offline stand-in extractor


class RandConvFeatureExtractor(FeatureExtractorBase):
    """A fixed random 3-stage conv net (seeded, so identical on every machine): offline stand-in for Inception.

    Images are resized to 64² (antialiased bilinear), mapped to [-1, 1] and passed through three
    stride-2 3×3 convolutions (32, 32, 64 channels, He-scaled Gaussian weights from a fixed seed,
    leaky ReLU). `features` is the spatial mean of every stage (128 values: colour, edges, texture
    at three scales); `logits` is a fixed random projection of the per-image standardised features
    onto 10 pseudo-classes, so IS is defined (between 1 and 10). Meant for tests and smoke runs
    where no Inception weights exist; FID computed with it is not comparable with published FID.
    """

    SEED = 20231204
    SIZE = 64
    WIDTHS = (32, 32, 64)
    NUM_LOGITS = 10

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(self.SEED)
        convs, cin = [], 3
        for width in self.WIDTHS:
            conv = nn.Conv2d(cin, width, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.copy_(torch.randn(width, generator=g) * 0.1)
            convs.append(conv)
            cin = width
        self.convs = nn.ModuleList(convs)
        dim = sum(self.WIDTHS)
        self.register_buffer("proj", torch.randn(dim, self.NUM_LOGITS, generator=g) * (3.0 / math.sqrt(dim)))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError("expecting a uint8 tensor of shape (B, 3, H, W)")
        x = x.float() / 127.5 - 1.0
        if tuple(x.shape[-2:]) != (self.SIZE, self.SIZE):
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False, antialias=True)
        pooled = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            pooled.append(x.mean(dim=(2, 3)))
        feats = torch.cat(pooled, dim=1)
        z = (feats - feats.mean(1, keepdim=True)) / (feats.std(1, keepdim=True) + 1e-6)
        out = {"features": feats, "logits": z @ self.proj}
        return tuple(out[name] for name in self.features_list)


def register_test_extractor() -> str:
    """Register `diffit-randconv-v1` with torch-fidelity (idempotent) and return its name."""
    if TEST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TEST_EXTRACTOR, RandConvFeatureExtractor)
    return TEST_EXTRACTOR


# ----------------------------------------------------------------------------------------------
# Image sources


@dataclass
class _Images:
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


def _folder_images(path: Path) -> _Images:
    files = [str(path / name) for name in folder_image_names(path)]  # the image set training reads, too
    if not files:
        raise DiffitError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under folder {path}")

    def load(f: str) -> np.ndarray:
        try:
            with Image.open(f) as img:
                return _to_rgb_array(img, f)
        except OSError as e:
            raise DiffitError(f"cannot read image {f}: {e}") from None

    return _Images(f"folder {path}", len(files), lambda size: _decoded_batches(files, load, size))


def _zip_images(path: Path) -> _Images:
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

    return _Images(f"zip {path}", len(names), batches)


def _check_image_array(shape: tuple, dtype: np.dtype, origin: str) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] < 1:
        raise DiffitError(
            f"{origin} must hold uint8 images shaped (N, H, W, 3) (the ADM evaluator's layout); "
            f"got {np.dtype(dtype).name} {tuple(shape)}"
        )


def _rgb(batch: np.ndarray) -> np.ndarray:
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


def _npz_member_images(path: Path, member: str = "arr_0") -> _Images:
    """Stream `member` of an npz in batches (works for np.savez and np.savez_compressed)."""
    shape, _, dtype = npz_header(path, member)
    _check_image_array(shape, dtype, f"{member} in {path}")
    return _Images(f"{path} ({member})", int(shape[0]),
                   lambda size: (_rgb(batch) for batch in npz_batches(path, member, size)))


def _array_images(arr) -> _Images:
    if torch.is_tensor(arr):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    _check_image_array(arr.shape, arr.dtype, "the image array")

    def batches(size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(arr), size):
            yield _rgb(np.ascontiguousarray(arr[start : start + size]))

    return _Images(f"array {tuple(arr.shape)}", len(arr), batches)


# ----------------------------------------------------------------------------------------------
# Statistics files


@dataclass
class _Stats:
    mu: np.ndarray
    sigma: np.ndarray
    extractor: str | None
    feature_layer: str | None
    num_images: int | None
    features: np.ndarray | None
    images: _Images | None  # ADM reference batches: arr_0 holds reference images
    path: Path


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DiffitError(f"{path} is not a readable .npz file: {e}") from None


def _read_stats(path: Path, keys: list[str]) -> _Stats:
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
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DiffitError(
            f"statistics file {path}: `mu` must be (D,) and `sigma` (D, D); got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DiffitError(f"statistics file {path} holds NaN or infinite values")
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
    return _Stats(mu, sigma, extractor, layer, count, features, images, path)


def read_stats(path: str | os.PathLike) -> dict:
    """Read a statistics file (EDM, ADM or :func:`save_reference` layout): mu, sigma and what else it says."""
    path = Path(path)
    if not path.is_file():
        raise DiffitError(f"statistics file not found: {path}")
    s = _read_stats(path, _npz_keys(path))
    return {
        "mu": s.mu,
        "sigma": s.sigma,
        "extractor": s.extractor,
        "feature_layer": s.feature_layer,
        "num_images": s.num_images,
        "has_features": s.features is not None,
        "has_images": s.images is not None,
    }


def _open(source, role: str, allow_stats: bool) -> _Images | _Stats:
    if isinstance(source, np.ndarray) or torch.is_tensor(source):
        return _array_images(source)
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise DiffitError(f"{role} not found: {path}")
    if path.is_dir():
        return _folder_images(path)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return _zip_images(path)
    if suffix == ".npz":
        keys = _npz_keys(path)
        if "mu" in keys or "sigma" in keys:
            if not allow_stats:
                raise DiffitError(f"{role} {path} is a statistics file (mu, sigma); {role} must be images")
            return _read_stats(path, keys)
        if "arr_0" not in keys:
            raise DiffitError(
                f"{path} has no `arr_0` (uint8 images, N×H×W×3, as the ADM evaluator reads)"
                + (" and no `mu`/`sigma` statistics" if allow_stats else "")
                + f"; it holds: {', '.join(keys) or 'nothing'}"
            )
        return _npz_member_images(path)
    kinds = "an image folder, a .zip of images or an .npz" + (" (images or mu/sigma statistics)" if allow_stats else "")
    raise DiffitError(f"{role} {path} is not {kinds}")


# ----------------------------------------------------------------------------------------------
# Feature extractors and weights


def inception_weights_cache_path() -> Path:
    """Where torch-fidelity keeps (and looks for) the Inception weights: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def _where_to_put_weights() -> str:
    return (
        f"Download {URL_INCEPTION_V3} on a machine with network, then pass --inception-weights PATH "
        f"(Python: inception_weights=PATH) or copy it to {inception_weights_cache_path()} "
        "(the torch hub cache; set TORCH_HOME to move it)."
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffitError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DiffitError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def _extractor_class(name: str):
    if name == TEST_EXTRACTOR:
        register_test_extractor()
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        known = ", ".join(sorted(FEATURE_EXTRACTORS_REGISTRY))
        raise DiffitError(f"unknown feature extractor {name!r}; registered: {known}")
    return FEATURE_EXTRACTORS_REGISTRY[name]


def _make_extractor(name: str, layers: Sequence[str], device: torch.device, weights) -> FeatureExtractorBase:
    kwargs = {}
    if weights is not None:
        path = Path(os.fspath(weights)).expanduser()
        if not path.is_file():
            raise DiffitError(f"feature-extractor weights file not found: {path}")
        try:  # refuse arbitrary pickles before torch-fidelity loads the file
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DiffitError(
                f"{path} is not a PyTorch state-dict file of {name} weights ({type(e).__name__}: {e})"
            ) from None
        kwargs["feature_extractor_weights_path"] = str(path)
    elif name == INCEPTION and not inception_weights_cache_path().is_file() and offline():
        raise DiffitError(
            "FID needs the Inception-v3 weights (torch-fidelity's inception-v3-compat, 91 MB), which are not on this "
            "machine, and downloads are off (HF_HUB_OFFLINE/DIFFIT_OFFLINE). " + _where_to_put_weights()
        )
    downloading = weights is None and name == INCEPTION and not inception_weights_cache_path().is_file()
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fe = create_feature_extractor(name, list(layers), cuda=False, verbose=downloading, **kwargs)
    except (urllib.error.URLError, TimeoutError, ConnectionError, socket.gaierror) as e:
        raise DiffitError(
            f"could not download the weights of feature extractor {name} ({e}). " + _where_to_put_weights()
        ) from None
    except Exception as e:  # a file that is not (complete) weights of this extractor
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        if weights is not None:
            raise DiffitError(f"{weights} does not hold {name} weights: {first_line}") from None
        if name == INCEPTION and inception_weights_cache_path().is_file():
            raise DiffitError(
                f"the cached Inception weights {inception_weights_cache_path()} are unreadable ({first_line}); "
                "delete the file to download it again, or pass --inception-weights PATH"
            ) from None
        raise
    return fe.to(device)


@contextlib.contextmanager
def _exact_convolutions():
    """TF32 off while extracting features, so numbers match the fp32 reference implementations."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _features(images: _Images, fe: FeatureExtractorBase, device, batch: int, progress, stage: str) -> dict:
    out: dict[str, list[torch.Tensor]] = {}
    done = 0
    if progress:
        progress(stage, 0, images.count)
    with torch.no_grad(), _exact_convolutions():
        for arr in images.batches(batch):
            x = torch.from_numpy(_rgb(arr)).permute(0, 3, 1, 2).contiguous().to(device)
            for k, v in fe.convert_features_tuple_to_dict(fe(x)).items():
                out.setdefault(k, []).append(v.detach().float().cpu())
            done += len(arr)
            if progress:
                progress(stage, done, images.count)
    return {k: torch.cat(v) for k, v in out.items()}


def _statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    s = fid_features_to_statistics(features.double())
    return {"mu": np.asarray(s["mu"], np.float64), "sigma": np.atleast_2d(np.asarray(s["sigma"], np.float64))}


def _fid(a: dict, b: dict) -> float:
    if a["mu"].shape != b["mu"].shape:
        raise DiffitError(
            f"feature sizes differ ({a['mu'].shape[0]} vs {b['mu'].shape[0]}); statistics from different extractors"
        )
    return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


# ----------------------------------------------------------------------------------------------
# Public entry points


def _parse_metrics(metrics) -> list[str]:
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    wanted = []
    for m in metrics:
        key = _ALIASES.get(str(m).strip().lower())
        if key is None:
            raise DiffitError(f"unknown metric {str(m).strip()!r}; choose from {', '.join(METRICS)}")
        if key not in wanted:
            wanted.append(key)
    if not wanted:
        raise DiffitError(f"no metric asked for; choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in wanted]


def _describe(source) -> str:
    if isinstance(source, np.ndarray) or torch.is_tensor(source):
        return f"array {tuple(source.shape)}"
    return str(source)


def compute_metrics(
    samples,
    reference=None,
    *,
    metrics: Iterable[str] | str = ("fid",),
    batch: int = 64,
    device=None,
    inception_weights=None,
    feature_extractor: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Compute FID (default), IS, KID and precision/recall of `samples` against `reference`.

    samples: an image folder, a `.zip` of images, an `.npz` with `arr_0` (uint8 N×H×W×3, the ADM
    evaluator's layout) or a uint8 NHWC array. reference: the same kinds, or a statistics `.npz`
    (`mu`, `sigma`: EDM's `cifar10-32x32.npz`, ADM's `VIRTUAL_imagenet256_labeled.npz`, or a file
    from :func:`save_reference`). IS needs no reference. metrics: names from `fid, is, kid, pr`
    (aliases: isc, prc). feature_extractor: a torch-fidelity registry name; default
    `inception-v3-compat` (TF Inception pool_3, the features behind the ADM and EDM references).
    inception_weights: a local weights file for offline machines. progress(stage, done, total) is
    called as images are processed (stage `samples` or `reference`).

    Returns a flat dict: the metric values (`fid`, `is_mean`, `is_std`, `kid_mean`, `kid_std`,
    `precision`, `recall`), then `extractor`, `feature_layers`, `num_samples`, `num_reference`,
    `reference_kind` (images | stats), `samples`, `reference`, `device`, `notes`.
    Raises DiffitError for anything the user can fix.
    """
    wanted = _parse_metrics(metrics)
    if int(batch) < 1:
        raise DiffitError(f"batch must be at least 1 (got {batch})")
    name = feature_extractor or INCEPTION
    cls = _extractor_class(name)
    dev = _device(device)
    sample_images = _open(samples, "samples", allow_stats=False)
    paired = [m for m in wanted if m != "is"]
    ref = None
    if paired:
        if reference is None:
            raise DiffitError(
                f"{' and '.join(_LABEL[m] for m in paired)} compare samples with a reference: "
                "pass --ref (images or a statistics file)"
            )
        ref = _open(reference, "reference", allow_stats=True)
    if isinstance(ref, _Stats):
        if ref.extractor is not None and ref.extractor != name:
            raise DiffitError(
                f"{ref.path} was computed with feature extractor {ref.extractor}, but this run uses {name}; "
                f"distances across extractors mean nothing "
                f"(use --feature-extractor {ref.extractor} or recompute the reference)"
            )
        need_ref_features = [m for m in paired if m != "fid"]
        if need_ref_features and ref.features is None and ref.images is None:
            what = " and ".join(_LABEL[m] for m in need_ref_features)
            raise DiffitError(
                f"{what} need reference images or features, but {ref.path} holds only "
                "mu/sigma; pass the dataset (folder, zip or npz) as the reference, or save statistics with features"
            )

    fidelity_name = {"fid": "fid", "is": "isc", "kid": "kid", "pr": "prc"}
    layers = {m: cls.get_default_feature_layer_for_metric(fidelity_name[m]) for m in wanted}
    fe = _make_extractor(name, sorted(set(layers.values())), dev, inception_weights)
    feats = _features(sample_images, fe, dev, int(batch), progress, "samples")
    n = sample_images.count

    ref_feats = None
    if isinstance(ref, _Images):
        ref_feats = _features(ref, fe, dev, int(batch), progress, "reference")
    elif isinstance(ref, _Stats) and any(m in ("kid", "pr") for m in wanted):
        if ref.features is not None:
            for m in ("kid", "pr"):
                if m in wanted and ref.feature_layer not in (None, layers[m]):
                    raise DiffitError(
                        f"{ref.path} stores {ref.feature_layer} features but {_LABEL[m]} uses {layers[m]} "
                        "with this extractor; pass the dataset as the reference"
                    )
            ref_feats = {layers[m]: torch.from_numpy(ref.features) for m in wanted if m in ("kid", "pr")}
        else:
            ref_feats = _features(ref.images, fe, dev, int(batch), progress, "reference")
    n_ref = None
    if isinstance(ref, _Images):
        n_ref = ref.count
    elif isinstance(ref, _Stats):
        n_ref = ref.num_images

    result: dict = {}
    notes: list[str] = []
    if "fid" in wanted:
        if n < 2:
            raise DiffitError("FID needs at least 2 samples")
        s_stats = _statistics(feats[layers["fid"]])
        if isinstance(ref, _Stats):
            r_stats = {"mu": ref.mu, "sigma": ref.sigma}
            if ref.mu.shape[0] != s_stats["mu"].shape[0]:
                raise DiffitError(
                    f"{ref.path} holds {ref.mu.shape[0]}-dimensional statistics (EDM/ADM files: Inception pool_3, "
                    f"2048) but feature extractor {name} gives {s_stats['mu'].shape[0]} features; "
                    "use the extractor the file was made with"
                )
            if ref.extractor is None and name != INCEPTION:
                notes.append(f"{ref.path} does not name its extractor; assumed it matches {name}")
        else:
            r_stats = _statistics(ref_feats[layers["fid"]])
        result["fid"] = _fid(s_stats, r_stats)
    if "is" in wanted:
        r = isc_features_to_metric(feats[layers["is"]], splits=max(1, min(10, n)), shuffle=True, rng_seed=SEED)
        result["is_mean"], result["is_std"] = r[KEY_METRIC_ISC_MEAN], r[KEY_METRIC_ISC_STD]
    if "kid" in wanted:
        f1, f2 = feats[layers["kid"]], ref_feats[layers["kid"]]
        _same_dim(f1, f2, "KID")
        subset = min(1000, len(f1), len(f2))
        if subset < 2:
            raise DiffitError("KID needs at least 2 samples and 2 reference images")
        r = kid_features_to_metric(f1, f2, kid_subsets=100, kid_subset_size=subset, rng_seed=SEED, verbose=False)
        result["kid_mean"], result["kid_std"] = r[KEY_METRIC_KID_MEAN], r[KEY_METRIC_KID_STD]
        if subset < 1000:
            notes.append(f"KID used subsets of {subset} (fewer than the usual 1000 images)")
    if "pr" in wanted:
        f1, f2 = feats[layers["pr"]], ref_feats[layers["pr"]]
        _same_dim(f1, f2, "precision/recall")
        if min(len(f1), len(f2)) < 4:
            raise DiffitError("precision/recall need at least 4 samples and 4 reference images (k = 3 neighbours)")
        r = prc_features_to_metric(f1, f2, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
        result["precision"], result["recall"] = r[KEY_METRIC_PRECISION], r[KEY_METRIC_RECALL]

    if name == TEST_EXTRACTOR:
        notes.append(
            f"features from {TEST_EXTRACTOR} (fixed random conv net), not Inception: "
            "not comparable with published numbers"
        )
    if "fid" in wanted and n != FID_PROTOCOL_SAMPLES:
        notes.append(
            f"{n} samples; published FID (FID-50K) uses {FID_PROTOCOL_SAMPLES:,}, and FID grows as the count shrinks"
        )
    result.update(
        extractor=name,
        feature_layers=layers,
        num_samples=n,
        num_reference=n_ref,
        reference_kind=None if ref is None else ("stats" if isinstance(ref, _Stats) else "images"),
        samples=_describe(samples),
        reference=None if reference is None else _describe(reference),
        device=str(dev),
        notes=notes,
    )
    return result


def _same_dim(f1: torch.Tensor, f2: torch.Tensor, what: str) -> None:
    if f1.shape[1] != f2.shape[1]:
        raise DiffitError(
            f"{what}: sample features have {f1.shape[1]} dims, reference features {f2.shape[1]}; different extractors"
        )


def save_reference(
    dataset,
    out_file,
    *,
    batch: int = 64,
    device=None,
    inception_weights=None,
    feature_extractor: str | None = None,
    features: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Compute `mu`/`sigma` of a dataset (folder, zip, npz or array) and save them to `out_file` (.npz).

    The file also records `extractor`, `feature_layer` and `num_images`, and with `features=True`
    the per-image features (so KID and precision/recall can run against it later). It is written
    atomically and reads back in EDM's and ADM's tools too (they read `mu` and `sigma`).
    Returns a summary dict (path, num_images, extractor, feature_layer, dim).
    """
    out = Path(os.fspath(out_file)).expanduser()
    if out.suffix.lower() != ".npz":
        raise DiffitError(f"reference statistics are saved as .npz; got {out}")
    if int(batch) < 1:
        raise DiffitError(f"batch must be at least 1 (got {batch})")
    name = feature_extractor or INCEPTION
    cls = _extractor_class(name)
    dev = _device(device)
    images = _open(dataset, "dataset", allow_stats=False)
    if images.count < 2:
        raise DiffitError("reference statistics need at least 2 images")
    layer = cls.get_default_feature_layer_for_metric("fid")
    fe = _make_extractor(name, [layer], dev, inception_weights)
    feats = _features(images, fe, dev, int(batch), progress, "reference")[layer]
    stats = _statistics(feats)
    arrays = dict(
        mu=stats["mu"],
        sigma=stats["sigma"],
        extractor=np.array(name),
        feature_layer=np.array(layer),
        num_images=np.array(images.count, dtype=np.int64),
    )
    if features:
        arrays["features"] = feats.numpy().astype(np.float32)
    atomic_write(out, lambda f: np.savez(f, **arrays))
    dim = int(stats["mu"].shape[0])
    return {"path": str(out), "num_images": images.count, "extractor": name, "feature_layer": layer, "dim": dim}
