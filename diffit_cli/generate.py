"""Seeds → per-seed noise → sampler → uint8 batches (DESIGN §3 Generate), plus PNG/NPZ/grid sinks.

Reproducibility contract: image *i* depends only on seed *i*. Each seed owns a `torch.Generator`
that draws its label (when random), its initial noise and every stochastic step of the sampler, so
the batch size and the number of processes never change an image.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from diffit_cli.config import Preset, SampleConfig
from diffit_cli.core.guidance import Guidance
from diffit_cli.core.samplers import nfe
from diffit_cli.core.samplers import sample as run_sampler
from diffit_cli.errors import DiffitError
from diffit_cli.fileio import atomic_write, atomic_write_bytes

Decode = Callable[[torch.Tensor], np.ndarray]  # model-space batch → uint8 NHWC


def parse_seeds(text: str) -> list[int]:
    """'0-49999', '1,5,7' or '0-9,100' → a list of seeds (EDM's --seeds syntax)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise DiffitError(f"bad seed list {text!r}: use ranges and lists such as 0-49999 or 1,5,7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise DiffitError(f"bad seed range {part!r}: the end is before the start")
        seeds.extend(range(lo, hi + 1))
    return seeds


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """'random' / None → drawn per seed; '207' or '1,2,3' → fixed labels, cycled over the seeds."""
    if text is None or str(text).strip() in ("", "random"):
        return None
    try:
        classes = [int(c) for c in str(text).split(",")]
    except ValueError:
        raise DiffitError(f"bad --classes {text!r}: give 'random', a class index or a comma-separated list") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DiffitError(f"--classes {bad} out of range: this model has classes 0..{num_classes - 1}")
    return classes


def make_guidance(sample: SampleConfig, num_classes: int) -> Guidance | None:
    """`core.guidance.Guidance` from `sample.guidance` (validated with the preset); None when the scale is 1."""
    if sample.guidance.scale == 1.0:
        return None
    if num_classes == 0:
        raise DiffitError("classifier-free guidance (--cfg-scale != 1) needs a class-conditional model")
    return Guidance(**sample.guidance.model_dump(), null_class=num_classes)


def seed_labels(seeds: list[int], num_classes: int, classes: list[int] | None) -> torch.Tensor | None:
    """Class label of each seed: fixed (cycled) or drawn from the seed alone."""
    if num_classes == 0:
        return None
    if classes is not None:
        return torch.tensor([classes[i % len(classes)] for i in range(len(seeds))], dtype=torch.long)
    return torch.tensor([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(s)))
                         for s in seeds], dtype=torch.long)


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_batch(net: torch.nn.Module, diffusion, shape: tuple[int, int, int], seeds: list[int],
                 labels: torch.Tensor | None, sample: SampleConfig, device: torch.device, num_classes: int,
                 precision: str = "fp32") -> torch.Tensor:
    """Model-space samples (B, C, H, W) float32 for `seeds`; each row depends only on its seed."""
    gens = _generators(seeds, device)
    noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])  # (B, C, H, W)
    y = labels.to(device) if labels is not None else None
    autocast = torch.bfloat16 if precision == "bf16" else None
    return run_sampler(diffusion, net, noise, y=y, sampler=sample.sampler, steps=sample.steps,
                       guidance=make_guidance(sample, num_classes), generators=gens, autocast_dtype=autocast,
                       **sample.sampler_kwargs())


def generate(net: torch.nn.Module, diffusion, preset: Preset, seeds: list[int], decode: Decode, *,
             precision: str = "fp32", batch: int = 64, device: torch.device | str = "cpu",
             classes: list[int] | None = None) -> Iterator[tuple[list[int], np.ndarray | None, np.ndarray]]:
    """Yield `(seeds, labels, uint8 NHWC images)` batches sampled with `preset.sample` (DESIGN §3)."""
    device = torch.device(device)
    m = preset.model
    size = m.spatial_size
    shape = (m.in_channels, size, size)
    labels = seed_labels(seeds, m.num_classes, classes)
    for i in range(0, len(seeds), batch):
        chunk = seeds[i:i + batch]
        y = labels[i:i + batch] if labels is not None else None
        x = sample_batch(net, diffusion, shape, chunk, y, preset.sample, device, m.num_classes, precision)
        yield chunk, (y.numpy() if y is not None else None), decode(x)


def preview_grid(net: torch.nn.Module, diffusion, preset: Preset, decode: Decode, path: Path | str,
                 device: torch.device | str = "cpu", seeds: int = 64) -> Path:
    """Training's preview: `seeds` samples of `net` with the preset's sampler (one class per column when
    class-conditional), saved as a grid PNG at `path` and as `grid-latest.png` beside it."""
    k = preset.model.num_classes
    classes = list(range(min(k, 8))) if k else None
    precision = "bf16" if preset.train.mixed_precision == "bf16" else "fp32"
    _, _, images = next(generate(net, diffusion, preset, list(range(seeds)), decode, precision=precision,
                                 batch=seeds, device=device, classes=classes))
    grid = image_grid(images, ncol=len(classes) if classes else None)
    save_png(Path(path).with_name("grid-latest.png"), grid)
    return save_png(path, grid)


