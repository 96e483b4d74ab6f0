"""Datasets by name, behind the same `Source` interface and image rule (`pil_to_chw`: ADM crop and resize, grey
↔ RGB conversion) as folders, zips and `.npz` files:

- `torchvision:NAME[:split]` (CIFAR10, CIFAR100, MNIST, FashionMNIST, SVHN, STL10, CelebA, ...): downloaded once
  into `<cache>/torchvision` and checksum-verified by torchvision; the train split by default; class labels from
  the dataset's `targets` / `labels` when it has them.
- `hf:OWNER/NAME[:split]` through `datasets` (the `[hf]` extra), or `hf:DIR[:split]` for a folder written by
  `save_to_disk` or holding parquet / image files, or `hf:FILE.parquet`: the Arrow cache is `$HF_DATASETS_CACHE`
  when set, else `<cache>/huggingface`. The image column is the first `Image` feature and the label column the
  first `ClassLabel` feature, unless `data.image_column` / `data.label_column` name them.

Offline (`downloads.offline()`) nothing is downloaded: a dataset not in the cache is one error naming the cache
path and how to put the files there by hand.
"""

from __future__ import annotations

import abc
import importlib.util
import inspect
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffit_cli.data.catalog import HF_PREFIX, README_SECTION, TORCHVISION_PREFIX, cache_dir
from diffit_cli.data.images import DataError, pil_to_chw
from diffit_cli.data.sources import NO_LABEL, PixelSource, hash_lines
from diffit_cli.downloads import offline

OFFLINE_NOTE = "downloads are off (HF_HUB_OFFLINE / DIFFIT_OFFLINE, or no network)"
LABEL_ATTRIBUTES = ("targets", "labels", "_labels")  # where torchvision datasets keep their class indices


def split_spec(rest: str, exists=lambda s: False) -> tuple[str, str | None]:
    """`NAME[:split]` → (NAME, split or None); a NAME that `exists` on disk is never split."""
    if exists(rest) or ":" not in rest:
        return rest, None
    name, split = rest.rsplit(":", 1)
    return name, split or None


def open_named(
    spec: str,
    resolution: int,
    *,
    channels: int = 3,
    xflip: bool = False,
    skip_bad_images: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
) -> PixelSource:
    """The source of a `torchvision:` or `hf:` spec (see the module docstring)."""
    kwargs = dict(channels=channels, xflip=xflip, skip_bad_images=skip_bad_images)
    check_named(spec)
    if spec.startswith(TORCHVISION_PREFIX):
        name, split = split_spec(spec[len(TORCHVISION_PREFIX) :])
        return TorchvisionSource(name, resolution, split=split, **kwargs)
    name, split = split_spec(spec[len(HF_PREFIX) :], lambda s: Path(s).expanduser().exists())
    return HFSource(name, resolution, split=split, image_column=image_column, label_column=label_column, **kwargs)


def check_named(spec: str) -> None:
    """What can be said of a `torchvision:` or `hf:` spec without downloading or reading it: a name is given, a
    torchvision dataset of that name exists and has the split asked for, `datasets` is installed for `hf:`."""
    if spec.startswith(TORCHVISION_PREFIX):
        name, split = split_spec(spec[len(TORCHVISION_PREFIX) :])
        if not name:
            raise DataError(f"{spec!r} names no dataset; write torchvision:NAME[:split], e.g. torchvision:CIFAR10")
        cls = _torchvision_class(name)
        _torchvision_kwargs(cls, f"{TORCHVISION_PREFIX}{cls.__name__}" + (f":{split}" if split else ""), split)
        return
    name, _ = split_spec(spec[len(HF_PREFIX) :], lambda s: Path(s).expanduser().exists())
    if not name:
        raise DataError(
            f"{spec!r} names no dataset; write hf:OWNER/NAME[:split] (the Hub) or hf:DIR (a local dataset folder)"
        )
    if importlib.util.find_spec("datasets") is None:
        raise DataError(_needs_datasets(name))


class NamedSource(PixelSource):
    """A dataset object that returns PIL images, read through the shared image rule."""

    @abc.abstractmethod
    def _pil(self, i: int) -> Image.Image:
        """Stored image i as PIL."""

    def _decode(self, i: int) -> np.ndarray:
        image = self._pil(i)
        try:
            return pil_to_chw(image, self.resolution, self.num_channels)
        finally:
            image.close()

    def fingerprint(self) -> str:
        return hash_lines([f"{self.name}:{self.raw_count}:{self._content_id}"], self._raw_labels)


