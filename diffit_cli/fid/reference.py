"""FID reference statistics of a preset's training data, computed once and cached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from diffit_cli.config import Preset
from diffit_cli.data import open_source
from diffit_cli.errors import DiffitError
from diffit_cli.fid.metrics import save_reference


def training_statistics(preset: Preset, *, feature_extractor: str, limit: int | None = None, batch: int = 64,
                        inception_weights: str | None = None, progress=None) -> tuple[Path, str]:
    """(statistics file, description) of the preset's training images (the first `limit`, or all), cached under
    $DIFFIT_CACHE (default ~/.cache/diffit)/reference, keyed by the data, its resolution, the count and extractor."""
    if preset.data.space == "latent":
        raise DiffitError("FID of a latent model needs a reference: --set eval.reference=VIRTUAL_imagenet256_"
                          "labeled.npz (ADM's reference batch) or another statistics file")
    src = open_source(preset.data)
    n = len(src) if limit is None else min(limit, len(src))
    key = hashlib.sha256(f"{src.fingerprint()}|{preset.data.resolution}|{n}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("DIFFIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "diffit")
    path = root.expanduser() / "reference" / f"{feature_extractor}-{key}.npz"
    if not path.is_file():
        dataset = preset.data.path if (preset.data.path is not None and limit is None) else \
            np.stack([src[i][0].numpy().transpose(1, 2, 0) for i in range(n)])  # uint8 NHWC
        save_reference(dataset, path, feature_extractor=feature_extractor, batch=batch,
                       inception_weights=inception_weights, progress=progress)
    return path, f"{n} training images ({src.name}, {preset.data.resolution}px)"
