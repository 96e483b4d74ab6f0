"""`diffit eval-fid`: FID (and IS, KID, precision/recall) of samples against a reference, via torch-fidelity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from diffit_cli.commands._common import PresetOpt, RichProgress, SetOpt, console, fail, user_errors

HELP = """Score samples (image folder, .zip, or .npz with arr_0 uint8 NHWC) against --ref: images, or a
statistics file (EDM's cifar10-32x32.npz, ADM's VIRTUAL_imagenet256_labeled.npz, or one from --save-ref).
Without --ref, --preset NAME scores against the preset's eval.reference: for `train` (image-space presets) the
statistics of its training set, computed once and cached in $DIFFIT_CACHE/fid-refs.
With --save-ref FILE, SAMPLES is a dataset: its statistics are saved for later runs."""


def _show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [
        ("FID", "fid", None),
        ("Inception Score", "is_mean", "is_std"),
        ("KID", "kid_mean", "kid_std"),
        ("Precision", "precision", None),
        ("Recall", "recall", None),
    ]
    table = Table(title="Sample quality", title_justify="left")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    for label, key, std in rows:
        if key in result:
            value = f"{result[key]:.4f}" + (f" ± {result[std]:.4f}" if std else "")
            table.add_row(label, value)
    ref = result["reference"]
    if ref is not None:
        kind = "statistics file" if result["reference_kind"] == "stats" else "images"
        count = f", {result['num_reference']:,} images" if result["num_reference"] else ""
        ref = f"{ref} ({kind}{count})"
    out = Console()
    out.print(table)
    out.print(f"samples:   {result['samples']} ({result['num_samples']:,} images)", highlight=False)
    out.print(f"reference: {ref or 'none'}", highlight=False)
    out.print(f"extractor: {result['extractor']} on {result['device']}", highlight=False)
    for note in result["notes"]:
        out.print(f"[yellow]note:[/] {note}", highlight=False)


SamplesArg = typer.Argument(..., help="Image folder, .zip, or .npz (arr_0 uint8 NHWC). With --save-ref: the dataset.")
RefOpt = typer.Option(None, "--ref", "-r", help="Image folder, .zip, .npz of images, or a mu/sigma statistics .npz.")
MetricsOpt = typer.Option("fid", "--metrics", "-m", help="Comma-separated: fid, is, kid, pr (precision/recall).")
BatchOpt = typer.Option(64, "--batch", help="Images per feature-extraction batch.")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")
WeightsOpt = typer.Option(None, "--inception-weights", help="Local Inception weights file (offline machines).")
ExtractorOpt = typer.Option(
    None,
    "--feature-extractor",
    help="torch-fidelity extractor name (default inception-v3-compat; diffit-randconv-v1: offline smoke test).",
)
SaveRefOpt = typer.Option(None, "--save-ref", help="Save mu/sigma of SAMPLES (a dataset) to this .npz and exit.")
JsonOpt = typer.Option(None, "--json", help="Also write the results to this JSON file.")
DataOpt = typer.Option(None, "--data", "-d", help="With --preset: the training data (as for `diffit train`).")


def register(app: typer.Typer) -> None:
    @app.command("eval-fid", help=HELP)
    @user_errors
    def eval_fid(
        samples: Path = SamplesArg,
        ref: Optional[Path] = RefOpt,
        metrics: str = MetricsOpt,
        batch: int = BatchOpt,
        device: Optional[str] = DeviceOpt,
        inception_weights: Optional[Path] = WeightsOpt,
        feature_extractor: Optional[str] = ExtractorOpt,
        save_ref: Optional[Path] = SaveRefOpt,
        json_out: Optional[Path] = JsonOpt,
        preset: Optional[str] = PresetOpt,
        data: Optional[str] = DataOpt,
        overrides: Optional[List[str]] = SetOpt,
    ) -> None:
        from diffit_cli import metrics as M
        from diffit_cli.fileio import check_writable, write_json

        if save_ref is not None and ref is not None:
            fail("--save-ref summarises SAMPLES (a dataset) into FILE; it takes no --ref")
        for out in (save_ref, json_out):  # before the features are computed, not after
            if out is not None:
                check_writable(out)
        if preset is None and (data is not None or overrides):
            fail("--data and --set describe a preset's training data: pass --preset NAME too")
        common = dict(batch=batch, device=device, feature_extractor=feature_extractor)
        common["inception_weights"] = inception_weights
        with RichProgress() as progress:
            if save_ref is not None:
                result = M.save_reference(samples, save_ref, progress=progress, **common)
            else:
                described = None
                if ref is None and preset is not None:
                    from diffit_cli.config import load_preset
                    from diffit_cli.fid.reference import preset_reference

                    sets = list(overrides or []) + ([f"data.path={json.dumps(data)}"] if data is not None else [])
                    ref, described = preset_reference(load_preset(preset, sets), batch=batch, progress=progress,
                                                      feature_extractor=feature_extractor or M.INCEPTION,
                                                      inception_weights=inception_weights)
                result = M.compute_metrics(samples, ref, metrics=metrics, progress=progress, **common)
                if described is not None and described != ref:
                    result["notes"].insert(0, f"reference: statistics of {described}")
        if save_ref is not None:
            console.print(
                f"Saved statistics of {result['num_images']:,} images "
                f"({result['extractor']}, {result['dim']} features) to {result['path']}",
                highlight=False,
            )
        else:
            _show(result)
        if json_out is not None:
            write_json(json_out, result)
