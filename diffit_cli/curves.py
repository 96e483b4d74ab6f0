"""Training curves from `log.jsonl` alone: loss, learning rate, img/s, the gradient norm and the largest attention
logit (the two early signs of a diverging run, docs/stability.md) and, when measured, FID against kimg, for one run
(`curves.png` in the run folder, redrawn at each report) or several on shared axes (`diffit plot`)."""

from __future__ import annotations

import json
from pathlib import Path

from diffit_cli.errors import DiffitError
from diffit_cli.plots import Panel, Series, save_plot

LOG = "log.jsonl"
CURVES = "curves.png"
PANELS = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("img_per_s", "img/s"),
    ("grad_norm", "gradient norm"),
    ("attn_logit_max", "largest attention logit"),
)
FROM_ZERO = {"lr", "img_per_s"}  # axes that start at 0 (a warm-up's last steps are not a 1 % cliff)


def read_log(run_dir: Path | str) -> list[dict]:
    """The records of `<run_dir>/log.jsonl` (a torn last line, from a kill mid-write, is left out)."""
    records = []
    with open(Path(run_dir) / LOG) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def is_report(rec: dict) -> bool:
    """A report line (spike and FID lines are `{"event": ...}`; a spike line has a loss too)."""
    return "loss" in rec and "event" not in rec


def taken_path(records: list[dict]) -> list[dict]:
    """The records of the path the run took: a record at or before an earlier one's kimg (a resume replaying the
    stretch after its checkpoint, a spike rollback) replaces those from that kimg on."""
    kept: list[dict] = []
    for r in records:
        while kept and kept[-1]["kimg"] >= r["kimg"]:
            kept.pop()
        kept.append(r)
    return kept


def curve_panels(runs: dict[str, list[dict]]) -> list[Panel]:
    """The PANELS that any run logged (and FID when any run measured it), one line per run, against kimg."""
    reports = {name: taken_path([r for r in recs if is_report(r)]) for name, recs in runs.items()}
    fids = {name: taken_path([r for r in recs if r.get("event") == "fid"]) for name, recs in runs.items()}
    label = (lambda name: name) if len(runs) > 1 else (lambda name: "")
    panels = [
        Panel(
            title,
            "kimg",
            title,
            [Series(label(n), [r["kimg"] for r in rs], [r.get(key) for r in rs]) for n, rs in reports.items()],
            marker=None,
            y_from_zero=key in FROM_ZERO,
        )
        for key, title in PANELS
        if any(r.get(key) is not None for rs in reports.values() for r in rs)
    ]
    if any(fids.values()):
        extractors = sorted({r["extractor"] for rs in fids.values() for r in rs})
        panels.append(
            Panel(
                "FID",
                "kimg",
                f"FID ({', '.join(extractors)})",
                [Series(label(n), [r["kimg"] for r in rs], [r["fid"] for r in rs]) for n, rs in fids.items()],
            )
        )
    kimgs = [r["kimg"] for rs in (*reports.values(), *fids.values()) for r in rs]
    for p in panels:  # one kimg axis for every panel
        p.x_range = (min(kimgs), max(kimgs)) if kimgs else None
    return panels


def draw_curves(run_dir: Path | str) -> Path:
    """Redraw `<run_dir>/curves.png` from its log.jsonl."""
    run_dir = Path(run_dir)
    return save_plot(run_dir / CURVES, curve_panels({run_dir.name: read_log(run_dir)}), ncols=3)


def plot_runs(run_dirs: list[Path | str], out: Path | str = CURVES) -> Path:
    """`diffit plot`: the curves of several runs on shared axes, read from their log.jsonl files only."""
    if not run_dirs:
        raise DiffitError("give at least one run folder (it holds log.jsonl)")
    runs: dict[str, list[dict]] = {}
    for d in map(Path, run_dirs):
        if not (d / LOG).is_file():
            raise DiffitError(f"{d / LOG} does not exist; give run folders made by diffit train")
        records = [r for r in read_log(d) if "kimg" in r]
        if not any(is_report(r) for r in records):
            raise DiffitError(f"{d / LOG} holds no report yet; plot it after its first report")
        name = d.name if d.name not in runs else str(d)
        runs[name] = records
    return save_plot(out, curve_panels(runs), ncols=3)
