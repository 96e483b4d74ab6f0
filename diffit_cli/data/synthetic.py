"""The built-in synthetic dataset: procedural shapes (8 classes) for tests and the demo (no download)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from diffit_cli.data.images import DataError
from diffit_cli.data.sources import PixelSource

SYNTHETIC_SIZE = 50_000
SYNTHETIC_CLASSES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "crescent")
# Built-in synthetic styles. "varied": anywhere in the frame, rotated up to ±25°, bright-on-dark or dark-on-bright,
# textured backgrounds. "simple": near the centre, upright, larger, always bright on a dark untextured gradient.
# A network of the `demo` preset's size draws recognizable shapes from "simple" after 90 kimg at 32² (48 at 16²);
# from "varied", and from variants that fix only the polarity or only the placement, it still draws blobs after
# 60-100 kimg (at 32²).
SYNTHETIC_STYLES = {
    "varied": {"size": (0.4, 0.25), "offset": 1.0, "rotation": 25.0, "texture": 1.0, "always_dark": False},
    "simple": {"size": (0.55, 0.2), "offset": 0.3, "rotation": 0.0, "texture": 0.0, "always_dark": True},
}


def _fold_sdf(u: np.ndarray, v: np.ndarray, k: int, inner: float, phase: float) -> np.ndarray:
    """Approximate signed distance to a k-gon (inner = cos(π/k)) or k-point star (smaller inner radius)
    with unit circumradius and a vertex at angle `phase`: fold the plane into half a sector."""
    a = 2 * math.pi / k
    ang = np.mod(np.arctan2(v, u) - phase, a)
    ang = np.minimum(ang, a - ang)
    r = np.hypot(u, v)
    qx, qy = r * np.cos(ang), r * np.sin(ang)
    bx, by = inner * math.cos(a / 2), inner * math.sin(a / 2)
    ex, ey = bx - 1.0, by
    n = math.hypot(ex, ey)
    nx, ny = ey / n, -ex / n  # outward normal of the edge from the vertex (1, 0) to b
    return (qx - 1.0) * nx + qy * ny


def _rhombus(u, v, a, b):
    return (np.abs(u) / a + np.abs(v) / b - 1) * (a * b / math.hypot(a, b))


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: np.hypot(u, v) - 0.9,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.75,
    "triangle": lambda u, v: _fold_sdf(u / 1.1, v / 1.1 - 0.1, 3, 0.5, -math.pi / 2) * 1.1,
    "cross": lambda u, v: np.minimum(
        np.maximum(np.abs(u) - 0.95, np.abs(v) - 0.3), np.maximum(np.abs(u) - 0.3, np.abs(v) - 0.95)
    ),
    "diamond": lambda u, v: _rhombus(u, v, 0.62, 1.0),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.7) - 0.25,
    "star": lambda u, v: _fold_sdf(u, v, 5, 0.45, -math.pi / 2),
    "crescent": lambda u, v: np.maximum(np.hypot(u, v) - 0.95, 0.8 - np.hypot(u - 0.5, v + 0.25)),
}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


class SyntheticShapes(PixelSource):
    """Built-in procedural dataset: a coloured shape (class) on a gradient (+ sinusoid texture) background.

    Item i is a pure function of (style, seed, i): class = i mod 8 (balanced), the rest from a NumPy generator
    seeded with (seed, i). Vectorised NumPy per item (≈0.1 ms at 32²); any resolution; anti-aliased. `style`
    is a key of SYNTHETIC_STYLES: "varied" shapes span 40–65 % of the width, rotated by at most ±25° (so square
    and diamond stay distinct); "simple" ones 55–75 %, upright, near the centre.
    """

    def __init__(
        self,
        resolution: int = 32,
        *,
        channels: int = 3,
        size: int = SYNTHETIC_SIZE,
        seed: int = 0,
        xflip: bool = False,
        style: str = "varied",
    ):
        super().__init__(resolution, channels, xflip, False)
        if size < 1:
            raise DataError(f"the synthetic dataset needs at least one item, got size={size}")
        if style not in SYNTHETIC_STYLES:
            raise DataError(f"unknown synthetic style {style!r}; choose one of {', '.join(SYNTHETIC_STYLES)}")
        self.size, self.seed, self.style = int(size), int(seed), style
        self.name = f"synthetic-shapes(style={style}, seed={self.seed}, size={self.size})"
        self.class_names = SYNTHETIC_CLASSES
        self._raw_labels = np.arange(self.size, dtype=np.int64) % len(SYNTHETIC_CLASSES)
        c = (np.arange(self.resolution, dtype=np.float32) + 0.5) * (2.0 / self.resolution) - 1.0
        self._ys, self._xs = np.meshgrid(c, c, indexing="ij")

    def _decode(self, i: int) -> np.ndarray:
        return self.render(i)

    def render(self, i: int) -> np.ndarray:
        """CHW uint8 image of item i (no x-flip)."""
        st = SYNTHETIC_STYLES[self.style]
        rng = np.random.default_rng((self.seed, int(i)))
        xs, ys = self._xs, self._ys
        u01 = rng.random(16)
        dark = st["always_dark"] or u01[0] < 0.5  # dark background + bright shape, or the reverse
        lo, hi = (0.08, 0.42) if dark else (0.62, 0.95)
        c0 = _hsv(u01[1], 0.15 + 0.45 * u01[2], lo + (hi - lo) * u01[3])
        c1 = _hsv((u01[1] + 0.1 + 0.3 * u01[4]) % 1, 0.15 + 0.45 * u01[5], lo + (hi - lo) * u01[6])
        t = 2 * math.pi * u01[7]
        g = np.clip((xs * math.cos(t) + ys * math.sin(t)) * 0.5 + 0.5, 0, 1)
        f, phi, phase = 1.5 + 3.5 * u01[8], 2 * math.pi * u01[9], 2 * math.pi * u01[10]
        tex = (
            st["texture"]
            * (0.04 + 0.06 * u01[11])
            * np.sin(math.pi * f * (xs * math.cos(phi) + ys * math.sin(phi)) + phase)
        )
        bg = c0[:, None, None] + (c1 - c0)[:, None, None] * g + tex

        s = st["size"][0] + st["size"][1] * u01[12]
        cx, cy = st["offset"] * (0.9 - s) * (2 * rng.random(2) - 1)
        rot = math.radians(st["rotation"]) * (2 * u01[13] - 1)
        dx, dy = xs - cx, ys - cy
        u = (dx * math.cos(rot) + dy * math.sin(rot)) / s
        v = (-dx * math.sin(rot) + dy * math.cos(rot)) / s
        sdf = _SHAPES[SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]](u, v)
        alpha = np.clip(0.5 - sdf * (s * self.resolution / 2), 0, 1)
        fv = (0.8 + 0.2 * u01[15]) if dark else (0.12 + 0.25 * u01[15])
        fg = _hsv(u01[14], 0.55 + 0.45 * rng.random(), fv)
        shade = 1 + 0.12 * np.clip(u - v, -1.5, 1.5)
        img = bg + (fg[:, None, None] * shade - bg) * alpha
        img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        if self.num_channels == 1:
            img = np.round(img.astype(np.float32).transpose(1, 2, 0) @ np.array([0.299, 0.587, 0.114], np.float32))[
                None
            ]
            img = img.astype(np.uint8)
        return img

    def fingerprint(self) -> str:
        style = "" if self.style == "varied" else f"{self.style}-"  # "varied" keeps the v1 fingerprint
        return f"synthetic-shapes-v1-{style}{self.seed}-{self.size}"
