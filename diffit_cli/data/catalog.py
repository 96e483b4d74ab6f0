"""Where datasets live and how to get them: the cache folder, the `data.path` forms, and the preparation steps of
the paper's datasets that the no-data error gives (README "Getting the data" says the same at length)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffit_cli.data.images import DataError

TORCHVISION_PREFIX, HF_PREFIX = "torchvision:", "hf:"
README_SECTION = 'README "Getting the data"'
DATA_FORMS = (
    "--data torchvision:NAME (CIFAR10, MNIST, ...), --data hf:OWNER/NAME[:split] (Hugging Face, "
    "pip install 'diffit-cli[hf]'), an image folder (class = first-level subfolder), an EDM dataset_tool "
    ".zip, an .npz (arr_0 uint8 NHWC), or a latent folder from `diffit encode-latents`"
)

# What each paper preset trains on and how to get it, end to end (one line each, joined into the error).
PREPARATION = {
    "cifar10": (
        "CIFAR-10: 50,000 32×32 RGB images, 10 classes. `--data torchvision:CIFAR10` downloads it once "
        "(163 MB, checksums verified) into {cache}/torchvision; or EDM's zip: `python dataset_tool.py "
        "--source=cifar-10-python.tar.gz --dest=cifar10-32x32.zip` then `--data cifar10-32x32.zip`"
    ),
    "ffhq64": (
        "FFHQ-64: the 70,000 FFHQ faces at 64×64. Download FFHQ's images1024x1024 (github.com/NVlabs/"
        "ffhq-dataset), then either EDM's zip: `python dataset_tool.py --source=images1024x1024 "
        "--dest=ffhq-64x64.zip --resolution=64x64` and `--data ffhq-64x64.zip`, or a folder of 64×64 PNGs "
        "(`--data /data/ffhq64/`; larger images are centre-cropped and resized, but slowly), or a Hub copy "
        "`--data hf:OWNER/NAME`"
    ),
    "imagenet256": (
        "ImageNet-256: the ILSVRC-2012 train folder (1,281,167 JPEGs in 1,000 class subfolders, about "
        "140 GB) encoded once to SD-VAE latents: `diffit encode-latents /data/imagenet/train "
        "/data/latents/in256 --resolution 256` (about 42 GB), then `--data /data/latents/in256`"
    ),
    "imagenet512": (
        "ImageNet-512: the ILSVRC-2012 train folder (1,281,167 JPEGs in 1,000 class subfolders) encoded "
        "once to SD-VAE latents: `diffit encode-latents /data/imagenet/train /data/latents/in512 "
        "--resolution 512` (about 168 GB), then `--data /data/latents/in512`"
    ),
}


def cache_dir() -> Path:
    """Where downloaded datasets and training-set statistics go: $DIFFIT_CACHE, else $XDG_CACHE_HOME/diffit, else
    ~/.cache/diffit."""
    if os.environ.get("DIFFIT_CACHE"):
        return Path(os.environ["DIFFIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "diffit"


def is_named(path: Any) -> bool:
    """Whether `data.path` names a dataset (torchvision:NAME, hf:...) rather than a file or folder."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith((TORCHVISION_PREFIX, HF_PREFIX))


def has_data(data: Any) -> bool:
    """Whether a DataConfig says where its images come from: a path, or the built-in shapes by name."""
    return data.path is not None or data.synthetic is not None


def missing_data_message(preset_name: str | None, data: Any) -> str:
    """The no-data error: what the preset needs, the ways to supply it, and where to read more."""
    steps = PREPARATION.get(preset_name or "")
    who = f"preset {preset_name!r}" if preset_name else "this preset"
    need = (
        steps.format(cache=cache_dir())
        if steps
        else (
            f"{data.resolution}×{data.resolution} images"
            + (" with class labels" if data.use_labels else "")
            + f": pass {DATA_FORMS}"
        )
    )
    return (
        f"{who} names no training data (data.path is empty; the built-in shapes are used only when "
        f"data.synthetic names a style). It needs {need}; see {README_SECTION}"
    )


def check_path(path: str | os.PathLike) -> Path:
    """A `data.path` that names no dataset must exist and be a kind of data diffit reads: a folder (images, or latent
    shards with manifest.json), a `.zip` or a `.npz`. Returns the path with `~` expanded."""
    found = Path(path).expanduser()
    if not found.exists():
        raise DataError(f"data path {str(found)!r} does not exist; pass {DATA_FORMS} (see {README_SECTION})")
    if not (found.is_dir() or found.suffix.lower() in (".zip", ".npz")):
        raise DataError(
            f"cannot tell what {str(found)!r} is: pass an image folder, a .zip, a .npz, a "
            "latent folder (with manifest.json), torchvision:NAME or hf:OWNER/NAME"
        )
    return found


def require_data(preset: Any) -> None:
    """Raise the no-data error when a preset names neither data nor the built-in shapes (before anything is built)."""
    if not has_data(preset.data):
        raise DataError(missing_data_message(preset.name, preset.data))