# --------------------------------------------------------------------------------------------- torchvision
def _torchvision_class(name: str):
    import torchvision.datasets as tvd  # here, not at the top: torchvision is slow to import and only these need it

    classes = {
        k: v
        for k, v in vars(tvd).items()
        if inspect.isclass(v)
        and issubclass(v, tvd.VisionDataset)
        and not issubclass(v, tvd.DatasetFolder)
        and v is not tvd.VisionDataset
    }  # folders: --data DIR
    found = classes.get(name) or next((v for k, v in classes.items() if k.lower() == name.lower()), None)
    if found is None:
        raise DataError(
            f"torchvision has no dataset {name!r}; image datasets that suit a preset: CIFAR10, "
            "CIFAR100, MNIST, FashionMNIST, KMNIST, SVHN, STL10, CelebA, Flowers102 (torchvision:NAME)"
        )
    return found


def _torchvision_kwargs(cls, name: str, split: str | None) -> dict[str, Any]:
    """The constructor arguments that pick `split` of torchvision dataset `cls` (train by default)."""
    params = inspect.signature(cls.__init__).parameters
    if "root" not in params:
        raise DataError(f"torchvision's {cls.__name__} keeps no files (it has no root folder); name a dataset")
    kwargs: dict[str, Any] = {}
    if "train" in params:
        if split not in (None, "train", "test"):
            raise DataError(f"{name}: torchvision's {cls.__name__} has the splits train and test")
        kwargs["train"] = split != "test"
    elif "split" in params:
        kwargs["split"] = split or "train"
    elif split:
        raise DataError(f"{name}: torchvision's {cls.__name__} has no splits; drop ':{split}'")
    if "target_type" in params:
        kwargs["target_type"] = []  # CelebA: attributes and boxes are no classes; images only
    return kwargs


def _by_hand(cls, root: Path) -> str:
    """How to put a torchvision dataset's files into the cache without torchvision's download."""
    if getattr(cls, "url", None) and getattr(cls, "filename", None):
        return f"download {cls.url} and extract {cls.filename} into {root}"
    mirrors, resources = getattr(cls, "mirrors", None), getattr(cls, "resources", None)
    if mirrors and resources:
        files = ", ".join(r[0] for r in resources)
        return f"download {files} from {mirrors[0]} into {root / cls.__name__ / 'raw'}"
    return f"place the files torchvision's datasets.{cls.__name__} expects under {root}"


class TorchvisionSource(NamedSource):
    """`torchvision:NAME[:split]`: a torchvision dataset in `<cache>/torchvision`, the train split by default."""

    def __init__(
        self,
        dataset: str,
        resolution: int,
        *,
        split: str | None = None,
        channels: int = 3,
        xflip: bool = False,
        skip_bad_images: bool = False,
    ):
        super().__init__(resolution, channels, xflip, skip_bad_images)
        cls = _torchvision_class(dataset)
        self.root = cache_dir() / "torchvision"
        self.name = f"{TORCHVISION_PREFIX}{cls.__name__}" + (f":{split}" if split else "")
        params = inspect.signature(cls.__init__).parameters
        kwargs = _torchvision_kwargs(cls, self.name, split)
        download = not offline()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._ds = (
                cls(str(self.root), download=download, **kwargs)
                if "download" in params
                else cls(str(self.root), **kwargs)
            )
        except (RuntimeError, OSError, ValueError) as e:  # missing or corrupt files, no network, a failed download
            folder = self.root / getattr(cls, "base_folder", cls.__name__)
            if folder.exists() and not download:
                raise DataError(
                    f"{self.name}: the files in {folder} are incomplete or fail torchvision's checksum "
                    f"check; delete {folder} and rerun with downloads on, or {_by_hand(cls, self.root)}"
                ) from None
            why = (
                OFFLINE_NOTE if not download else f"torchvision could not get it ({str(e).strip() or type(e).__name__})"
            )
            raise DataError(
                f"{self.name} is not in the cache {self.root} and {why}; {_by_hand(cls, self.root)}, "
                f"then rerun (torchvision checks the files' checksums; see {README_SECTION})"
            ) from None
        self._raw_labels, self.class_names = self._read_labels()
        self._content_id = str(kwargs)

    def _read_labels(self) -> tuple[np.ndarray, tuple[str, ...]]:
        n = len(self._ds)
        values = next((getattr(self._ds, a) for a in LABEL_ATTRIBUTES if hasattr(self._ds, a)), None)
        try:
            labels = np.asarray(values, dtype=np.int64).reshape(-1) if values is not None else None
        except (TypeError, ValueError):
            labels = None
        if labels is None or len(labels) != n or labels.max(initial=-1) < 0:
            return np.full(n, NO_LABEL, np.int64), ()
        labels = np.where(labels < 0, NO_LABEL, labels)  # STL10's unlabeled split marks -1
        names = list(getattr(self._ds, "classes", None) or [])
        if len(names) <= labels.max():
            names = [str(k) for k in range(int(labels.max()) + 1)]
        return labels, tuple(str(c) for c in names)

    def _pil(self, i: int) -> Image.Image:
        return self._ds[i][0]