def image_grid(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
    """uint8 NHWC → one uint8 HWC grid image (ncol defaults to ⌈√N⌉)."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    return grid


def save_png(path: Path | str, image: np.ndarray) -> Path:
    """Write one uint8 HWC image as PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ sinks
def png_path(out_dir: Path, seed: int) -> Path:
    """EDM layout: one subfolder per thousand seeds."""
    return Path(out_dir) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


class PngSink:
    """One PNG per seed; seeds whose file exists are done (so a rerun resumes)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def done(self, seeds: list[int]) -> set[int]:
        return {s for s in seeds if png_path(self.out_dir, s).is_file()}

    def write(self, seeds: list[int], labels: np.ndarray | None, images: np.ndarray) -> None:
        for s, img in zip(seeds, images):
            save_png(png_path(self.out_dir, s), img)

    def images(self, seeds: list[int]) -> np.ndarray:
        from PIL import Image

        arrays = [np.asarray(Image.open(png_path(self.out_dir, s))) for s in seeds]
        return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])

    def finish(self, seeds: list[int]) -> Path:
        return self.out_dir


class NpzSink:
    """ADM evaluator contract (`arr_0` uint8 NHWC, `arr_1` labels): per-batch parts, assembled when complete.

    Parts live in `<out>.parts/`; every process writes its own batches, so a killed run resumes with
    the seeds that are missing. The final `.npz` is streamed in seed order into a temporary file and
    renamed, so memory stays at one part and a half-written `.npz` never exists.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.npz")) if self.parts.is_dir() else []

    def done(self, seeds: list[int]) -> set[int]:
        have: set[int] = set()
        for f in self._part_files():
            with np.load(f) as z:
                have.update(int(s) for s in z["seeds"])
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
        import zipfile

        index: dict[int, tuple[Path, int]] = {}
        for f in self._part_files():
            with np.load(f) as z:
                for i, s in enumerate(z["seeds"]):
                    index[int(s)] = (f, i)
        missing = [s for s in seeds if s not in index]
        if missing:
            raise DiffitError(f"{len(missing)} seeds are missing from {self.parts} (first: {missing[0]}); "
                              "rerun the same command to finish them")
        with np.load(index[seeds[0]][0]) as z:
            h, w, c = z["images"].shape[1:]
            members = [("arr_0", "images", np.uint8, (len(seeds), h, w, c))]
            if "labels" in z.files:
                members.append(("arr_1", "labels", np.int64, (len(seeds),)))

        def write(f) -> None:  # one .npy member at a time, rows in seed order, one part file in memory
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for member, key, dtype, shape in members:
                    with zf.open(f"{member}.npy", "w", force_zip64=True) as fp:
                        np.lib.format.write_array_header_2_0(fp, {
                            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                            "shape": shape})
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


# ---------------------------------------------------------------------------------------- the whole run
def resolve_weights(ref: str) -> Path:
    """A local file, or a Hub reference `REPO:FILE` (e.g. nvidia/DiffiT:diffit_256.safetensors) via the HF cache."""
    path = Path(ref)
    if path.exists() or ":" not in ref:
        if not path.is_file():
            raise DiffitError(f"checkpoint {ref!r} does not exist (give a .pt/.safetensors file or REPO:FILE)")
        return path
    repo, _, filename = ref.partition(":")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # offline, missing repo/file, no network: one message with the fix
        raise DiffitError(f"could not fetch {filename!r} from the Hub repository {repo!r} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); when offline, download it elsewhere "
                          f"(huggingface-cli download {repo} {filename}) and pass the local file") from None


def make_decoder(preset: Preset, vae: str | None, device: torch.device, precision: str) -> tuple[Decode, str | None]:
    """Pixel models decode directly; latent models through the SD VAE (preset's, or `vae` if given)."""
    from diffit_cli.codecs import make_codec

    if preset.data.space == "pixel":
        return make_codec(preset.data).decode, None
    return make_codec(preset.data, device, vae=vae, precision=precision).decode, vae or preset.data.vae


def run_sample(ckpt: str, seeds: list[int], out: Path | str, *, preset: Preset | None = None,
               overrides: list[str] | None = None, sample: dict | None = None, precision: str = "fp32",
               batch: int | None = None, classes: str | None = None,
               vae: str | None = None, raw: bool = False, grid: Path | str | None = None,
               progress: Callable[[dict], None] | None = None) -> dict:
    """`diffit sample`: generate images for `seeds` into a PNG folder or an `.npz`, resumably, on every process.

    `preset` is needed only for weight files that carry none (the release); `overrides` are
    `sample.key=value` strings (`--set`) and `sample` typed values by dotted key within the section (the command's
    flags, e.g. {"guidance.scale": 4.6}), both applied to the checkpoint's preset and validated like any preset
    before a network is built.
    """
    import json
    import platform

    from accelerate import PartialState

    from diffit_cli import __version__
    from diffit_cli.build import build_diffusion
    from diffit_cli.checkpoint import file_sha256, read_snapshot, snapshot_network
    from diffit_cli.config import apply_overrides, preset_to_dict, set_values, validate_preset

    if not seeds:
        raise DiffitError("no seeds to sample: pass e.g. --seeds 0-63")
    if len(set(seeds)) != len(seeds):
        raise DiffitError("--seeds lists a seed twice; each seed is one image")
    state = PartialState(cpu=not torch.cuda.is_available())  # gloo processes on GPU-less machines
    device = state.device
    path = resolve_weights(ckpt)
    bad = [o for o in overrides or [] if not o.startswith(("sample.", "eval."))]
    if bad:
        raise DiffitError(f"sampling can only change sample.* settings, not {bad[0]!r}")
    if precision not in ("fp32", "bf16"):
        raise DiffitError(f"precision {precision!r}: choose fp32 or bf16")
    weights, preset = read_snapshot(path, preset=preset, ema=not raw)
    raw_preset = set_values(apply_overrides(preset_to_dict(preset), overrides),
                            {f"sample.{k}": v for k, v in (sample or {}).items()})
    preset = validate_preset(raw_preset, f"{ckpt} with sampling flags")
    sample_cfg = preset.sample
    batch = batch or sample_cfg.batch
    class_list = parse_classes(classes, preset.model.num_classes)
    net = snapshot_network(weights, preset, str(path), device)
    del weights
    diffusion = build_diffusion(preset.diffusion, preset.model)
    decode, vae_id = make_decoder(preset, vae, device, precision)
    out = Path(out)
    sink = NpzSink(out) if out.suffix == ".npz" else PngSink(out)

    mine = seeds[state.process_index::state.num_processes]
    todo = [s for s in mine if s not in sink.done(mine)]
    # labels are a function of the seed (or of its position in the fixed list), never of the process
    position = {s: i for i, s in enumerate(seeds)}
    emit = progress if (progress is not None and state.is_main_process) else (lambda e: None)
    emit({"event": "start", "total": len(seeds), "todo": len(todo) * state.num_processes, "device": str(device),
          "world": state.num_processes})
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        fixed = None if class_list is None else [class_list[position[s] % len(class_list)] for s in chunk]
        for s_chunk, labels, images in generate(net, diffusion, preset, chunk, decode, precision=precision, batch=batch,
                                                device=device, classes=fixed):
            sink.write(s_chunk, labels, images)
            emit({"event": "batch", "images": len(s_chunk) * state.num_processes})
    state.wait_for_everyone()
    result = {"out": str(out), "images": len(seeds)}
    if state.is_main_process:
        if grid is not None:
            save_png(grid, image_grid(sink.images(seeds[:64])))
        out_path = sink.finish(seeds)
        recipe = {
            "diffit_version": __version__, "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(path, 16),
            "weights": "raw" if raw else "ema", "preset": preset.name, "sampler": sample_cfg.sampler,
            "steps": sample_cfg.steps,
            "nfe": nfe(sample_cfg.sampler, sample_cfg.steps),  # a guided step is one forward of the doubled batch
            "guidance": sample_cfg.guidance.model_dump(mode="json"),
            "stochastic": {"s_churn": sample_cfg.s_churn, "s_min": sample_cfg.s_min, "s_max": sample_cfg.s_max,
                           "s_noise": sample_cfg.s_noise, "eta": sample_cfg.eta},
            "vae": vae_id, "precision": precision, "classes": classes or "random",
            "seeds": _compact_seeds(seeds), "count": len(seeds), "processes": state.num_processes,
            "torch": torch.__version__, "python": platform.python_version(),
        }
        recipe_path = (out_path.parent / f"{out_path.stem}.sample.json") if out.suffix == ".npz" \
            else out_path / "sample.json"
        atomic_write_bytes(recipe_path, json.dumps(recipe, indent=2).encode())
        result.update(recipe=str(recipe_path), nfe=recipe["nfe"])
    state.wait_for_everyone()
    return result


def _compact_seeds(seeds: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5' (the --seeds syntax)."""
    parts, start = [], None
    for a, b in zip(seeds, seeds[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            parts.append(f"{start}-{a}" if a != start else f"{a}")
            start = None
    return ",".join(parts)
