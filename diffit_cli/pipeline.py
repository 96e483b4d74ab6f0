"""`DiffiTPipeline`: sampling from Python in the call conventions of diffusers' pipelines (DiT's `class_labels`,
`guidance_scale`, `num_inference_steps`, `generator`, `output_type`, an output whose `.images` are PIL images),
over the seeded generation of `diffit sample` (`sampling.generate`): the same seed and label give the same image.

It is a small class of its own rather than a subclass of diffusers' `DiffusionPipeline`: the weights load from
what `diffit sample --ckpt` reads (a training checkpoint, a `.safetensors` file, a Hub reference) with the preset
they carry, not from a `model_index.json` of diffusers components, and the samplers are `core/samplers.py`, not
diffusers schedulers (docs/python-api.md, 'Sampling from Python').
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffit_cli.build import build_diffusion
from diffit_cli.checkpoint import read_snapshot, snapshot_network
from diffit_cli.codecs import load_vae
from diffit_cli.config import Preset, check_sample_values, load_preset, preset_to_dict, set_values, validate_preset
from diffit_cli.errors import DiffitError
from diffit_cli.precision import check_precision
from diffit_cli.sampling.generate import generate, make_decoder
from diffit_cli.sampling.weights import GuideError, preset_guide, resolve_weights

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SEED_LIMIT = 2**31  # seeds drawn from a generator lie in [0, 2³¹): any of them is a valid `diffit sample --seeds`
DTYPE_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# the call's arguments, by the `sample` key each sets (a bad value names the argument)
CALL_ARGUMENTS = {
    "sampler": "sampler",
    "steps": "num_inference_steps",
    "guidance.scale": "guidance_scale",
    "guidance.schedule": "guidance_schedule",
}


@dataclass
class DiffiTPipelineOutput:
    """What a call returns: `images` (PIL images, or an array / tensor, by `output_type`), the `seeds` they were
    sampled from (`diffit sample --seeds` with them makes the same images) and their `class_labels` (None for an
    unconditional model)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int]
    class_labels: list[int] | None


