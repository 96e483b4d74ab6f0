"""Data-source speed: milliseconds per item of the built-in synthetic shapes (target < 1 ms at 32², so the demo's
loader never waits on it) and of an image folder of PNGs, best of three passes of 100 items.

    python benchmarks/bench_data.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffit_cli.data import ImageFolderSource, SyntheticShapes


def per_item_ms(src, start: int = 0, n: int = 100, reps: int = 3) -> float:
    best = float("inf")
    for rep in range(reps):
        t = time.perf_counter()
        for i in range(n):
            src[(start + rep * n + i) % len(src)]
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e3


def main() -> None:
    for res in (32, 64):
        ms = per_item_ms(SyntheticShapes(res, size=1000))
        print(
            f"synthetic shapes {res}²: {ms:.3f} ms/item"
            + (f"  (target < 1 ms: {'met' if ms < 1 else 'MISSED'})" if res == 32 else "")
        )
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for i in range(100):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(Path(d) / f"{i:03d}.png")
        print(f"image folder, 64² PNG → 32²: {per_item_ms(ImageFolderSource(d, 32)):.3f} ms/item")


if __name__ == "__main__":
    main()
