"""Data: sources of training images and latents, and the deterministic, resumable loader.

- `images`: reading stored images, shared with FID (one extension list, one hidden-file rule, one `.npz` reader);
- `sources`: the `Source` interface and the folder / zip / `.npz` sources;
- `named`: datasets by name (`torchvision:NAME`, `hf:OWNER/NAME`); `catalog`: the cache folder, the no-data error
  and the preparation steps of the paper's datasets;
- `synthetic`: the built-in procedural shapes; `latents`: the shard format of `diffit encode-latents`;
- `loader`: `check_source` (what can be refused before reading), `open_source` (config or path → source) and
  `make_loader` (endless keyed batches).
"""

from diffit_cli.data.catalog import cache_dir, is_named, missing_data_message, require_data
from diffit_cli.data.images import (
    IMAGE_EXTENSIONS,
    DataError,
    center_crop_arr,
    folder_image_names,
    is_image_name,
    normalize_pixels,
    npz_batches,
    npz_header,
    npz_member,
    zip_image_names,
)
from diffit_cli.data.latents import (
    DEFAULT_LATENT_SCALE,
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    MANIFEST_NAME,
    LatentShardSource,
    read_manifest,
    sample_latent,
    shard_count,
    shard_name,
    write_manifest,
    write_shard,
)
from diffit_cli.data.loader import InfiniteLoader, StreamBatchSampler, check_source, make_loader, open_source
from diffit_cli.data.named import HFSource, TorchvisionSource
from diffit_cli.data.sources import NO_LABEL, SKIP_HINT, ImageFolderSource, NpzSource, PixelSource, Source, ZipSource
from diffit_cli.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_SIZE, SYNTHETIC_STYLES, SyntheticShapes

__all__ = [
    "cache_dir",
    "is_named",
    "missing_data_message",
    "require_data",
    "HFSource",
    "TorchvisionSource",
    "IMAGE_EXTENSIONS",
    "DataError",
    "center_crop_arr",
    "folder_image_names",
    "is_image_name",
    "npz_batches",
    "npz_header",
    "npz_member",
    "normalize_pixels",
    "zip_image_names",
    "DEFAULT_LATENT_SCALE",
    "LATENT_FORMAT",
    "LATENT_FORMAT_VERSION",
    "MANIFEST_NAME",
    "LatentShardSource",
    "read_manifest",
    "sample_latent",
    "shard_count",
    "shard_name",
    "write_manifest",
    "write_shard",
    "InfiniteLoader",
    "StreamBatchSampler",
    "check_source",
    "make_loader",
    "open_source",
    "NO_LABEL",
    "SKIP_HINT",
    "ImageFolderSource",
    "NpzSource",
    "PixelSource",
    "Source",
    "ZipSource",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SIZE",
    "SYNTHETIC_STYLES",
    "SyntheticShapes",
]
