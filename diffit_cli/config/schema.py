"""The preset: one section of each kind, the discriminated unions over model and diffusion kinds, and the checks
that need two sections at once (sizes, channels, guidance against the model, samplers against the diffusion)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from diffit_cli.config.baselines import DDPMppConfig, EDMVEConfig, EDMVPConfig, EncDecConfig
from diffit_cli.config.sections import (
    DataConfig,
    DDPMConfig,
    EDMConfig,
    EvalConfig,
    SampleConfig,
    Section,
    TrainConfig,
    UNetConfig,
    ViTConfig,
)

ModelConfig = Annotated[UNetConfig | ViTConfig | EncDecConfig | DDPMppConfig, Field(discriminator="kind")]
DiffusionConfig = Annotated[EDMConfig | DDPMConfig | EDMVPConfig | EDMVEConfig, Field(discriminator="kind")]
MODEL_KINDS = {"unet": UNetConfig, "vit": ViTConfig, "encdec": EncDecConfig, "ddpmpp": DDPMppConfig}
_KINDS = {**MODEL_KINDS, "edm": EDMConfig, "ddpm": DDPMConfig, "edm-vp": EDMVPConfig, "edm-ve": EDMVEConfig}


class Preset(Section):
    name: str
    description: str = ""
    model: ModelConfig
    diffusion: DiffusionConfig
    data: DataConfig
    train: TrainConfig
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> Preset:
        m, d = self.model, self.data
        grid = d.resolution // 8 if d.space == "latent" else d.resolution
        size = m.spatial_size
        if size != grid:
            raise ValueError(
                f"model size {size} does not match data.resolution {d.resolution}"
                + (" (latent grid = resolution / 8)" if d.space == "latent" else "")
            )
        if m.in_channels != d.channels:
            raise ValueError(f"model.in_channels {m.in_channels} does not match data.channels {d.channels}")
        if self.eval.classes == "balanced" and m.num_classes == 0:
            raise ValueError("eval.classes balanced needs a class-conditional model (model.num_classes > 0)")
        g = self.sample.guidance
        if g.mode == "cfg" and g.scale != 1.0 and m.num_classes == 0:
            raise ValueError(
                "sample.guidance.scale != 1 with mode cfg needs a class-conditional model (model.num_classes > 0); "
                "an unconditional model can be autoguided (mode auto)"
            )
        if g.channels != "all" and g.channels > m.in_channels:
            raise ValueError(
                f"sample.guidance.channels {g.channels}: the model predicts {m.in_channels} channels; "
                f"use 1..{m.in_channels} or all"
            )
        if self.sample.sampler in ("ddpm", "ddim") and self.diffusion.kind != "ddpm":
            raise ValueError(f"sampler {self.sample.sampler!r} needs diffusion.kind ddpm; EDM uses heun/euler/dpmpp-2m")
        if g.schedule == "power-cosine" and self.diffusion.kind != "ddpm":
            raise ValueError(
                "sample.guidance.schedule power-cosine is defined on DDPM steps t (diffusion.kind ddpm); "
                "EDM models use constant or interval"
            )
        return self
