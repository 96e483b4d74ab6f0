"""Small, dependency-free charts with PIL: line and grouped-bar panels (axes, ticks, labels, legend) and heat maps.

matplotlib is not a dependency; these draw what `diffit ablate` needs and nothing more. A figure is a row of
:class:`Panel` objects saved as one PNG by :func:`save_plot`.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffit_cli.fileio import atomic_write_bytes

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
# viridis at 9 evenly spaced points (for heat maps)
_VIRIDIS = np.array([(68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140), (40, 174, 128),
                     (94, 201, 98), (173, 220, 48), (253, 231, 37)], dtype=np.float32)

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

_ASCII = {"§": "sec. ", "σ": "sigma", "×": "x", "–": "-", "—": "-", "Δ": "d", "→": "->", "≥": ">=", "·": "*"}
_UNICODE_FONT: list = []  # [bool] once probed: whether DejaVu Sans (Greek, §, ×) is available

@functools.lru_cache(maxsize=None)
def font(size: int = 13) -> ImageFont.ImageFont:
    """DejaVu Sans when the system has it (it draws σ, §, ×), else Pillow's built-in font (ASCII only)."""
    try:
        f = ImageFont.truetype("DejaVuSans.ttf", size)
        _UNICODE_FONT[:] = [True]
        return f
    except OSError:
        _UNICODE_FONT[:] = [False]
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font, fixed size
        return ImageFont.load_default()

def _t(text: str) -> str:
    """Text as the chosen font can draw it."""
    if _UNICODE_FONT and _UNICODE_FONT[0]:
        return text
    return "".join(_ASCII.get(c, c if ord(c) < 128 else "?") for c in text)

def _text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    box = draw.textbbox((0, 0), _t(text), font=f)
    return box[2] - box[0], box[3] - box[1]

def _text(draw: ImageDraw.ImageDraw, xy, text: str, f, fill="black") -> None:
    draw.text(xy, _t(text), fill=fill, font=f)

def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1-2-5 steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while not ticks or ticks[-1] < hi - 1e-12:
        ticks.append(round(v, 10))
        v += step
    return ticks

def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.4g}"

def _tick_labels(ticks: list[float]) -> list[str]:
    """Labels with as many decimals as the tick step needs (so 14.005 and 14.01 never both read 14.01)."""
    if len(ticks) < 2:
        return [_fmt(t) for t in ticks]
    step = abs(ticks[1] - ticks[0])
    if step == 0 or max(abs(t) for t in ticks) >= 1e5 or step < 1e-4:
        return [_fmt(t) for t in ticks]
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    return [f"{t:.{decimals}f}" for t in ticks]

