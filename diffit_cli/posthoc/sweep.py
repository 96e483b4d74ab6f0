"""`diffit ema --sweep`: each reconstruction scored by `fid.score.score_checkpoint` (what `eval-fid --ckpt` runs,
with the preset's evaluation settings: eval.num_samples, eval.feature_extractor, eval.reference, eval.classes), then
a table and a plot of FID against σ_rel with the best one marked (EDM2 Fig. 5 draws the same curve).

Written into the reconstructions' folder: `ema-sweep.json` (every score, kept across runs: a reconstruction scored
before with the same coefficients of the same snapshot files and settings is not sampled again), `ema-sweep.md`
and `ema-sweep.png`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from accelerate import PartialState

from diffit_cli.config import preset_from_yaml
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress, main_process_only
from diffit_cli.fid import score as fid_score
from diffit_cli.fid.extractors import check_extractor
from diffit_cli.fileio import atomic_write_bytes, read_json, write_json
from diffit_cli.plots import Panel, Series, save_plot
from diffit_cli.posthoc.reconstruct import Result
from diffit_cli.posthoc.store import snapshot_preset

SWEEP_JSON = "ema-sweep.json"
SWEEP_TABLE = "ema-sweep.md"
SWEEP_PLOT = "ema-sweep.png"


def check_sweep(snapshot: Path, feature_extractor: str | None, inception_weights=None) -> None:
    """Before any reconstruction is written: the extractor the sweep will use (the override, else the preset's
    eval.feature_extractor) and its weights are at hand."""
    preset = preset_from_yaml(snapshot_preset(snapshot), str(snapshot))
    check_extractor(feature_extractor or preset.eval.feature_extractor, inception_weights)


def sweep(
    results: Sequence[Result],
    out_dir: Path | str,
    *,
    num: int | None = None,
    feature_extractor: str | None = None,
    inception_weights=None,
    reference=None,
    progress: Progress | None = None,
) -> dict | None:
    """Score each of `results` (unless `ema-sweep.json` in `out_dir` already holds its score for the same
    reconstruction and settings) and write the JSON, the Markdown table and the plot. `num`, `feature_extractor`,
    `reference`: overrides of the preset's eval settings. Returns {rows, best, json, table, plot} (None on a process
    other than the main one, which samples its share of every score)."""
    if not results:
        raise DiffitError("nothing to sweep: give --sigma-rel")
    main = PartialState().is_main_process
    progress = main_process_only(progress, main)
    out_dir = Path(out_dir)
    request = {
        "num": num,
        "feature_extractor": feature_extractor,
        "reference": None if reference is None else str(reference),
    }
    kept = read_json(out_dir / SWEEP_JSON)
    entries: dict[str, dict] = kept.get("entries", {}) if isinstance(kept, dict) else {}
    for r in results:
        old = entries.get(r.path.name)
        if _same(old, r, request):
            progress(Message(f"σ_rel {r.sigma_rel:g}: FID {old['fid']:.4f} (scored before, {SWEEP_JSON})"))
            continue
        progress(Message(f"σ_rel {r.sigma_rel:g}: sampling and scoring {r.path.name}"))
        score = fid_score.score_checkpoint(
            str(r.path),
            num,
            reference=reference,
            feature_extractor=feature_extractor,
            inception_weights=inception_weights,
            progress=progress,
        )
        if main:
            entries[r.path.name] = _entry(r, request, score)
            write_json(out_dir / SWEEP_JSON, {"entries": entries})  # each score kept as soon as it is known
    if not main:
        return None
    rows = sorted((entries[r.path.name] for r in results), key=lambda e: e["sigma_rel"])
    best = min(rows, key=lambda e: e["fid"])
    write_json(out_dir / SWEEP_JSON, {"entries": entries, "sweep": [e["file"] for e in rows], "best": best["file"]})
    atomic_write_bytes(out_dir / SWEEP_TABLE, render_table(rows, best).encode())
    plot = save_plot(out_dir / SWEEP_PLOT, [sweep_panel(rows, best)])
    return {"rows": rows, "best": best, "json": out_dir / SWEEP_JSON, "table": out_dir / SWEEP_TABLE, "plot": plot}


def _same(old: dict | None, r: Result, request: dict) -> bool:
    """Whether a kept score is this reconstruction's (same time, same coefficients of the same snapshot files) under
    the same settings."""
    return (
        isinstance(old, dict)
        and old.get("fid") is not None
        and old.get("nimg") == r.nimg
        and old.get("coefficients") == r.coefficients
        and old.get("sources") == r.sources
        and old.get("request") == request
    )


def _entry(r: Result, request: dict, score: dict) -> dict:
    return {
        "file": r.path.name,
        "sigma_rel": r.sigma_rel,
        "gamma": r.gamma,
        "residual": r.residual,
        "nimg": r.nimg,
        "step": r.step,
        "coefficients": r.coefficients,
        "sources": r.sources,
        "request": request,
        "fid": score["min"],
        "num": score["num"],
        "extractor": score["extractor"],
        "reference": score["reference"],
        "sampler": score["sampler"],
        "steps": score["steps"],
    }


def render_table(rows: list[dict], best: dict) -> str:
    """The sweep as a Markdown table, the best σ_rel marked."""
    first = rows[0]
    lines = [
        f"# Post-hoc EMA sweep at {first['nimg'] / 1000:g} kimg",
        "",
        f"FID ({first['extractor']}, {first['num']:,} samples, {first['sampler']} {first['steps']} steps) against "
        f"{first['reference']}; residual: how well the stored profiles fit each σ_rel (0 = exactly).",
        "",
        "| σ_rel | γ | residual | FID | checkpoint | |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for e in rows:
        mark = "**best**" if e is best else ""
        lines.append(
            f"| {e['sigma_rel']:g} | {e['gamma']:.3f} | {e['residual']:.2e} | {e['fid']:.4f} | `{e['file']}` | {mark} |"
        )
    return "\n".join(lines) + "\n"


def sweep_panel(rows: list[dict], best: dict) -> Panel:
    """FID against σ_rel, the best point drawn again as its own labelled series."""
    return Panel(
        title=f"Post-hoc EMA at {rows[0]['nimg'] / 1000:g} kimg",
        xlabel="σ_rel",
        ylabel=f"FID ({rows[0]['extractor']})",
        series=[
            Series("FID", [e["sigma_rel"] for e in rows], [e["fid"] for e in rows]),
            Series(f"best: σ_rel {best['sigma_rel']:g}, FID {best['fid']:.3f}", [best["sigma_rel"]], [best["fid"]]),
        ],
    )
