"""Seeds → per-seed noise → sampler → uint8 batches, and the training preview grid (`sinks` stores the batches,
`run` drives `diffit sample` on top of these).

Reproducibility contract: image *i* depends only on seed *i*. Each seed owns a `torch.Generator`
that draws its label (when random), its initial noise and every stochastic step of the sampler, so
the batch size and the number of processes never change an image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from diffit_cli.codecs import make_codec
from diffit_cli.config import Preset, SampleConfig
from diffit_cli.core.guidance import Guidance
from diffit_cli.core.samplers import sample as run_sampler
from diffit_cli.errors import DiffitError
from diffit_cli.precision import sampling_precision
from diffit_cli.sampling.sinks import image_grid, save_png

Decode = Callable[[torch.Tensor], np.ndarray]  # model-space batch → uint8 NHWC


def make_decoder(preset: Preset, vae: str | None, device: torch.device, precision: str) -> tuple[Decode, str | None]:
    """Pixel models decode directly; latent models through the SD VAE (preset's, or `vae` if given)."""
    if preset.data.space == "pixel":
        return make_codec(preset.data).decode, None
    return make_codec(preset.data, device, vae=vae, precision=precision).decode, vae or preset.data.vae


def make_guidance(sample: SampleConfig, num_classes: int) -> Guidance | None:
    """`core.guidance.Guidance` from `sample.guidance` (validated with the preset); None when the scale is 1."""
    g = sample.guidance
    if g.scale == 1.0:
        return None
    if num_classes == 0 and g.mode == "cfg":
        raise DiffitError("classifier-free guidance (--cfg-scale != 1) needs a class-conditional model")
    return Guidance(**g.model_dump(exclude={"guide"}), null_class=num_classes)


def needs_guide(sample: SampleConfig) -> bool:
    """Whether sampling with `sample` evaluates a guiding network (autoguidance at a scale other than 1)."""
    return sample.guidance.mode == "auto" and sample.guidance.scale != 1.0


def seed_labels(seeds: list[int], num_classes: int, classes: list[int] | None) -> torch.Tensor | None:
    """Class label of each seed: drawn from the seed alone (`classes` None), or `classes` cycled over the seeds'
    positions in `seeds` (the run's whole seed list, so a label never depends on the batch, the process or what a
    resumed run already wrote). `classes` = every class (`--classes balanced`) gives the seed at position j class
    j mod num_classes: each window of num_classes consecutive seeds holds every class once, so a run of N seeds is
    balanced up to one image (the first N mod num_classes classes get one more)."""
    if num_classes == 0:
        return None
    if classes is not None:
        return torch.tensor([classes[i % len(classes)] for i in range(len(seeds))], dtype=torch.long)
    return torch.tensor(
        [int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(s))) for s in seeds],
        dtype=torch.long,
    )


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_batch(
    net: torch.nn.Module,
    diffusion,
    shape: tuple[int, int, int],
    seeds: list[int],
    labels: torch.Tensor | None,
    sample: SampleConfig,
    device: torch.device,
    num_classes: int,
    precision: str = "fp32",
    guide: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Model-space samples (B, C, H, W) float32 for `seeds`; each row depends only on its seed. `guide`: the
    guiding network of autoguidance (`sample.guidance.mode` auto; `sampling.weights.load_guide`)."""
    if guide is None and needs_guide(sample):
        raise DiffitError(
            "autoguidance (sample.guidance.mode auto) needs its guiding network loaded; pass guide= "
            "(sampling.weights.load_guide)"
        )
    gens = _generators(seeds, device)
    noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])  # (B, C, H, W)
    y = labels.to(device) if labels is not None else None
    autocast = torch.bfloat16 if precision == "bf16" else None
    return run_sampler(
        diffusion,
        net,
        noise,
        y=y,
        sampler=sample.sampler,
        steps=sample.steps,
        guidance=make_guidance(sample, num_classes),
        guide=guide if needs_guide(sample) else None,
        generators=gens,
        autocast_dtype=autocast,
        **sample.sampler_kwargs(),
    )


def generate(
    net: torch.nn.Module,
    diffusion,
    preset: Preset,
    seeds: list[int],
    decode: Decode,
    *,
    precision: str = "fp32",
    batch: int = 64,
    device: torch.device | str = "cpu",
    classes: list[int] | None = None,
    guide: torch.nn.Module | None = None,
) -> Iterator[tuple[list[int], np.ndarray | None, np.ndarray]]:
    """Yield `(seeds, labels, uint8 NHWC images)` batches sampled with `preset.sample` (`guide`: autoguidance's
    guiding network, see `sample_batch`)."""
    device = torch.device(device)
    m = preset.model
    size = m.spatial_size
    shape = (m.in_channels, size, size)
    labels = seed_labels(seeds, m.num_classes, classes)
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        y = labels[i : i + batch] if labels is not None else None
        x = sample_batch(net, diffusion, shape, chunk, y, preset.sample, device, m.num_classes, precision, guide=guide)
        yield chunk, (y.numpy() if y is not None else None), decode(x)


def preview_grid(
    net: torch.nn.Module,
    diffusion,
    preset: Preset,
    decode: Decode,
    path: Path | str,
    device: torch.device | str = "cpu",
    seeds: int = 64,
    guide: torch.nn.Module | None = None,
) -> Path:
    """Training's preview: `seeds` samples of `net` with the preset's sampler (one class per column when
    class-conditional), saved as a grid PNG at `path` and as `grid-latest.png` beside it. `guide`: autoguidance's
    guiding network, which an autoguiding preset needs (training reads it once: `training.evaluate.run_guide`)."""
    k = preset.model.num_classes
    classes = list(range(min(k, 8))) if k else None
    _, _, images = next(
        generate(
            net,
            diffusion,
            preset,
            list(range(seeds)),
            decode,
            precision=sampling_precision(preset, device),
            batch=seeds,
            device=device,
            classes=classes,
            guide=guide,
        )
    )
    grid = image_grid(images, ncol=len(classes) if classes else None)
    save_png(Path(path).with_name("grid-latest.png"), grid)
    return save_png(path, grid)