def _draw_panel(panel: Panel, size: tuple[int, int]) -> Image.Image:
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f, fs, ft = font(12), font(11), font(14)
    left, right, top, bottom = 70, 16, 34, 52 + (14 if panel.note else 0)
    x0, y0, x1, y1 = left, top, W - right, H - bottom  # plot area
    tw, _ = _text_size(d, panel.title, ft)
    _text(d, ((W - tw) / 2, 8), panel.title, ft)

    ys = [v for s in panel.series for v in s.y if v is not None and math.isfinite(v)]
    bars = panel.categories is not None
    if not ys:
        d.rectangle([x0, y0, x1, y1], outline="black")
        msg = "no values yet"
        mw, mh = _text_size(d, msg, f)
        _text(d, ((x0 + x1 - mw) / 2, (y0 + y1 - mh) / 2), msg, f, (120, 120, 120))
        return img
    lo, hi = min(ys), max(ys)
    if bars:
        lo = min(lo, 0.0)
    pad = (hi - lo) * 0.08 or (abs(hi) * 0.1 or 1.0)
    yt = nice_ticks(lo if bars and lo == 0 else lo - pad, hi + pad)
    ylo, yhi = yt[0], yt[-1]

    def Y(v: float) -> float:
        return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

    # axes, y grid and ticks
    for t, label in zip(yt, _tick_labels(yt)):
        yy = Y(t)
        d.line([x0, yy, x1, yy], fill=(228, 228, 228))
        d.line([x0 - 4, yy, x0, yy], fill="black")
        lw, lh = _text_size(d, label, fs)
        _text(d, (x0 - 7 - lw, yy - lh / 2 - 2), label, fs)
    d.rectangle([x0, y0, x1, y1], outline="black")

    drawn: list[tuple[float, float]] = []  # pixel positions of data, to keep the legend off them
    if bars:
        cats = panel.categories or []
        n_s = max(len(panel.series), 1)
        slot = (x1 - x0) / max(len(cats), 1)
        bw = slot * 0.8 / n_s
        for ci, cat in enumerate(cats):
            cx = x0 + slot * (ci + 0.5)
            lw, _ = _text_size(d, cat, fs)
            _text(d, (cx - lw / 2, y1 + 6), cat, fs)
            for si, s in enumerate(panel.series):
                v = s.y[ci] if ci < len(s.y) else None
                if v is None or not math.isfinite(v):
                    continue
                bx = cx - slot * 0.4 + si * bw
                d.rectangle([bx + 1, Y(v), bx + bw - 1, Y(max(ylo, 0.0))], fill=PALETTE[si % len(PALETTE)])
                drawn.extend((bx + bw * k / 4, yy) for k in range(5) for yy in (Y(v), Y(v) - 14))
                vw, vh = _text_size(d, _fmt(v), fs)
                _text(d, (bx + bw / 2 - vw / 2, Y(v) - vh - 5), _fmt(v), fs, (60, 60, 60))
    else:
        xs = [x for s in panel.series for x, v in zip(s.x, s.y) if v is not None]
        if panel.x_range is not None:
            xs_all = [x for s in panel.series for x in s.x] + list(panel.x_range)
            xs = sorted(set(xs_all)) if len(set(xs_all)) <= 8 else xs + list(panel.x_range)
        tx = (lambda v: math.log10(v)) if panel.log_x else (lambda v: v)
        xlo, xhi = min(map(tx, xs)), max(map(tx, xs))
        if xhi - xlo < 1e-12:
            xlo, xhi = xlo - 1, xhi + 1
        xpad = (xhi - xlo) * 0.06

        def X(v: float) -> float:
            return x0 + (tx(v) - xlo + xpad) / (xhi - xlo + 2 * xpad) * (x1 - x0)

        xt = sorted({x for x in xs}) if len(set(xs)) <= 8 else nice_ticks(min(xs), max(xs), 6)
        xlabels = [_fmt(t) for t in xt] if len(set(xs)) <= 8 else _tick_labels(xt)
        last_right = -1e9
        for t, label in zip(xt, xlabels):
            xx = X(t)
            if x0 <= xx <= x1:
                d.line([xx, y1, xx, y1 + 4], fill="black")
                lw, _ = _text_size(d, label, fs)
                if xx - lw / 2 > last_right + 4:  # skip a label that would overlap its neighbour
                    _text(d, (xx - lw / 2, y1 + 6), label, fs)
                    last_right = xx + lw / 2
        for si, s in enumerate(panel.series):
            color = PALETTE[si % len(PALETTE)]
            pts = [(X(x), Y(v)) for x, v in sorted(zip(s.x, s.y)) if v is not None and math.isfinite(v)]
            for (ax, ay), (bx_, by) in zip(pts[:-1], pts[1:]):  # sample the segments for legend placement
                drawn.extend((ax + (bx_ - ax) * k / 8, ay + (by - ay) * k / 8) for k in range(9))
            drawn.extend(pts)
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for px, py in pts:
                d.ellipse([px - 3.5, py - 3.5, px + 3.5, py + 3.5], fill=color, outline="white")

    # axis labels (y rotated)
    lw, lh = _text_size(d, panel.xlabel, f)
    _text(d, ((x0 + x1 - lw) / 2, y1 + 26), panel.xlabel, f)
    lw, lh = _text_size(d, panel.ylabel, f)
    label = Image.new("RGB", (lw + 4, lh + 6), "white")
    _text(ImageDraw.Draw(label), (2, 0), panel.ylabel, f)
    label = label.rotate(90, expand=True)
    img.paste(label, (6, int((y0 + y1 - label.height) / 2)))
    if panel.note:
        nw, _ = _text_size(d, panel.note, fs)
        _text(d, ((W - nw) / 2, H - 18), panel.note, fs, (90, 90, 90))

    # legend (top right, inside the plot area)
    def shown(s: Series) -> bool:
        return bool(s.name) and any(v is not None and math.isfinite(v) for v in s.y)

    named = [s for s in panel.series if s.name]
    rows = [(s.name, PALETTE[i % len(PALETTE)]) for i, s in enumerate(panel.series) if shown(s)]
    if rows and (len(named) > 1 or bars):
        width = max(_text_size(d, n, fs)[0] for n, _ in rows) + 28
        height = 16 * len(rows) + 6
        corners = [(x1 - width - 6, y0 + 6), (x0 + 6, y0 + 6), (x1 - width - 6, y1 - height - 6),
                   (x0 + 6, y1 - height - 6)]

        def covered(c: tuple[float, float]) -> int:  # data points (and their segments' samples) under the box
            return sum(c[0] - 6 <= px <= c[0] + width + 6 and c[1] - 6 <= py <= c[1] + height + 6
                       for px, py in drawn)

        lx, ly = min(corners, key=covered)
        d.rectangle([lx, ly, lx + width, ly + height], fill="white", outline=(160, 160, 160))
        for i, (name, color) in enumerate(rows):
            yy = ly + 4 + 16 * i
            d.rectangle([lx + 6, yy + 3, lx + 16, yy + 11], fill=color)
            _text(d, (lx + 22, yy), name, fs)
    return img