# ------------------------------------------------------------------------------------------- Hugging Face
def _needs_datasets(name: str) -> str:
    return f"hf:{name} needs the `datasets` library: pip install 'diffit-cli[hf]'"


def _hf_cache() -> Path:
    return Path(os.environ["HF_DATASETS_CACHE"]) if os.environ.get("HF_DATASETS_CACHE") else cache_dir() / "huggingface"


def _load_hf(name: str, split: str):
    """A `datasets.Dataset`: a save_to_disk folder, a local parquet file or data folder, or a Hub dataset."""
    try:
        import datasets  # here, not at the top: `datasets` is an optional extra, slow to import
    except ImportError:
        raise DataError(_needs_datasets(name)) from None
    path = Path(name).expanduser()
    cache = str(_hf_cache())
    if offline():  # the Hub client reads its switch at import; DIFFIT_OFFLINE must reach it too
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"hf:{name} has no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
            return ds
        if path.is_file() and path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache)
        return datasets.load_dataset(str(path) if path.exists() else name, split=split, cache_dir=cache)
    except DataError:
        raise
    except (ConnectionError, FileNotFoundError, ValueError, OSError) as e:
        if path.exists():
            raise DataError(f"cannot read hf:{name} as a dataset: {e}") from None
        why = OFFLINE_NOTE if offline() else f"it could not be loaded ({str(e).strip() or type(e).__name__})"
        raise DataError(
            f"hf:{name} (split {split}) is not in the cache {cache} and {why}; run once with internet "
            f"access, or on a machine that has it run `datasets.load_dataset({name!r}, split={split!r})"
            f".save_to_disk(DIR)`, copy DIR here and pass --data hf:DIR (see {README_SECTION})"
        ) from None


def _find_column(ds, wanted: str | None, feature_type, role: str, key: str) -> str | None:
    columns = list(ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"{role} column {wanted!r} (data.{key}) is not in the dataset; its columns: {', '.join(columns)}"
            )
        return wanted
    return next((c for c in columns if isinstance(ds.features[c], feature_type)), None)


class HFSource(NamedSource):
    """`hf:OWNER/NAME[:split]` or `hf:DIR[:split]`: a Hugging Face dataset's image column (and class labels)."""

    def __init__(
        self,
        dataset: str,
        resolution: int,
        *,
        split: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        channels: int = 3,
        xflip: bool = False,
        skip_bad_images: bool = False,
    ):
        import datasets  # here, not at the top: `datasets` is an optional extra, slow to import

        super().__init__(resolution, channels, xflip, skip_bad_images)
        split = split or "train"
        self.name = f"{HF_PREFIX}{dataset}" + (f":{split}" if split != "train" else "")
        ds = _load_hf(dataset, split)
        image = _find_column(ds, image_column, datasets.Image, "image", "image_column")
        if image is None:
            raise DataError(
                f"{self.name} has no image column (columns: {', '.join(ds.column_names)}); name it with "
                "--set data.image_column=COLUMN"
            )
        label = _find_column(ds, label_column, datasets.ClassLabel, "label", "label_column")
        if label is None:
            self._raw_labels, self.class_names = np.full(len(ds), NO_LABEL, np.int64), ()
        else:
            try:
                self._raw_labels = np.asarray(ds.with_format("numpy")[label], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                raise DataError(
                    f"{self.name}: label column {label!r} does not hold class indices "
                    f"({ds.features[label]}); name another with --set data.label_column=..."
                ) from None
            feature = ds.features[label]
            self.class_names = (
                tuple(feature.names)
                if isinstance(feature, datasets.ClassLabel)
                else tuple(str(k) for k in range(int(self._raw_labels.max(initial=-1)) + 1))
            )
        self.image_column = image
        self._ds = ds.select_columns([image])
        self._content_id = getattr(ds, "_fingerprint", "")  # datasets' own hash of the data and its processing

    def _pil(self, i: int) -> Image.Image:
        value = self._ds[i][self.image_column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"])
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
