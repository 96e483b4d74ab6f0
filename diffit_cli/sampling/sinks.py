"""Where sampled images go: a PNG folder in EDM's layout (`PngSink`), ADM-style `.npz` parts assembled into one file
(`NpzSink`), image grids and PNG writing. A sink knows which seeds it holds, so a rerun resumes."""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from diffit_cli.errors import DiffitError
from diffit_cli.fileio import atomic_write, atomic_write_bytes


def image_grid(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
    """uint8 NHWC → one uint8 HWC grid image (ncol defaults to ⌈√N⌉)."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = img
    return grid


def save_png(path: Path | str, image: np.ndarray) -> Path:
    """Write one uint8 HWC image as PNG, atomically."""

    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def png_path(out_dir: Path, seed: int) -> Path:
    """EDM layout: one subfolder per thousand seeds."""
    return Path(out_dir) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


PNG_END = b"IEND\xaeB`\x82"  # a PNG's last chunk (type and CRC): a file cut short by a crash lacks it


class PngSink:
    """One PNG per seed; seeds whose complete file exists are done (so a rerun resumes). Files a machine crash cut
    short are removed and listed in `torn`, so their seeds are sampled again."""

    def __init__(self, out_dir: Path):
        self.out = Path(out_dir)
        self.torn: list[Path] = []

    def done(self, seeds: list[int]) -> set[int]:
        have = set()
        for s in seeds:
            path = png_path(self.out, s)
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                f.seek(max(path.stat().st_size - len(PNG_END), 0))
                complete = f.read() == PNG_END
            if complete:
                have.add(s)
            else:
                path.unlink()
                self.torn.append(path)
        return have

    def write(self, seeds: list[int], labels: np.ndarray | None, images: np.ndarray) -> None:
        for s, img in zip(seeds, images):
            save_png(png_path(self.out, s), img)

    def images(self, seeds: list[int]) -> np.ndarray:

        arrays = [np.asarray(Image.open(png_path(self.out, s))) for s in seeds]
        return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])

    def finish(self, seeds: list[int]) -> Path:
        return self.out

    def clear(self) -> None:
        """Remove the images of an earlier run (`NNNNNN/NNNNNN.png`; nothing else in the folder)."""
        for f in self.out.glob("[0-9]" * 6 + "/" + "[0-9]" * 6 + ".png"):
            f.unlink()


class NpzSink:
    """ADM evaluator contract (`arr_0` uint8 NHWC, `arr_1` labels): per-batch parts, assembled when complete.

    Parts live in `<out>.parts/`; every process writes its own batches, so a killed run resumes with
    the seeds that are missing. The final `.npz` is streamed in seed order into a temporary file and
    renamed, so memory stays at one part and a half-written `.npz` never exists.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.torn: list[Path] = []

    def clear(self) -> None:
        """Remove the `.npz` and the parts of an earlier run."""
        for f in self._part_files():
            f.unlink()
        if self.parts.is_dir():
            self.parts.rmdir()
        self.out.unlink(missing_ok=True)

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.npz")) if self.parts.is_dir() else []

    def done(self, seeds: list[int]) -> set[int]:
        """Seeds in readable parts; a part a machine crash tore is removed (listed in `torn`) and redone."""
        have: set[int] = set()
        for f in self._part_files():
            try:
                with np.load(f) as z:
                    have.update(int(s) for s in z["seeds"])
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
                f.unlink(missing_ok=True)
                self.torn.append(f)
        return have & set(seeds)

    def write(self, seeds: list[int], labels: np.ndarray | None, images: np.ndarray) -> None:
        buf = io.BytesIO()
        arrays = {"seeds": np.asarray(seeds, dtype=np.int64), "images": images}
        if labels is not None:
            arrays["labels"] = labels.astype(np.int64)
        np.savez(buf, **arrays)
        atomic_write_bytes(self.parts / f"part-{seeds[0]:09d}-{seeds[-1]:09d}.npz", buf.getvalue())

    def images(self, seeds: list[int]) -> np.ndarray:
        wanted, found = set(seeds), {}
        for f in self._part_files():
            with np.load(f) as z:
                for i, s in enumerate(z["seeds"]):
                    if int(s) in wanted:
                        found[int(s)] = z["images"][i]
        return np.stack([found[s] for s in seeds])

    def finish(self, seeds: list[int]) -> Path:

        index: dict[int, tuple[Path, int]] = {}
        for f in self._part_files():
            with np.load(f) as z:
                for i, s in enumerate(z["seeds"]):
                    index[int(s)] = (f, i)
        missing = [s for s in seeds if s not in index]
        if missing:
            raise DiffitError(
                f"{len(missing)} seeds are missing from {self.parts} (first: {missing[0]}); "
                "rerun the same command to finish them"
            )
        with np.load(index[seeds[0]][0]) as z:
            h, w, c = z["images"].shape[1:]
            members = [("arr_0", "images", np.uint8, (len(seeds), h, w, c))]
            if "labels" in z.files:
                members.append(("arr_1", "labels", np.int64, (len(seeds),)))

        def write(f) -> None:  # one .npy member at a time, rows in seed order, one part file in memory
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for member, key, dtype, shape in members:
                    with zf.open(f"{member}.npy", "w", force_zip64=True) as fp:
                        np.lib.format.write_array_header_2_0(
                            fp,
                            {
                                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                "fortran_order": False,
                                "shape": shape,
                            },
                        )
                        loaded: tuple[Path | None, np.ndarray | None] = (None, None)
                        for s in seeds:
                            part, row = index[s]
                            if loaded[0] != part:
                                with np.load(part) as z:
                                    loaded = (part, z[key])
                            fp.write(np.ascontiguousarray(loaded[1][row], dtype=dtype).tobytes())

        atomic_write(self.out, write)
        for f in self._part_files():
            f.unlink()
        self.parts.rmdir()
        return self.out
