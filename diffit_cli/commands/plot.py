"""`diffit plot`: a thin wrapper over `diffit_cli.curves.plot_runs` (training curves of one or more runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_cli.commands._common import console, user_errors

HELP = """Draw the training curves (loss, learning rate, img/s and FID when measured, against kimg) of one or more
runs on shared axes, from their log.jsonl files alone. Each run also keeps its own RUN_DIR/curves.png."""


def register(app: typer.Typer) -> None:
    app.command("plot", help=HELP)(plot_cmd)


@user_errors
def plot_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders (each holds log.jsonl)."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="The PNG to write."),
) -> None:
    from diffit_cli.curves import plot_runs

    path = plot_runs(run_dirs, out)
    console.print(f"curves of {len(run_dirs)} run{'s' * (len(run_dirs) > 1)} → {path}", highlight=False)
