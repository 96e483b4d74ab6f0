"""Opening a source by config or path, and the deterministic, resumable loader of global batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from diffit_cli.data.catalog import check_path, has_data, is_named, missing_data_message
from diffit_cli.data.images import DataError, check_resolution
from diffit_cli.data.latents import MANIFEST_NAME, LatentShardSource
from diffit_cli.data.named import check_named, open_named
from diffit_cli.data.sources import ImageFolderSource, NpzSource, Source, ZipSource
from diffit_cli.data.synthetic import SYNTHETIC_SIZE, SyntheticShapes
from diffit_cli.preemption import shielded_workers


def check_source(data: Any) -> None:
    """What `open_source` would refuse in a `DataConfig`'s `path` before reading or downloading anything: a malformed
    or unknown dataset name (`named.check_named`), a path that does not exist or is no kind of data diffit reads
    (`catalog.check_path`). An empty path is for `catalog.require_data` to judge."""
    if data.path is None:
        return
    if is_named(data.path):
        check_named(str(data.path))
    else:
        check_path(data.path)


def open_source(
    data: Any = None,
    resolution: int | None = None,
    *,
    channels: int | None = None,
    xflip: bool | None = None,
    skip_bad_images: bool = False,
    synthetic_size: int = SYNTHETIC_SIZE,
    synthetic_seed: int = 0,
    synthetic_style: str | None = None,
) -> Source:
    """Open the source named by a `DataConfig`, a path or dataset name, or None (built-in synthetic shapes).

    Path → latent shards (a folder with manifest.json), image folder, `.zip` or `.npz`; `torchvision:NAME[:split]`
    and `hf:...` → `named.open_named`. A `DataConfig` uses the built-in shapes only when its `synthetic` names a
    style and its `path` is empty; with neither it is the no-data error (`catalog.missing_data_message`). Explicit
    keyword arguments override the config's values. For `space: latent` presets with an image path, the returned
    pixel source yields RGB images for on-the-fly VAE encoding.
    """
    use_labels, columns = False, {}
    if data is not None and not isinstance(data, (str, os.PathLike)):  # a DataConfig (duck-typed)
        cfg = data
        if not has_data(cfg):
            raise DataError(missing_data_message(None, cfg))
        data, use_labels = cfg.path, cfg.use_labels
        columns = dict(image_column=cfg.image_column, label_column=cfg.label_column)
        synthetic_style = synthetic_style or cfg.synthetic
        resolution = cfg.resolution if resolution is None else resolution
        if channels is None:
            channels = cfg.channels if cfg.space == "pixel" else 3
        if xflip is None:
            xflip = cfg.xflip and cfg.space == "pixel"
    if resolution is not None:
        resolution = check_resolution(resolution)
    channels = 3 if channels is None else channels
    xflip = bool(xflip)
    kwargs = dict(channels=channels, xflip=xflip, skip_bad_images=skip_bad_images)

    if data is None:
        src: Source = SyntheticShapes(
            resolution or 32,
            channels=channels,
            size=synthetic_size,
            seed=synthetic_seed,
            xflip=xflip,
            style=synthetic_style or "varied",
        )
    else:
        src = _open_stored(data, resolution, kwargs, columns)
    if use_labels and src.num_classes == 0:
        raise DataError(
            f"data.use_labels is true but {src.name!r} has no class labels (put each class in its "
            "own subfolder, add dataset.json labels / arr_1, name data.label_column, or set "
            "data.use_labels=false)"
        )
    return src


def _open_stored(data, resolution: int | None, kwargs: dict, columns: dict) -> Source:
    """A dataset by name, or by path: latent shards (a folder with manifest.json), image folder, `.zip` or `.npz`."""
    if is_named(data):
        if resolution is None:
            raise DataError(f"opening {data!r} needs a resolution")
        return open_named(str(data), resolution, **kwargs, **columns)
    path = check_path(data)  # exists, and is a folder, .zip or .npz
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return LatentShardSource(path, resolution)
    if resolution is None:
        raise DataError(f"opening {str(path)!r} needs a resolution")
    if path.is_dir():
        return ImageFolderSource(path, resolution, **kwargs)
    if path.suffix.lower() == ".zip":
        return ZipSource(path, resolution, **kwargs)
    return NpzSource(path, resolution, **kwargs)  # .npz: check_path refused every other kind


class StreamBatchSampler(torch.utils.data.Sampler):
    """This rank's part of an endless, deterministic stream of global batches.

    The global stream concatenates epochs; epoch e is a permutation of the dataset drawn from (seed, e)
    (or the identity when not shuffling). Global batch j covers stream positions [j·B, (j+1)·B) counted
    from `start`; rank r takes the contiguous slice [r·B/W, (r+1)·B/W). A run resumed at `start` = samples
    already consumed sees exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ):
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
            self._perms[epoch] = (
                np.random.default_rng((self.seed, epoch)).permutation(self.n) if self.shuffle else np.arange(self.n)
            )
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


def unwrap_worker_error(message: str) -> str:
    """DataLoader re-raises worker errors with the whole traceback in the message; keep our message."""
    key = "DataError: "
    if message.startswith("Caught ") and key in message:
        return message[message.rfind(key) + len(key) :].strip()
    return message


class InfiniteLoader:
    """Endless iterator of this rank's batches `(x, labels)`; `position` = global samples consumed.

    Iterating again (or after `load_state_dict`) restarts the stream at `position`.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        start_index: int = 0,
        shuffle: bool = True,
        prefetch_factor: int = 4,
    ):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.local_batch = self.batch_size // max(world_size, 1)
        self.position = int(start_index)
        self.sampler = StreamBatchSampler(
            len(dataset),
            self.batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            start=start_index,
        )
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin,
            persistent_workers=False,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=shielded_workers(),
            # the loader draws its worker base seed from this generator, never from the global RNG
            generator=torch.Generator().manual_seed(seed),
        )

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
                raise DataError(unwrap_worker_error(str(e))) from None
            self.position += self.batch_size
            yield batch


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    pin_memory: bool | None = None,
    start_index: int = 0,
    shuffle: bool = True,
) -> InfiniteLoader:
    """An endless, deterministic loader of this rank's share (batch_size / world_size) of each global batch.

    `batch_size` is the global batch of one loader step (use per-GPU batch × world size with gradient
    accumulation); `start_index` = global samples already consumed (resume); pinned memory defaults to
    CUDA availability.
    """
    return InfiniteLoader(
        dataset,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        start_index=start_index,
        shuffle=shuffle,
    )
