"""`diffit sample`: a thin wrapper over `diffit_cli.sampling.run.run_sample` with rich progress."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_cli.commands._common import RichProgress, SetOpt, console, user_errors

HELP = """Generate images from a checkpoint into a PNG folder or an ADM-style .npz.

Image i depends only on seed i (any batch size, any number of processes); rerunning the same
command finishes what a killed run left. Release weights: --ckpt nvidia/DiffiT:FILE --preset imagenet256.
Autoguidance (a weaker network of the same data guides instead of the null class): --guidance auto --guide-ckpt
WEAK.pt --cfg-scale W."""


# the flags that set `sample` values, named by the error a bad value gives
SAMPLE_FLAGS = {
    "sampler": "--sampler",
    "steps": "--steps",
    "guidance": "--guidance",
    "guidance.mode": "--guidance",
    "guidance.guide": "--guide-ckpt",
    "guidance.scale": "--cfg-scale",
    "guidance.schedule": "--cfg-schedule",
    "guidance.power": "--cfg-power",
    "guidance.channels": "--cfg-channels",
}


GuidanceOpt = typer.Option(
    None,
    "--guidance",
    help="cfg: classifier-free guidance (default); auto: autoguidance, D = D_guide + w·(D − D_guide) with a weaker "
    "--guide-ckpt of the same data (Karras et al. 2024).",
)
GuideCkptOpt = typer.Option(
    None,
    "--guide-ckpt",
    help="Autoguidance's guiding network: an earlier or smaller checkpoint of the same data, resolution, channels, "
    "classes and diffusion (as --ckpt: file, folder, REPO:FILE, OWNER/NAME).",
)
ScaleOpt = typer.Option(
    None, "--cfg-scale", min=0.0, help="Guidance scale w (1 = off): classifier-free, or autoguidance's."
)


def check_sample_flags(values: dict) -> None:
    """Check the `sample` values the flags set on their own, before any file is read. `--guidance auto` without
    `--guide-ckpt` is valid alone (the guide may come from the checkpoint's preset), so its need of a guide is
    checked with the preset."""
    from diffit_cli.config import check_sample_values

    if values.get("guidance.mode") == "auto" and values.get("guidance.guide") is None:
        values = {k: v for k, v in values.items() if k != "guidance.mode"}
    check_sample_values(values, SAMPLE_FLAGS)


def register(app: typer.Typer) -> None:
    app.command("sample", help=HELP)(sample_cmd)


@user_errors
def sample_cmd(
    ckpt: str = typer.Option(
        ..., "--ckpt", help="A .pt/.safetensors checkpoint, an exported folder, REPO:FILE or OWNER/NAME on the Hub."
    ),
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="Architecture for weight files without a preset (release files)."
    ),
    overrides: list[str] | None = SetOpt,
    seeds: str = typer.Option("0-63", "--seeds", help="Seeds: ranges and lists, e.g. 0-49999 or 1,5,7."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Output folder of PNGs, or FILE.npz."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="Images per forward batch (per process)."),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="'random' (drawn per seed, ADM's protocol), 'balanced' (seed at position j of --seeds gets class j mod "
        "the class count: N/classes images each, the first N mod classes classes one more), a class, or a list 1,2,3.",
    ),
    sampler: str | None = typer.Option(None, "--sampler", help="heun | euler | dpmpp-2m | ddpm | ddim."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Sampling steps."),
    guidance: str | None = GuidanceOpt,
    guide_ckpt: str | None = GuideCkptOpt,
    cfg_scale: float | None = ScaleOpt,
    cfg_schedule: str | None = typer.Option(None, "--cfg-schedule", help="constant | power-cosine | interval."),
    cfg_power: float | None = typer.Option(None, "--cfg-power", min=0.0, help="Power p of the power-cosine schedule."),
    cfg_channels: str | None = typer.Option(None, "--cfg-channels", help="Guided ε channels: 3 (release) or all."),
    vae: str | None = typer.Option(None, "--vae", help="SD VAE for latent models: Hub id, folder or .safetensors."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (network under autocast)."),
    raw: bool = typer.Option(False, "--raw", help="Use the trained weights instead of the EMA."),
    grid: Path | None = typer.Option(None, "--grid", help="Also write a grid PNG of the first 64 images."),
    force: bool = typer.Option(False, "--force", help="Replace output made with another recipe."),
    compile_: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile each network block (default: on CUDA only)."
    ),
) -> None:
    from diffit_cli.config import load_preset
    from diffit_cli.precision import check_precision
    from diffit_cli.sampling.run import parse_seeds, run_sample

    values = {
        "sampler": sampler,
        "steps": steps,
        "guidance.mode": guidance,
        "guidance.guide": guide_ckpt,
        "guidance.scale": cfg_scale,
        "guidance.schedule": cfg_schedule,
        "guidance.power": cfg_power,
        "guidance.channels": int(cfg_channels) if cfg_channels and cfg_channels.isdigit() else cfg_channels,
    }
    check_sample_flags(values)  # a bad flag fails here, before any file is read
    check_precision(precision, "--precision")
    with RichProgress() as progress:
        result = run_sample(
            ckpt,
            parse_seeds(seeds),
            out,
            preset=load_preset(preset) if preset else None,
            overrides=overrides,
            sample=values,
            precision=precision,
            batch=batch,
            classes=classes,
            vae=vae,
            raw=raw,
            grid=grid,
            force=force,
            compile="auto" if compile_ is None else compile_,
            progress=progress,
        )
    if "recipe" in result:
        console.print(
            f"[green]wrote[/] {result['images']} images → {result['out']} (NFE {result['nfe']}; "
            f"recipe {result['recipe']})"
        )
