"""The training set's FID statistics, computed once: `eval.reference: train` resolves here in `eval-fid`, `ablate`
and FID along training (EDM's fid-refs are exactly these: mu/sigma of the whole training set).

The file is written by `save_reference` (our statistics layout) under `<cache>/fid-refs/`, keyed by the data
source's fingerprint, the resolution and channels, the image count and the feature extractor; later calls with
the same key return it without reading a single image. The images are the ones training reads (the source at the
preset's resolution, no x-flip), grey ones repeated to RGB.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from diffit_cli.config import Preset
from diffit_cli.data import cache_dir, open_source, require_data
from diffit_cli.data.loader import unwrap_worker_error
from diffit_cli.data.sources import Source
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress
from diffit_cli.fid import metrics as fid_metrics  # through the module: tests and users may swap its functions
from diffit_cli.fid.extractors import canonical_extractor, check_weights_at_hand
from diffit_cli.fid.inputs import Images

TRAIN = "train"  # the `eval.reference` value that means these statistics
LATENT_NEEDS_FILE = (
    "FID of a latent model needs a reference statistics file: --set eval.reference="
    "VIRTUAL_imagenet256_labeled.npz (ADM's reference batch) or another statistics file"
)


def source_images(src: Source, count: int, num_workers: int = 0) -> Images:
    """The first `count` items of a pixel source as uint8 NHWC RGB batches (decoded by `num_workers` processes)."""

    def batches(size: int):
        subset = torch.utils.data.Subset(src, range(count))
        loader = torch.utils.data.DataLoader(subset, batch_size=size, num_workers=num_workers, shuffle=False)
        try:
            for x, _ in loader:  # (N, C, H, W) uint8
                x = x.numpy().transpose(0, 2, 3, 1)
                yield np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x
        except DiffitError as e:
            raise DiffitError(unwrap_worker_error(str(e))) from None

    return Images(src.name, count, batches)


def training_statistics(
    preset: Preset,
    *,
    feature_extractor: str,
    limit: int | None = None,
    batch: int = 64,
    inception_weights: str | None = None,
    progress=None,
) -> tuple[Path, str]:
    """(path of the cached statistics .npz, "50000 training images (torchvision:CIFAR10, 32px)") of the first
    `limit` (default: all) training images of `preset`, computed on first use with `save_reference`."""
    if preset.data.space == "latent":
        raise DiffitError(LATENT_NEEDS_FILE)
    require_data(preset)
    src = open_source(preset.data, xflip=False)
    n = len(src) if limit is None else min(int(limit), len(src))
    feature_extractor = canonical_extractor(feature_extractor)  # an alias shares its name's cached file
    res = preset.data.resolution
    what = f"{n} training images ({src.name}, {res}px)"
    key = hashlib.sha256(f"{src.fingerprint()}|{res}|{src.num_channels}|{n}|{feature_extractor}".encode())
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", feature_extractor)
    path = cache_dir() / "fid-refs" / f"{slug}-{res}px-{n}-{key.hexdigest()[:16]}.npz"
    if not path.is_file():
        check_weights_at_hand(feature_extractor, inception_weights)  # before announcing work that cannot run
        if progress is not None:
            progress(
                Message(
                    f"statistics of {what} with {feature_extractor}, once (cached in {path})",
                    data={"event": "stage", "stage": "reference", "images": n, "path": str(path)},
                )
            )
        fid_metrics.save_reference(
            source_images(src, n, preset.data.num_workers),
            path,
            feature_extractor=feature_extractor,
            batch=batch,
            inception_weights=inception_weights,
            progress=progress,
        )
    return path, what


def preset_reference(
    preset: Preset,
    *,
    feature_extractor: str,
    limit: int | None = None,
    batch: int = 64,
    inception_weights: str | None = None,
    progress: Progress | None = None,
) -> tuple[str, str]:
    """(reference to score against, its description): `eval.reference`, or for `train` the cached statistics."""
    if preset.eval.reference != TRAIN:
        return preset.eval.reference, preset.eval.reference
    path, what = training_statistics(
        preset,
        feature_extractor=feature_extractor,
        limit=limit,
        batch=batch,
        inception_weights=inception_weights,
        progress=progress,
    )
    return str(path), what
