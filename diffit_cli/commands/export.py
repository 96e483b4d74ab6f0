"""`diffit export`: a thin wrapper over `diffit_cli.sharing.export.export_model` with rich progress."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_cli.commands._common import RichProgress, console, user_errors

HELP = """Export a checkpoint as a model folder to share: model.safetensors, preset.yaml, config.json,
samples.png and a model card README.md (Hugging Face Hub conventions; no pickle).

The folder loads back with diffit sample --ckpt OUT_DIR (or OWNER/NAME once pushed with --push-to-hub)."""


def register(app: typer.Typer) -> None:
    app.command("export", help=HELP)(export_cmd)


@user_errors
def export_cmd(
    ckpt: str = typer.Argument(..., help="Training checkpoint (.pt), .safetensors file, REPO:FILE or model folder."),
    out_dir: Path = typer.Argument(..., help="The folder to write (must be new or empty, unless --force)."),
    raw: bool = typer.Option(False, "--raw", help="Export the trained weights instead of the EMA."),
    dtype: str = typer.Option("fp32", "--dtype", help="Weights' dtype: fp32 | bf16 | fp16."),
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="Architecture for weight files without a preset (release files)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT_DIR."),
    license_: str = typer.Option("apache-2.0", "--license", help="The card's license (a Hub license id)."),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", help="Upload the folder to this Hub repository OWNER/NAME (created when missing)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the Hub repository private."),
) -> None:
    from diffit_cli.config import load_preset
    from diffit_cli.sharing.export import export_model

    with RichProgress() as progress:
        result = export_model(
            ckpt,
            out_dir,
            raw=raw,
            dtype=dtype,
            preset=load_preset(preset) if preset else None,
            force=force,
            license=license_,
            push_to_hub=push_to_hub,
            private=private,
            progress=progress,
        )
    console.print(
        f"[green]exported[/] {result['parameters']:,} parameters → {result['out']} ({', '.join(result['files'])})"
    )
    if result["url"]:
        console.print(f"[green]pushed[/] {result['url']}")
