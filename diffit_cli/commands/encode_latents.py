"""`diffit encode-latents SRC OUT`: images → SD-VAE latent shards (mean/std of each image and its mirror)."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer

from diffit_cli.commands._common import RichProgress, console, user_errors

HELP = """Encode an image dataset (folder with class subfolders, EDM .zip or .npz) into SD-VAE latent shards
for latent DiffiT training (`diffit train --data OUT`). Stores the posterior mean and std of every image
and of its horizontal mirror after ADM centre crop. Rerun the same command to resume an interrupted run;
split the work over GPUs with `accelerate launch -m diffit_cli encode-latents ...`."""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Dtype(str, Enum):
    fp16 = "fp16"
    fp32 = "fp32"


def register(app: typer.Typer) -> None:
    @app.command("encode-latents", help=HELP)
    @user_errors
    def encode_latents_cmd(
        src: Path = typer.Argument(
            ...,
            help="Image folder, .zip (EDM dataset_tool), .npz (arr_0 NHWC uint8), "
            "torchvision:NAME or hf:OWNER/NAME[:split].",
        ),
        out: Path = typer.Argument(..., help="Output folder for manifest.json and shard-*.safetensors."),
        resolution: int = typer.Option(256, "--resolution", "-r", help="Image resolution (multiple of 8)."),
        vae: str = typer.Option(
            "stabilityai/sd-vae-ft-ema",
            "--vae",
            help="Hub id, local folder (save_pretrained layout) or .safetensors file.",
        ),
        batch: int = typer.Option(32, "--batch", "-b", help="Images per VAE forward pass (per process)."),
        precision: Precision = typer.Option(Precision.fp32, "--precision", help="VAE compute precision."),
        dtype: Dtype = typer.Option(Dtype.fp16, "--dtype", help="Storage type of the latent statistics."),
        shard_size: int = typer.Option(1024, "--shard-size", help="Images per shard file."),
        workers: int = typer.Option(4, "--workers", "-j", help="Data-loading worker processes."),
        skip_bad_images: bool = typer.Option(
            False, "--skip-bad-images", help="Skip unreadable images with a warning instead of stopping."
        ),
        max_images: int | None = typer.Option(None, "--max-images", help="Encode only the first N images."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: Accelerate's)."),
        force: bool = typer.Option(False, "--force", help="Replace latents encoded with other settings."),
    ) -> None:
        from accelerate import PartialState

        from diffit_cli.encode_latents import encode_latents

        started = time.perf_counter()
        with RichProgress() as progress:
            manifest = encode_latents(
                src,
                out,
                resolution=resolution,
                vae=vae,
                batch=batch,
                precision=precision.value,
                shard_size=shard_size,
                dtype=dtype.value,
                num_workers=workers,
                skip_bad_images=skip_bad_images,
                max_images=max_images,
                device=device,
                force=force,
                progress=progress,
            )
        if PartialState().is_main_process:
            console.print(
                f"[green]wrote[/] {manifest['count']} images → {len(manifest['shards'])} shards in {out} "
                f"(latents {manifest['latent_channels']}×{manifest['latent_size']}², {manifest['dtype']}, "
                f"{manifest['num_classes']} classes) in {time.perf_counter() - started:.1f} s",
                highlight=False,
            )