def render_plot(panels: list[Panel], title: str | None = None, panel_size: tuple[int, int] = (460, 340)) -> Image.Image:
    """Panels side by side under an optional figure title."""
    head = 28 if title else 0
    fig = Image.new("RGB", (panel_size[0] * len(panels), panel_size[1] + head), "white")
    if title:
        d = ImageDraw.Draw(fig)
        f = font(15)
        tw, _ = _text_size(d, title, f)
        _text(d, ((fig.width - tw) / 2, 6), title, f)
    for i, p in enumerate(panels):
        fig.paste(_draw_panel(p, panel_size), (i * panel_size[0], head))
    return fig

def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

def save_plot(path: Path | str, panels: list[Panel], title: str | None = None) -> Path:
    """Render `panels` and write the PNG atomically."""

    return atomic_write_bytes(path, png_bytes(render_plot(panels, title)))

# ------------------------------------------------------------------------------------------------ heat maps
def colormap(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(H, W) floats → (H, W, 3) uint8 with a viridis-like ramp over [lo, hi] (default: the array's range)."""
    v = np.asarray(values, dtype=np.float32)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    u = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(u.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (u - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - frac) + _VIRIDIS[i + 1] * frac).astype(np.uint8)

def image_table(cells: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str], title: str = "",
                cell: int = 96, note: str = "") -> Image.Image:
    """A labelled grid of uint8 HWC images (each resized to cell×cell, nearest) with row and column headers."""
    f, fs = font(13), font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lw = max([_text_size(probe, r, f)[0] for r in row_labels] + [0]) + 14
    top = (26 if title else 4) + 20
    rows, cols = len(cells), max(len(r) for r in cells)
    W = lw + cols * (cell + 4) + 6
    H = top + rows * (cell + 4) + (20 if note else 6)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if title:
        _text(d, (8, 6), title, font(14))
    for c, label in enumerate(col_labels):
        tw, _ = _text_size(d, label, fs)
        _text(d, (lw + c * (cell + 4) + (cell - tw) / 2, top - 18), label, fs)
    for r, (label, row) in enumerate(zip(row_labels, cells)):
        y = top + r * (cell + 4)
        _, th = _text_size(d, label, f)
        _text(d, (6, y + (cell - th) / 2), label, f)
        for c, arr in enumerate(row):
            tile = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert("RGB")
            img.paste(tile.resize((cell, cell), Image.NEAREST), (lw + c * (cell + 4), y))
    if note:
        _text(d, (8, H - 17), note, fs, (90, 90, 90))
    return img
