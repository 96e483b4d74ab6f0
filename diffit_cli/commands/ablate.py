"""`diffit ablate`: a thin wrapper over `diffit_cli.ablation` (the paper's ablation studies) with rich tables."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_cli.commands._common import RichProgress, SetOpt, console, user_errors

HELP = """Run one of the paper's ablation studies (DiffiT Tables 3-8, Figs. 2, 7a, 7b, 8), or list them.

Each variant is trained, sampled and scored with the same code as `diffit train/sample/eval-fid`, in its own
run dir under RUNS_DIR (default runs/ablations/STUDY/BUDGET), and the table, CSV, JSON and plots land there.
Rerunning skips finished variants and resumes unfinished ones. --budget tiny runs on a laptop CPU in minutes
(built-in data; offline feature extractor when no Inception weights are present: the table says so)."""


def register(app: typer.Typer) -> None:
    app.command("ablate", help=HELP)(ablate_cmd)


@user_errors
def ablate_cmd(
    study: str | None = typer.Argument(None, help="Study name (see --list) or a study .yaml file."),
    budget: str = typer.Option("tiny", "--budget", "-b", help="tiny | small | paper."),
    overrides: list[str] | None = SetOpt,
    runs_dir: Path | None = typer.Option(
        None, "--runs-dir", help="Study folder (default runs/ablations/STUDY/BUDGET)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show the variants and their resolved differences, then exit."
    ),
    only: list[str] | None = typer.Option(None, "--only", help="Run only this variant (repeatable)."),
    list_: bool = typer.Option(False, "--list", help="List the studies."),
    checkpoint: str | None = typer.Option(
        None,
        "--checkpoint",
        help="Sample-only studies (cfg-scale): a trained .pt/.safetensors or REPO:FILE instead of training the base.",
    ),
    guide_checkpoint: str | None = typer.Option(
        None,
        "--guide-checkpoint",
        help="Sample-only studies (guidance): the guiding network of the autoguided variants instead of training "
        "the study's guide.",
    ),
    feature_extractor: str | None = typer.Option(
        None,
        "--feature-extractor",
        help="torch-fidelity extractor (default: inception-v3-compat; "
        "at tiny without its weights: diffit-randconv-v1).",
    ),
    inception_weights: Path | None = typer.Option(
        None, "--inception-weights", help="Local Inception weights file (offline machines)."
    ),
    log_with: list[str] | None = typer.Option(
        None,
        "--log-with",
        help="Experiment tracker (tensorboard, wandb, mlflow, aim, comet_ml, "
        "all; repeatable): each variant is a run, grouped by study.",
    ),
    tracker_project: str = typer.Option("diffit-ablate", "--tracker-project", help="Tracker project."),
) -> None:
    from diffit_cli import ablation as A

    if list_ or study is None:
        _list(A)
        return
    s = A.load_study(study)
    if dry_run:
        plan = A.plan_study(s, budget, overrides, runs_dir, only, guide_checkpoint)
        console.print(plan.describe(), highlight=False, markup=False)
        return
    from diffit_cli.training import TrackerSpec

    trackers = TrackerSpec(tuple(log_with), tracker_project) if log_with else None
    with RichProgress() as progress:
        r = A.run_study(
            s,
            budget,
            overrides=overrides,
            runs_dir=runs_dir,
            only=only,
            checkpoint=checkpoint,
            guide_checkpoint=guide_checkpoint,
            feature_extractor=feature_extractor,
            inception_weights=inception_weights,
            trackers=trackers,
            progress=progress,
        )
    if r.files:
        _show_result(s, r)


def _list(A) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="Ablation studies: diffit ablate STUDY [--budget tiny|small|paper] [--dry-run]", title_justify="left"
    )
    for col in ("Study", "Kind", "Variants", "Reproduces"):
        table.add_column(col, no_wrap=col != "Reproduces")
    for name in A.available_studies():
        s = A.load_study(name)
        table.add_row(name, s.kind, str(len(s.variants)), s.source)
    Console().print(table)


def _show_result(study, r) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = {"fid": "FID", "attention-change": "attention change"}[study.metric]
    table = Table(
        title=f"{study.title} — budget {r.budget}" + (f", extractor {r.extractor}" if r.extractor else ""),
        title_justify="left",
    )
    for col in ("Variant", metric, "Paper", "Difference", "kimg", ""):
        table.add_column(col, justify="left" if col in ("Variant", "") else "right")
    for row in r.rows:
        value, paper, diff = row.get("value"), row.get("paper"), row.get("difference")
        table.add_row(
            row["variant"],
            "–" if value is None else f"{value:.4g}",
            "–" if paper is None else f"{paper:g}",
            "–" if diff is None else f"{diff:+.3g}",
            "–" if row.get("kimg") is None else f"{row['kimg']:g}",
            "skipped (done before)" if row["variant"] in r.skipped else row["status"],
        )
    out = Console()
    out.print(table)
    if r.extractor == "diffit-randconv-v1":
        out.print(
            "[yellow]note:[/] FID from the offline stand-in extractor diffit-randconv-v1: not comparable with "
            "the paper's Inception FID",
            highlight=False,
        )
    out.print(f"results: {r.study_dir / 'results.md'} (and .csv, .json, plots)", highlight=False)