class DiffiTPipeline:
    """A DiffiT network with its preset (and, for a latent model, its VAE), called like a diffusers pipeline.

    `network`: the preset's network with weights (as `checkpoint.load_snapshot` returns it); `vae`: for a latent
    model, an `AutoencoderKL` or anything `codecs.load_vae` takes (default: the preset's `data.vae`); `guide`: the
    guiding network of autoguidance when the preset's `sample.guidance.mode` is `auto` (`from_pretrained` loads
    it)."""

    def __init__(
        self,
        network: torch.nn.Module,
        preset: Preset,
        vae: Any = None,
        *,
        source: str = "network",
        guide: torch.nn.Module | None = None,
    ):
        self.network = network.eval().requires_grad_(False)
        if guide is not None and preset.sample.guidance.mode != "auto":
            raise GuideError(
                "a guide goes with autoguidance: the preset's sample.guidance.mode is "
                f"{preset.sample.guidance.mode!r}; set it to 'auto' (from_pretrained(guide=...) does)"
            )
        self.guide = guide.to(self.device).eval().requires_grad_(False) if guide is not None else None
        self.preset = preset
        self.source = source
        self.diffusion = build_diffusion(preset.diffusion, preset.model)
        latent = preset.data.space == "latent"
        self.vae = load_vae(vae if vae is not None else preset.data.vae) if latent else None
        if self.vae is not None:
            self.vae.to(self.device).eval().requires_grad_(False)
        self.precision = "fp32"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        preset: Preset | str | None = None,
        vae: Any = None,
        use_ema: bool = True,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        guide: str | Path | None = None,
    ) -> DiffiTPipeline:
        """Load the weights `diffit sample --ckpt` takes (`sampling.run.resolve_weights`): a `.pt` checkpoint, a
        `.safetensors` file, a Hub reference `REPO:FILE`, a folder written by `diffit export` or a Hub repository
        `OWNER/NAME` holding one. `preset` (a `Preset`, a shipped preset's name or a YAML file) is needed only for
        files that carry none, such as NVIDIA's release; `vae` replaces a latent preset's `data.vae`;
        `use_ema=False` takes the trained weights of a training checkpoint. On the CPU in fp32 unless `device` /
        `torch_dtype` say otherwise. `guide`: autoguidance's guiding network (the same kinds of reference), which
        makes `guidance_scale` the autoguidance scale; without it, a preset whose `sample.guidance.mode` is `auto`
        loads the guide it names."""
        ref = str(pretrained_model_name_or_path)
        if isinstance(preset, (str, Path)):
            preset = load_preset(str(preset))
        path = resolve_weights(ref)
        weights, preset = read_snapshot(path, preset=preset, ema=use_ema)
        if guide is not None:
            values = {"sample.guidance.mode": "auto", "sample.guidance.guide": str(guide)}
            preset = validate_preset(set_values(preset_to_dict(preset), values), f"{ref} with guide {str(guide)!r}")
        snap = preset_guide(preset)  # checked before any network is built
        net = snapshot_network(weights, preset, ref)
        pipe = cls(net, preset, vae=vae, source=ref, guide=snap.network() if snap is not None else None)
        return pipe.to(device, torch_dtype)

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (and where sampling runs)."""
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The precision sampling runs in: `torch.bfloat16` (the network and VAE under bf16 autocast, as
        `diffit sample --precision bf16`) or `torch.float32`."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def to(self, *args: torch.device | str | torch.dtype | None, device=None, dtype=None, torch_dtype=None):
        """Move the network (and VAE) to a device and/or choose the sampling precision, as diffusers' `to`:
        `pipe.to("cuda")`, `pipe.to(torch.bfloat16)`, `pipe.to("cuda", torch_dtype=torch.bfloat16)`. The weights
        stay fp32: bf16 runs them under autocast (`diffit sample --precision bf16`); fp16 is not offered. Returns
        the pipeline."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None:
            if dtype not in DTYPE_PRECISION:
                raise DiffitError(f"dtype {dtype}: choose torch.float32 or torch.bfloat16 (run under autocast)")
            self.precision = check_precision(DTYPE_PRECISION[dtype])
        if device is not None:
            self.network.to(device)
            if self.guide is not None:
                self.guide.to(device)
            if self.vae is not None:
                self.vae.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        seeds: list[int] | None = None,
        batch_size: int | None = None,
        sampler: str | None = None,
        guidance_schedule: str | None = None,
    ) -> DiffiTPipelineOutput | tuple:
        """Sample images; an argument left out keeps the preset's `sample` setting.

        Which images: `seeds` (one image per seed, each the image `diffit sample --seeds` makes for it), or one
        seed per image drawn from `generator` (one `torch.Generator`, or one per image), or else from torch's
        global generator (`torch.manual_seed` makes that repeatable). `class_labels`: one label per image, or one
        label for all; left out, each image draws its label from its seed (`diffit sample --classes random`).
        The number of images is `len(seeds)`, `len(class_labels)` or `len(generator)`, else `batch_size` (default 1).
        `guidance_scale` / `guidance_schedule` set `sample.guidance.scale` / `.schedule` (1 = no guidance),
        `num_inference_steps` sets `sample.steps` and `sampler` `sample.sampler`.

        `output_type`: "pil" (PIL images), "np" (float32 NHWC in [0, 1]), "pt" (float32 NCHW in [0, 1], on the
        CPU), each holding the 8-bit values `diffit sample` writes; "latent": the sampler's float32 output in model
        space, before decoding. Returns a `DiffiTPipelineOutput`, or `(images,)` when `return_dict` is False."""
        if output_type not in OUTPUT_TYPES:
            raise DiffitError(f"output_type {output_type!r}: choose {', '.join(OUTPUT_TYPES)}")
        preset = self._sampling_preset(sampler, num_inference_steps, guidance_scale, guidance_schedule)
        labels = self._labels(class_labels)
        seeds = self._seeds(seeds, generator, self._count(seeds, class_labels, generator, batch_size))
        if output_type == "latent":
            decode = lambda x: x  # noqa: E731 (the model-space batch as the sampler left it)
        else:
            decode, _ = make_decoder(preset, self.vae, self.device, self.precision)
        batches = list(
            generate(
                self.network,
                self.diffusion,
                preset,
                seeds,
                decode,
                precision=self.precision,
                batch=preset.sample.batch,
                device=self.device,
                classes=labels,
                guide=self.guide,
            )
        )
        drawn = [int(y) for _, ys, _ in batches for y in ys] if batches[0][1] is not None else None
        images = _convert([images for _, _, images in batches], output_type)
        if not return_dict:
            return (images,)
        return DiffiTPipelineOutput(images=images, seeds=seeds, class_labels=drawn)

    def _sampling_preset(self, sampler, steps, scale, schedule) -> Preset:
        """The preset with the call's sampling settings, validated as `diffit sample` validates its flags."""
        values = {"sampler": sampler, "steps": steps, "guidance.scale": scale, "guidance.schedule": schedule}
        check_sample_values(values, CALL_ARGUMENTS)
        raw = set_values(preset_to_dict(self.preset), {f"sample.{k}": v for k, v in values.items()})
        return validate_preset(raw, f"{self.source} with the call's sampling settings")

    def _labels(self, class_labels: int | list[int] | None) -> list[int] | None:
        """The fixed labels (one for all, or one per image), checked against the model's classes."""
        if class_labels is None:
            return None
        k = self.preset.model.num_classes
        if k == 0:
            raise DiffitError("class_labels: this model is unconditional (no classes); leave class_labels out")
        labels = [int(class_labels)] if isinstance(class_labels, int) else [int(c) for c in class_labels]
        bad = [c for c in labels if not 0 <= c < k]
        if bad or not labels:
            raise DiffitError(f"class_labels {bad or labels}: this model has classes 0..{k - 1}")
        return labels

    @staticmethod
    def _count(seeds, class_labels, generator, batch_size: int | None) -> int:
        """How many images: one per seed, label or generator in a list, else `batch_size`; the ones given must
        agree."""
        counts = {
            "seeds": None if seeds is None else len(seeds),
            "class_labels": None if class_labels is None or isinstance(class_labels, int) else len(class_labels),
            "generators": len(generator) if isinstance(generator, (list, tuple)) else None,
            "batch_size": batch_size,
        }
        given = {k: n for k, n in counts.items() if n is not None}
        if len(set(given.values())) > 1:
            raise DiffitError(
                "the number of images is ambiguous: "
                + ", ".join(f"{n} {k}" for k, n in given.items())
                + " (make them agree, or give only one; a single class label applies to every image)"
            )
        n = next(iter(given.values()), 1)
        if n < 1:
            raise DiffitError("no images to sample: give at least one seed, label or batch_size")
        return n

    @staticmethod
    def _seeds(seeds: list[int] | None, generator, n: int) -> list[int]:
        """The seed of each image: given, or drawn from `generator` (one generator, or one per image), or from
        torch's global generator."""
        if seeds is not None:
            if generator is not None:
                raise DiffitError("give seeds or generator, not both (a seed fixes its image on its own)")
            seeds = [int(s) for s in seeds]
            if any(s < 0 for s in seeds):
                raise DiffitError(f"seeds {[s for s in seeds if s < 0]}: a seed is a non-negative integer")
            return seeds
        if isinstance(generator, (list, tuple)):  # one per image (`_count` checked their number)
            return [int(torch.randint(SEED_LIMIT, (), generator=g, device=g.device)) for g in generator]
        device = generator.device if generator is not None else "cpu"
        return torch.randint(SEED_LIMIT, (n,), generator=generator, device=device).tolist()


def _convert(batches: list, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """uint8 NHWC batches (or model-space tensors for "latent") → the output type's images."""
    if output_type == "latent":
        return torch.cat(batches)
    images = np.concatenate(batches)
    if output_type == "pil":
        return [Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x) for x in images]
    floats = images.astype(np.float32) / 255
    return floats if output_type == "np" else torch.from_numpy(floats).permute(0, 3, 1, 2).contiguous()
