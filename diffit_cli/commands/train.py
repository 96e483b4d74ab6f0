"""`diffit train`: a thin wrapper over `diffit_cli.training.train` with rich progress."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from diffit_cli.commands._common import PresetOpt, RichProgress, SetOpt, console, user_errors
from diffit_cli.errors import DiffitError

HELP = """Train a DiffiT preset on --data (or the preset's data.path; `demo` uses the built-in synthetic shapes).

Rerunning the same command resumes from RUN_DIR/checkpoints/latest.pt. Multi-GPU / multi-node:
`accelerate launch --multi_gpu -m diffit_cli train --preset cifar10 --data cifar10.zip`."""


def register(app: typer.Typer) -> None:
    app.command("train", help=HELP)(train_cmd)


@user_errors
def train_cmd(
    preset: str | None = PresetOpt,
    data: str | None = typer.Option(
        None,
        "--data",
        "-d",
        help="Image folder, .zip, .npz, latent-shard folder, torchvision:NAME (e.g. CIFAR10) or hf:OWNER/NAME[:split].",
    ),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder (default runs/<preset name>)."),
    overrides: list[str] | None = SetOpt,
    kimg: float | None = typer.Option(None, "--kimg", min=0.001, help="Train this many thousand images in all."),
    batch_gpu: int | None = typer.Option(
        None, "--batch-gpu", min=1, help="Per-device batch (gradient accumulation fills the rest)."
    ),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip unreadable images with a warning."),
    log_with: list[str] | None = typer.Option(
        None,
        "--log-with",
        help="Experiment tracker: tensorboard, wandb, mlflow, aim, comet_ml or all (repeatable; "
        "offline modes as each tracker has them, e.g. WANDB_MODE=offline).",
    ),
    tracker_project: str = typer.Option(
        "diffit", "--tracker-project", help="Tracker project (W&B/Comet project, MLflow experiment)."
    ),
    tensorboard: bool = typer.Option(False, "--tensorboard", hidden=True, help="Same as --log-with tensorboard."),
    inception_weights: Path | None = typer.Option(
        None, "--inception-weights", help="FID along training: a local Inception weights file."
    ),
    compile_: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile each network block (default: on CUDA only)."
    ),
    grad_checkpointing: bool = typer.Option(
        False, "--grad-checkpointing", help="Recompute blocks in the backward pass (less memory)."
    ),
    force: bool = typer.Option(False, "--force", help="Resume even though the preset changed."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check the preset and flags as a run does before its first step, print the resolved preset and "
        "parameter count, then exit.",
    ),
) -> None:
    p = _preset_from_flags(preset, data, overrides, kimg, compile_, grad_checkpointing)
    from diffit_cli.training import TrackerSpec, preflight, train

    run_dir = run_dir or Path("runs") / p.name
    trackers = TrackerSpec(tuple(log_with or ()) + ("tensorboard",) * tensorboard, tracker_project)
    if dry_run:  # the run's own checks before its first step; what only this machine lacks is a note
        checked = preflight(
            p,
            run_dir=run_dir,
            batch_gpu=batch_gpu,
            trackers=trackers,
            inception_weights=inception_weights,
            dry_run=True,
        )
        _print_dry_run(p, checked.notes)
        return
    with RichProgress() as progress:
        state = train(
            p,
            run_dir,
            batch_gpu=batch_gpu,
            force=force,
            skip_bad_images=skip_bad_images,
            trackers=trackers,
            inception_weights=inception_weights,
            progress=progress,
        )
    _print_end(state, run_dir)


def _preset_from_flags(preset, data, overrides, kimg, compile_, grad_checkpointing):
    """The preset by name or file with the flags as `--set` overrides (a missing --data path said first)."""
    from diffit_cli.config import load_preset
    from diffit_cli.data.catalog import DATA_FORMS, is_named

    sets = list(overrides or [])
    if data is not None:
        sets.append(f"data.path={json.dumps(data)}")  # quoted: a YAML string whatever the path looks like
    if kimg is not None:
        sets.append(f"train.total_kimg={kimg}")
    sets += [f"train.compile={str(compile_).lower()}"] * (compile_ is not None)
    sets += ["train.grad_checkpointing=true"] * grad_checkpointing
    if data is not None and not is_named(data) and not Path(data).exists():
        raise DiffitError(f"--data {data!r} does not exist; pass {DATA_FORMS}")
    return load_preset(preset or "demo", sets)


def _print_dry_run(p, notes: list[str]) -> None:
    """The resolved preset, the parameter and step counts, and the notes of what only this machine lacks."""
    from diffit_cli.training import dry_run_summary

    info = dry_run_summary(p)
    typer.echo(info["preset"])
    typer.echo(
        f"# parameters: {info['parameters']:,}  steps: {info['steps']:,}  images/step: {info['images_per_step']}"
    )
    for note in notes:
        console.print("[yellow]note:[/] " + note.replace("[", r"\["), highlight=False, soft_wrap=True)


def _print_end(state, run_dir: Path) -> None:
    """How the run ended, on the main process; a stopped run exits 3 or 130 (a signal) or 1 (a loss spike)."""
    if state.preempted:
        from diffit_cli.preemption import exit_code

        if state.main_process:
            console.print(
                f"[yellow]stopped by {state.preempted}[/] at {state.nimg / 1000:.3f} kimg after writing a "
                f"checkpoint; rerun the same command to continue (exit {exit_code(state.preempted)})",
                highlight=False,
            )
        raise typer.Exit(code=exit_code(state.preempted))
    if state.stopped:
        if state.main_process:
            console.print(f"[bold red]stopped:[/] {state.stopped} (train.on_spike=stop)", highlight=False)
        raise typer.Exit(code=1)
    if state.main_process:
        console.print(
            f"[green]done[/] {state.nimg / 1000:.1f} kimg in {run_dir} "
            f"(latest checkpoint: {run_dir / 'checkpoints' / 'latest.pt'}, grids in {run_dir / 'samples'}, "
            f"curves: {run_dir / 'curves.png'})"
        )
        if state.best:
            best = state.best
            console.print(
                f"best FID {best['fid']:.4g} at {best['kimg']:g} kimg ({best['extractor']}): "
                f"{run_dir / 'checkpoints' / 'best.pt'}",
                highlight=False,
            )
