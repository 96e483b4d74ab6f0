"""Encode an image dataset into SD-VAE latent shards (`diffit encode-latents`).

For every image (ADM centre crop at `resolution`) and its horizontal mirror the VAE posterior mean and
std are stored, so training draws a fresh latent sample and a random mirror at each use (EDM2-style,
not one frozen sample as in fast-DiT). Output folder:

    manifest.json            format, VAE id + content hash, scaling factor, resolution, latent shape,
                             crop, count, class names, dtype, shard size, shard list, source fingerprint
    shard-00000.safetensors  mean, std (N, 2, C, h, w) [index 1 = mirror], labels (N,) int64 (-1: none)

Work is split by shard across Accelerate processes (shard k → process k mod world). Each shard is
written atomically, so an interrupted run leaves only complete shards; rerunning the same command skips
them and produces the same bytes as an uninterrupted run. The manifest is written first with
`"complete": false` (a rerun with different settings is refused) and finalised by the main process.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from diffit_cli.codecs import DEFAULT_VAE, VAECodec
from diffit_cli.data import (
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    MANIFEST_NAME,
    DataError,
    is_named,
    open_source,
    read_manifest,
    shard_count,
    shard_name,
    write_manifest,
    write_shard,
)
from diffit_cli.data.loader import unwrap_worker_error
from diffit_cli.events import Message, Progress, Start, Step, quiet
from diffit_cli.fileio import check_writable, new_output
from diffit_cli.preemption import Preempted, preemption_signals, shielded_workers

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# Settings that must agree between a partial output folder and the command that resumes it.
PLAN_KEYS = (
    "source",
    "vae",
    "scaling_factor",
    "resolution",
    "latent_channels",
    "latent_size",
    "crop",
    "count",
    "dtype",
    "shard_size",
    "class_names",
)


def encode_latents(
    src: str | Path | None,
    out_dir: str | Path,
    *,
    resolution: int = 256,
    vae: Any = DEFAULT_VAE,
    batch: int = 32,
    precision: str = "fp32",
    shard_size: int = 1024,
    dtype: str = "fp16",
    num_workers: int = 4,
    skip_bad_images: bool = False,
    max_images: int | None = None,
    device: str | torch.device | None = None,
    synthetic_size: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Encode `src` (image folder, .zip, .npz; None = built-in synthetic shapes) into `out_dir`.

    Returns the final manifest. Resumable and idempotent (see the module docstring). `vae` is a Hub id, a
    folder, a .safetensors file or an `AutoencoderKL`; `precision` fp32|bf16 is the VAE compute precision,
    `dtype` fp16|fp32 the storage type. Latents of other settings in `out_dir` are refused (the changed settings
    listed) unless `force`, which replaces them.
    """
    device = _check_settings(src, resolution, batch, shard_size, dtype, num_workers, max_images, device)
    out = check_writable(out_dir, folder=True)  # a file in the way: said now, not after the VAE is loaded
    state = PartialState(cpu=device is not None and device.type == "cpu")
    dev = state.device if device is None else device
    if dev.type == state.device.type and dev.index is None:  # `--device cuda` under accelerate: this rank's GPU
        dev = state.device
    source, count = _open_images(src, resolution, skip_bad_images, synthetic_size, max_images)  # the input first
    codec = VAECodec(vae, device=dev, precision=precision)  # then the VAE
    if resolution % codec.downsample:
        raise DataError(f"--resolution {resolution} is not a multiple of the VAE's {codec.downsample}× downsampling")
    plan = _plan(source, codec, resolution, count, dtype, shard_size)
    # a new output that fails before its first shard (e.g. a corrupt image) leaves nothing
    with new_output(out, keep=lambda: any(out.glob(shard_name(0).replace("00000", "*"))), owner=state.is_main_process):
        return _encode(
            source,
            codec,
            plan,
            out,
            state,
            force=force,
            dtype=DTYPES[dtype],
            batch=batch,
            num_workers=num_workers,
            progress=progress,
        )


