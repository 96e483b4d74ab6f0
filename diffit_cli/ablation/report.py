"""Results of an ablation study (`diffit_cli.ablation.run`): results.md / .csv / .json and the plots (matplotlib).

Rows come from the variants' result.json files, so a table can be rebuilt at any time from a study directory
(`write_results(study, budget, dir, collect_rows(study, dir), extractor)`), finished or not.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from diffit_cli import __version__
from diffit_cli.ablation.budget import get_budget
from diffit_cli.ablation.study import CHANGE_FLOOR, RESULT, Study
from diffit_cli.fid.extractors import INCEPTION, TEST_EXTRACTOR
from diffit_cli.fileio import atomic_write_bytes, read_json, write_json
from diffit_cli.plots import Panel, Series, colormap, save_image_table, save_plot

RESULT_FIELDS = [
    "study",
    "variant",
    "label",
    "group",
    "x",
    "metric",
    "value",
    "paper",
    "difference",
    "extractor",
    "budget",
    "kimg",
    "parameters",
    "num_samples",
    "seconds",
    "status",
    "paper_note",
]


def collect_rows(study: Study, sdir: Path) -> list[dict]:
    """One row per variant, in the study's order: the finished result, or a 'not run' row."""
    rows = []
    for v in study.variants:
        r = read_json(sdir / v.name / RESULT)
        if r is None:
            r = {
                "study": study.name,
                "variant": v.name,
                "label": v.label,
                "group": v.group,
                "x": v.x,
                "metric": study.metric,
                "value": None,
                "paper": v.paper,
                "difference": None,
                "status": "not run",
                "paper_note": v.paper_note,
            }
        else:
            r = {**r, "status": "done"}
        rows.append(r)
    return rows


def paper_difference(value: float | None, paper: float | None, budget: str, extractor: str | None) -> float | None:
    """value − paper where the two are comparable: the `paper` budget (the presets unchanged, FID-50K) scored with
    Inception features, as the paper was. At a smaller budget or with another extractor the gap measures the budget,
    not the method, so there is none (the tables print "–")."""
    if value is None or paper is None or budget != "paper" or extractor != INCEPTION:
        return None
    return value - paper


