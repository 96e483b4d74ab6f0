"""Charts with matplotlib (Agg, no display): line and grouped-bar panels, labelled image tables, heat-map colours.

A figure is a row of :class:`Panel` objects saved as one PNG by :func:`save_plot`; :func:`save_image_table` draws a
labelled grid of images (attention maps). Files are written atomically. PIL stays for sample grids (`generate`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

from diffit_cli.fileio import atomic_write_bytes

matplotlib.use("Agg")  # files only: never a window, works on headless machines
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float | None]  # None: no value (point skipped)


@dataclass
class Panel:
    """One chart. `categories` set → grouped bars (series values per category); otherwise lines over x."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    categories: list[str] | None = None
    log_x: bool = False
    note: str = ""
    x_range: tuple[float, float] | None = None  # line plots: fixed x extent (e.g. shared with a sibling panel)
    marker: str | None = "o"  # line plots: the point marker (None for long curves)
    y_from_zero: bool = False  # line plots: the y axis starts at 0


def _draw(ax, panel: Panel) -> None:
    if panel.categories is not None:
        n = max(len(panel.series), 1)
        width = 0.8 / n
        for k, s in enumerate(panel.series):
            xs = [i + (k - (n - 1) / 2) * width for i, v in enumerate(s.y) if v is not None]
            ax.bar(xs, [v for v in s.y if v is not None], width, label=s.name or None)
        ax.set_xticks(range(len(panel.categories)), panel.categories, rotation=30, ha="right")
    else:
        for s in panel.series:
            pts = [(x, y) for x, y in zip(s.x, s.y) if y is not None]
            if pts:  # a lone point (a run's first report) needs a marker to be seen at all
                ax.plot(*zip(*pts), marker=panel.marker or ("o" if len(pts) == 1 else None), label=s.name or None)
        if panel.log_x:
            ax.set_xscale("log")
        if panel.x_range is not None and panel.x_range[0] < panel.x_range[1]:
            pad = (
                (panel.x_range[1] / panel.x_range[0]) ** 0.05
                if panel.log_x
                else (panel.x_range[1] - panel.x_range[0]) * 0.05
            )
            lo, hi = panel.x_range
            ax.set_xlim(lo / pad, hi * pad) if panel.log_x else ax.set_xlim(lo - pad, hi + pad)
        if panel.y_from_zero:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
    ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
    ax.grid(alpha=0.3)
    if any(s.name for s in panel.series):
        ax.legend(fontsize=8, loc="best")
    if panel.note:
        ax.annotate(
            panel.note,
            (0, -0.42 if panel.categories is not None else -0.3),
            xycoords="axes fraction",
            fontsize=7,
            color="0.4",
        )


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_plot(path: Path | str, panels: list[Panel], title: str | None = None, ncols: int | None = None) -> Path:
    """Render `panels` in rows of `ncols` (default: one row; 4.6 × 3.6 in each) and write the PNG atomically."""
    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return atomic_write_bytes(path, figure_png(fig))


def colormap(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(H, W) floats → (H, W, 3) uint8 in matplotlib's viridis over [lo, hi] (default: the array's range)."""
    v = np.asarray(values, dtype=np.float32)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    u = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return np.round(matplotlib.colormaps["viridis"](u)[..., :3] * 255).astype(np.uint8)


def save_image_table(
    path: Path | str,
    cells: list[list[np.ndarray]],
    row_labels: list[str],
    col_labels: list[str],
    title: str = "",
    note: str = "",
) -> Path:
    """A labelled grid of uint8 HWC images (rows may be shorter than the header) as a PNG, written atomically."""
    rows, cols = len(cells), max(len(r) for r in cells)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols + 1.6, 1.2 * rows + 0.8), squeeze=False)
    for r, row in enumerate(cells):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                arr = row[c]
                ax.imshow(arr.squeeze(-1) if arr.shape[-1] == 1 else arr, cmap="gray", interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=8)
        axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="0.4")
    return atomic_write_bytes(path, figure_png(fig))