def _check_settings(src, resolution, batch, shard_size, dtype, num_workers, max_images, device) -> torch.device | None:
    """The settings checked before anything is opened; the device asked for, parsed (None: Accelerate's)."""
    if dtype not in DTYPES:
        raise DataError(f"--dtype must be fp16 or fp32, got {dtype!r}")
    if resolution % 8 or resolution < 8:
        raise DataError(f"--resolution {resolution} must be a positive multiple of 8 (the SD VAE downsamples 8×)")
    if batch < 1 or shard_size < 1:
        raise DataError("--batch and --shard-size must be positive")
    if num_workers < 0 or (max_images is not None and max_images < 1):
        raise DataError("--workers must be 0 or more and --max-images at least 1")
    try:
        device = None if device is None else torch.device(device)
    except RuntimeError:
        raise DataError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if src is not None and not is_named(src) and not Path(src).exists():
        raise DataError(
            f"source {str(src)!r} does not exist; pass an image folder, .zip, .npz, torchvision:NAME or hf:OWNER/NAME"
        )
    return device


def _open_images(src, resolution: int, skip_bad_images: bool, synthetic_size: int | None, max_images: int | None):
    """The image source and how many of its images to encode."""
    source = open_source(
        src,
        resolution,
        channels=3,
        skip_bad_images=skip_bad_images,
        **({"synthetic_size": synthetic_size} if synthetic_size else {}),
    )
    if source.kind != "pixel":
        raise DataError(f"{str(src)!r} already holds latents; encode-latents needs images")
    count = len(source) if max_images is None else min(len(source), max_images)
    if count < 1:
        raise DataError("nothing to encode (--max-images must be at least 1)")
    return source, count


def _plan(source, codec: VAECodec, resolution: int, count: int, dtype: str, shard_size: int) -> dict:
    """The manifest of this encoding before any shard is written (`complete` false, no shards listed)."""
    return {
        "format": LATENT_FORMAT,
        "version": LATENT_FORMAT_VERSION,
        "complete": False,
        "source": {"name": source.name, "fingerprint": source.fingerprint()},
        "vae": {"id": codec.vae_id, "hash": codec.content_hash},
        "scaling_factor": codec.scaling_factor,
        "resolution": resolution,
        "latent_channels": codec.latent_channels,
        "latent_size": resolution // codec.downsample,
        "crop": "adm-center-crop",
        "mirror": True,
        "count": count,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "dtype": {"fp16": "float16", "fp32": "float32"}[dtype],
        "shard_size": shard_size,
        "shards": [],
    }


def _encode(
    source,
    codec: VAECodec,
    plan: dict,
    out: Path,
    state: PartialState,
    *,
    force: bool,
    dtype: torch.dtype,
    batch: int,
    num_workers: int,
    progress: Progress | None,
) -> dict:
    """The manifest (refusing another plan), this process's missing shards, then the final manifest."""
    count, shard_size, n_shards = plan["count"], plan["shard_size"], math.ceil(plan["count"] / plan["shard_size"])
    existing = read_manifest(out) if (out / MANIFEST_NAME).exists() else None
    # every process checks, so a refusal never leaves others waiting at a barrier
    replace = existing is not None and _changed_plan(existing, plan, out, force)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".shard-*.tmp-*"):  # leftovers of a killed run
            tmp.unlink(missing_ok=True)
        if replace:  # --force: the other plan's shards go, this plan starts from nothing
            for f in out.glob(shard_name(0).replace("00000", "*")):
                f.unlink()
        if existing is None or replace:
            write_manifest(out, plan)
    state.wait_for_everyone()

    mine = list(range(state.process_index, n_shards, state.num_processes))
    sizes = {k: min(shard_size, count - k * shard_size) for k in mine}
    report = _Reporter(progress if state.is_main_process else None, sum(sizes.values()), len(mine))
    todo = []
    for k in mine:
        if shard_count(out / shard_name(k)) == sizes[k]:
            report.shard(sizes[k], skipped=True)
        else:
            todo.append(k)
    with preemption_signals(lambda text: report.emit(Message(text, "warning"))) as caught:  # stops after the shard
        _encode_shards(source, codec, todo, shard_size, sizes, out, dtype, batch, num_workers, report, caught)
    state.wait_for_everyone()

    manifest = dict(
        plan,
        complete=True,
        shards=[{"file": shard_name(k), "count": min(shard_size, count - k * shard_size)} for k in range(n_shards)],
    )
    if state.is_main_process:
        missing = [s["file"] for s in manifest["shards"] if shard_count(out / s["file"]) != s["count"]]
        if missing:
            raise DataError(f"shards {missing[:3]} are missing or incomplete in {str(out)!r}; rerun the command")
        write_manifest(out, manifest)
    state.wait_for_everyone()
    return manifest


