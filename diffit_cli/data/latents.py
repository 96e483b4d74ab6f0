"""Latent shards written by `diffit encode-latents`: shard files, the manifest, the source and latent sampling.

A shard holds the SD-VAE posterior statistics of each image and of its mirror, (N, 2, 2, C, h, w): axis 1 is
mean / std, axis 2 the image / its horizontal mirror; `sample_latent` turns a batch into model-space latents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from diffit_cli.data.images import DataError, check_resolution
from diffit_cli.data.sources import Source
from diffit_cli.fileio import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
LATENT_FORMAT = "diffit-latents"
LATENT_FORMAT_VERSION = 1
DEFAULT_LATENT_SCALE = 0.18215


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(
    path: str | Path, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype = torch.float16
) -> None:
    """Atomically write one latent shard: `mean`, `std` (N, 2, C, h, w) in `dtype`, `labels` (N,) int64."""

    if mean.shape != std.shape or mean.ndim != 5 or mean.shape[1] != 2 or labels.shape != mean.shape[:1]:
        raise ValueError(
            f"bad shard shapes: mean {tuple(mean.shape)}, std {tuple(std.shape)}, labels {tuple(labels.shape)}"
        )
    tensors = {
        "mean": mean.to(dtype).contiguous(),
        "std": std.to(dtype).contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
    }
    # one metadata key only: safetensors writes metadata from a hash map, so several keys come out in a
    # random order and identical shards would differ in bytes
    atomic_write_bytes(path, save(tensors, metadata={"format": f"{LATENT_FORMAT}/{LATENT_FORMAT_VERSION}"}))


def shard_count(path: str | Path) -> int | None:
    """Number of items in a complete shard file, or None when it is missing or unreadable."""

    try:
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("labels").get_shape()[0]
            ok = (f.metadata() or {}).get("format", "").startswith(LATENT_FORMAT) and f.get_slice("mean").get_shape()[
                0
            ] == f.get_slice("std").get_shape()[0] == n
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
        raise DataError(
            f"{str(path)!r} has latent format version {manifest['version']}; this diffit reads "
            f"up to {LATENT_FORMAT_VERSION} (upgrade diffit)"
        )
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
            raise DataError(
                f"latent folder {self.name!r} is incomplete (encoding was interrupted); rerun the "
                "same `diffit encode-latents` command to finish it"
            )
        self.resolution = int(m["resolution"])
        if resolution is not None and check_resolution(resolution) != self.resolution:
            raise DataError(
                f"latents in {self.name!r} were encoded at {self.resolution}² but {resolution}² is "
                f"wanted; run `diffit encode-latents SRC OUT --resolution {resolution}`"
            )
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

        out = []
        for f in self.shards:
            try:
                with safe_open(str(self.root / f), framework="np") as h:
                    out.append(h.get_tensor("labels"))
            except Exception as e:
                raise DataError(
                    f"cannot read latent shard {str(self.root / f)!r}: {e}; rerun `diffit encode-latents` to rewrite it"
                ) from None
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


def sample_latent(
    stats: torch.Tensor,
    *,
    scale: float = DEFAULT_LATENT_SCALE,
    xflip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
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