def _num(v: Any, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return str(v)


METRIC_LABEL = {"fid": "FID", "attention-change": "attention change with t"}


def write_results(study: Study, budget: str, sdir: Path, rows: list[dict], extractor: str | None) -> list[Path]:
    """results.md, results.csv, results.json and the plot(s) in the study directory."""

    b = get_budget(budget)
    files = []
    extractors = sorted({r.get("extractor") for r in rows if r.get("extractor")})
    ex_text = ", ".join(extractors) or extractor or "–"
    stand_in = TEST_EXTRACTOR in extractors
    metric = METRIC_LABEL[study.metric]
    header = {
        "study": study.name,
        "title": study.title,
        "source": study.source,
        "description": study.description,
        "budget": budget,
        "budget_summary": b.summary,
        "metric": study.metric,
        "paper_column": study.paper_column,
        "extractor": ex_text,
        "base": study.base,
        "diffit_version": __version__,
        "reference": next((r.get("reference") for r in rows if r.get("reference")), None),
        "num_samples": next((r.get("num_samples") for r in rows if r.get("num_samples")), None),
    }
    files.append(
        write_json(
            sdir / "results.json", {**header, "rows": [{k: v for k, v in r.items() if k != "preset"} for r in rows]}
        )
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                **{k: r.get(k) for k in RESULT_FIELDS},
                "extractor": r.get("extractor") or "",
                "budget": r.get("budget") or budget,
            }
        )
    files.append(atomic_write_bytes(sdir / "results.csv", buf.getvalue().encode()))

    plot_paths = write_plots(study, budget, sdir, rows, ex_text)
    lines = [f"# {study.title}", ""]
    if study.description:
        lines += [study.description, ""]
    lines += [
        f"- paper values: {study.source}",
        f"- budget: **{budget}** ({b.summary})",
        f"- base preset: `{study.base}`; metric: {metric}" + (" (lower is better)" if study.metric == "fid" else ""),
    ]
    if study.metric == "fid":
        lines.append(
            f"- feature extractor: `{ex_text}`"
            + (
                " — an offline stand-in for Inception-v3: values are NOT comparable with the paper's FID"
                if stand_in
                else ""
            )
        )
        if header["num_samples"]:
            lines.append(f"- FID of {header['num_samples']} samples against {header['reference']}")
    lines.append("")
    has_x = any(r.get("x") is not None for r in rows) and study.kind != "curve"
    cols = (
        ["Variant", "Setting"]
        + (["x"] if has_x else [])
        + [metric, f"Paper ({study.paper_column})", "Δ vs paper", "kimg", "Parameters"]
    )
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    for r in rows:
        value = "not run" if r["status"] == "not run" else _num(r.get("value"), 4 if study.metric != "fid" else 3)
        paper = _num(r.get("paper"), 2) + (f" ({r['paper_note']})" if r.get("paper_note") else "")
        cells = [r["variant"], r.get("label") or ""] + (
            [f"{r['x']:g}" if r.get("x") is not None else "–"] if has_x else []
        )
        cells += [
            value,
            paper,
            _num(r.get("difference"), 2, signed=True),
            f"{r['kimg']:g}" if r.get("kimg") is not None else "–",
            f"{r['parameters']:,}" if r.get("parameters") else "–",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines.append("")
    if study.kind == "curve":
        for r in rows:
            pts = ", ".join(
                f"{p['kimg']:g} kimg: {p['value']:.3f}" for p in r.get("points") or [] if p["value"] is not None
            )
            if pts:
                lines.append(f"- {r['variant']} along training: {pts}")
        lines.append("")
    for p in plot_paths:
        lines += [f"![{p.stem}]({p.name})", ""]
    lines.append(
        f"Generated by `diffit ablate {study.name} --budget {budget}` (diffit {__version__}); "
        "rows: results.csv, results.json."
    )
    files.append(atomic_write_bytes(sdir / "results.md", ("\n".join(lines) + "\n").encode()))
    return files + plot_paths


def write_plots(study: Study, budget: str, sdir: Path, rows: list[dict], extractor: str) -> list[Path]:
    """Sweeps and curves as line plots, categorical studies as bars (this run | the paper)."""

    metric = METRIC_LABEL[study.metric]
    run_title = f"this run ({budget}" + (f", {extractor})" if study.metric == "fid" else ")")
    panels = []
    if study.kind == "curve":
        series = [
            Series(
                r["variant"], [p["kimg"] for p in r.get("points") or []], [p["value"] for p in r.get("points") or []]
            )
            for r in rows
        ]
        panels.append(Panel(f"{metric} along training — {run_title}", "training progress (kimg)", metric, series))
    elif study.sweep is not None:
        groups = list(dict.fromkeys(r.get("group") for r in rows if r.get("group")))

        def series(key: str) -> list[Series]:
            out = []
            for g in groups or [None]:
                pts = [(r["x"], r.get(key)) for r in rows if r.get("group") in (g, None)]
                out.append(Series(g or "", [p[0] for p in pts], [p[1] for p in pts]))
            return out

        xr = (min(r["x"] for r in rows), max(r["x"] for r in rows))
        panels.append(Panel(run_title, study.sweep.axis, metric, series("value"), log_x=study.sweep.log, x_range=xr))
        if any(r.get("paper") is not None for r in rows):
            panels.append(
                Panel(
                    f"paper ({study.paper_column})",
                    study.sweep.axis,
                    metric,
                    series("paper"),
                    log_x=study.sweep.log,
                    note=study.source,
                    x_range=xr,
                )
            )
    else:
        cats = [r["variant"] for r in rows]
        panels.append(Panel(run_title, "variant", metric, [Series("", [], [r.get("value") for r in rows])], cats))
        if any(r.get("paper") is not None for r in rows):
            panels.append(
                Panel(
                    f"paper ({study.paper_column})",
                    "variant",
                    metric,
                    [Series("", [], [r.get("paper") for r in rows])],
                    cats,
                    note=study.source,
                )
            )
    name = "attention-change.png" if study.kind == "attention" else f"{study.name}.png"
    paths = [save_plot(sdir / name, panels, study.title)]
    if study.kind == "attention":
        paths += _attention_figures(study, sdir, rows)
    return paths


def _attention_figures(study: Study, sdir: Path, rows: list[dict]) -> list[Path]:

    data = {}
    for r in rows:
        f = sdir / r["variant"] / "attention.npz"
        if f.is_file():
            with np.load(f) as z:
                data[r["variant"]] = {k: z[k] for k in z.files}
    if not data:
        return []
    out = []
    first = next(iter(data.values()))
    cols = [f"σ={float(s):g}" for s in first["sigmas"]]
    labels = {v.name: v.label or v.name for v in study.variants}
    for proto, title, note in (
        (
            "fixed",
            "Attention, same noisy input, only the time input changes",
            "columns: noise level fed to the time embedding; change rows: |map - mean over t|, own scale",
        ),
        ("trajectory", "Attention along the noise levels (input noised to each level)", ""),
    ):
        cells, names = [], []
        if proto == "trajectory":
            cells.append([first["trajectory_inputs"][i] for i in range(len(cols))])
            names.append("noisy input")
        for name, d in data.items():
            hi = float(d[proto].max())
            row = [colormap(m, 0.0, hi) for m in d[proto]]
            if proto == "fixed":
                row = [d["fixed_input"]] + row
            cells.append(row)
            names.append(labels.get(name, name))
            if proto == "fixed":  # how much each map moves with t, on its own scale
                ch = d["fixed_change"]
                top = float(ch.max())
                blank = np.zeros_like(d["fixed_input"])
                cells.append([blank] + [colormap(m, 0.0, max(top, CHANGE_FLOOR)) for m in ch])
                names.append(f"  change with t (max {top:.1e})")
        path = sdir / ("attention-maps-fixed.png" if proto == "fixed" else "attention-maps-trajectory.png")
        out.append(save_image_table(path, cells, names, (["input"] if proto == "fixed" else []) + cols, title, note))
    return out
