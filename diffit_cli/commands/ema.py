"""`diffit ema`: a thin wrapper over `diffit_cli.posthoc.reconstruct.reconstruct` (and, with `--sweep`,
`diffit_cli.posthoc.sweep.sweep`) with rich progress."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_cli.commands._common import RichProgress, fail, user_errors

HELP = """Reconstruct a run's EMA for any σ_rel after training (EDM2's post-hoc EMA): the power-function EMA profiles
that train.posthoc_ema lists (e.g. [0.05, 0.10]) are stored under RUN_DIR/posthoc-ema/, and each σ_rel given is
fitted by least squares as a combination of every snapshot stored up to the latest one (or --at-kimg). The
residual printed per σ_rel says how well the stored profiles span it (0: exactly; a stored σ_rel comes back as
itself).

Each reconstruction is an ordinary checkpoint, RUN_DIR/ema-reconstructed/ema-<σ_rel>-<kimg>.pt (the preset inside),
for diffit sample --ckpt, eval-fid --ckpt and export. With --sweep each is sampled and scored as eval-fid --ckpt
does (the preset's eval settings), and ema-sweep.md, ema-sweep.png (FID against σ_rel, the best marked) and
ema-sweep.json are written beside them; a rerun skips what is already scored.

Example: diffit ema runs/cifar10 --sigma-rel 0.05,0.075,0.10,0.15 --sweep"""

SWEEP_ONLY = ("--num-samples", "--feature-extractor", "--inception-weights", "--ref")


def register(app: typer.Typer) -> None:
    app.command("ema", help=HELP)(ema_cmd)


@user_errors
def ema_cmd(
    run_dir: Path = typer.Argument(..., help="The run folder (its posthoc-ema/ holds the stored profiles)."),
    sigma_rel: str = typer.Option(
        ..., "--sigma-rel", help="σ_rel to reconstruct, one or a comma-separated list in (0, 0.3), e.g. 0.05,0.10."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for the checkpoints (default RUN_DIR/ema-reconstructed)."
    ),
    at_kimg: float | None = typer.Option(
        None,
        "--at-kimg",
        help="Reconstruct at the snapshot stored when training crossed this kimg (e.g. 500) instead of the latest.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace reconstructions that exist."),
    sweep: bool = typer.Option(False, "--sweep", help="Score each reconstruction (FID) and mark the best σ_rel."),
    num_samples: int | None = typer.Option(
        None, "--num-samples", min=2, help="--sweep: images per score (default: the preset's eval.num_samples)."
    ),
    feature_extractor: str | None = typer.Option(
        None,
        "--feature-extractor",
        help="--sweep: torch-fidelity extractor (default: the preset's eval.feature_extractor; diffit-randconv-v1: "
        "offline smoke test).",
    ),
    inception_weights: Path | None = typer.Option(
        None, "--inception-weights", help="--sweep: local Inception (or DINOv2) weights file (offline machines)."
    ),
    ref: Path | None = typer.Option(
        None, "--ref", "-r", help="--sweep: reference images or statistics (default: the preset's eval.reference)."
    ),
) -> None:
    from diffit_cli.posthoc.reconstruct import parse_sigma_rels, reconstruct, select_snapshots

    given = [flag for flag, v in zip(SWEEP_ONLY, (num_samples, feature_extractor, inception_weights, ref)) if v]
    if given and not sweep:
        fail(f"{', '.join(given)} go with --sweep (scoring the reconstructions)")
    sigmas = parse_sigma_rels(sigma_rel)
    if sweep:
        from diffit_cli.posthoc.sweep import check_sweep

        stored, _, _ = select_snapshots(run_dir, at_kimg)
        check_sweep(stored[-1].path, feature_extractor, inception_weights)
    with RichProgress() as progress:
        results = reconstruct(run_dir, sigmas, out_dir=out, at_kimg=at_kimg, force=force, progress=progress)
    scores = None
    if sweep:
        from diffit_cli.posthoc.sweep import sweep as run_sweep

        with RichProgress() as progress:
            scores = run_sweep(
                results,
                results[0].path.parent,
                num=num_samples,
                feature_extractor=feature_extractor,
                inception_weights=inception_weights,
                reference=ref,
                progress=progress,
            )
    _show(results, scores)


def _show(results, scores: dict | None) -> None:
    """σ_rel, γ, residual and file per reconstruction (with FID and the best one after a sweep), by the main process
    of a multi-process launch."""
    from accelerate import PartialState
    from rich.console import Console
    from rich.table import Table

    if not PartialState().is_main_process:
        return

    first = results[0]
    table = Table(title=f"Post-hoc EMA at {first.nimg / 1000:g} kimg (step {first.step:,})", title_justify="left")
    for name in ("σ_rel", "γ", "residual") + (("FID", "") if scores else ()) + ("checkpoint",):
        table.add_column(name, justify="left" if name == "checkpoint" else "right")
    fids = {e["file"]: e["fid"] for e in scores["rows"]} if scores else {}
    for r in results:
        cells = [f"{r.sigma_rel:g}", f"{r.gamma:.3f}", f"{r.residual:.2e}"]
        if scores:
            cells += [f"{fids[r.path.name]:.4f}", "best" if r.path.name == scores["best"]["file"] else ""]
        table.add_row(*cells, r.path.name)
    out = Console()
    out.print(table)
    out.print(
        f"checkpoints in {first.path.parent} (diffit sample --ckpt FILE, eval-fid --ckpt, export)", highlight=False
    )
    if scores:
        out.print(f"sweep: {scores['table']}, {scores['plot']}, {scores['json']}", highlight=False)