def _plan_value(manifest: dict, key: str) -> Any:
    value = manifest.get(key)
    if key == "source" and isinstance(value, dict):  # same content, whatever path spelling
        return value.get("fingerprint")
    if key == "vae" and isinstance(value, dict):  # same weights, whether from the Hub, a folder or a file
        return value.get("hash")
    return value


def _changed_plan(old: dict, new: dict, out: Path, force: bool) -> bool:
    """Whether `out` holds latents of another plan; refused (every changed key listed) unless `force`."""
    changed = [key for key in PLAN_KEYS if _plan_value(old, key) != _plan_value(new, key)]
    if changed and not force:
        detail = "; ".join(f"{k}: {_plan_value(old, k)!r} there, {_plan_value(new, k)!r} now" for k in changed)
        raise DataError(
            f"{str(out)!r} already holds latents encoded with different settings (changed: "
            f"{', '.join(changed)} — {detail}); choose another output folder, or pass --force to "
            "replace them"
        )
    return bool(changed)


class _Reporter:
    """`encode` events of this process: a Start when the first shard is done or skipped (so early errors print
    without a bar), then a Step per batch or skipped shard; the rate counts from the first report (no start-up)."""

    def __init__(self, progress: Progress | None, total: int, shards_total: int):
        self.emit, self.total, self.shards_total = progress or quiet, total, shards_total
        self.done = self.encoded = self.shards_done = 0
        self.first: tuple[float, int] | None = None

    def images(self, n: int) -> None:
        self.done += n
        self.encoded += n
        self._step(False)

    def shard(self, n: int, skipped: bool) -> None:
        self.done += n
        self.shards_done += 1
        self._step(skipped)

    def _step(self, skipped: bool) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.encoded)
            self.emit(Start("encode", self.total, 0, "images"))
        t0, n0 = self.first
        rate = (self.encoded - n0) / (now - t0) if now > t0 and self.encoded > n0 else None
        self.emit(
            Step(
                "encode",
                self.done,
                self.total,
                {
                    "encoded": self.encoded,
                    "shards_done": self.shards_done,
                    "shards_total": self.shards_total,
                    "skipped": skipped,
                    "img_per_s": rate,
                },
                f"{rate:.1f} img/s" if rate else "",
            )
        )


def _encode_shards(
    source,
    codec: VAECodec,
    shards: list[int],
    shard_size: int,
    sizes: dict[int, int],
    out: Path,
    dtype: torch.dtype,
    batch: int,
    num_workers: int,
    report: _Reporter,
    caught: list[str],
) -> None:
    """Encode the given shards through one DataLoader (workers start once); batches never straddle shards,
    so a shard's bytes do not depend on which shards were already done. A signal in `caught` stops the work after
    the shard in hand is written (`Preempted`)."""
    plan = [
        (k, list(range(a, min(a + batch, k * shard_size + sizes[k]))))
        for k in shards
        for a in range(k * shard_size, k * shard_size + sizes[k], batch)
    ]
    if not plan:
        return
    loader = torch.utils.data.DataLoader(
        source,
        batch_sampler=[idx for _, idx in plan],
        num_workers=num_workers,
        pin_memory=codec.device.type == "cuda",
        worker_init_fn=shielded_workers(),
        generator=torch.Generator().manual_seed(0),
    )
    means, stds, labels = [], [], []
    try:
        for (k, idx), (images, y) in zip(plan, loader):
            b = images.shape[0]
            mean, std = codec.encode_stats(torch.cat([images, images.flip(3)]))
            means.append(torch.stack([mean[:b], mean[b:]], dim=1).to("cpu", dtype))
            stds.append(torch.stack([std[:b], std[b:]], dim=1).to("cpu", dtype))
            labels.append(y)
            report.images(b)
            if idx[-1] == k * shard_size + sizes[k] - 1:  # last batch of shard k
                write_shard(out / shard_name(k), torch.cat(means), torch.cat(stds), torch.cat(labels), dtype)
                means, stds, labels = [], [], []
                report.shard(0, skipped=False)
                if caught:
                    raise Preempted(caught[0], f"writing {shard_name(k)} to {out}")
    except DataError as e:  # re-raised from a worker with its traceback in the message
        raise DataError(unwrap_worker_error(str(e))) from None
