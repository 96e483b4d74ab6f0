"""Preset sections of the ablation-only kinds (DiffiT Tables 4–5): the Table 4 encoder/decoder baselines, the
Table 5 DDPM++ network and EDM's VP/VE preconditionings. A study switches `model.kind` / `diffusion.kind` to these."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from diffit_cli.config.sections import Pos, Section, UNetConfig, shrink_transformer


class EncDecConfig(UNetConfig):
    """Table 4 encoder/decoder baselines (DiffiT Table 4; `diffit_cli.core.baselines.EncoderDecoder`).

    The U-shaped fields mean what they mean for `unet`, so a study switches `model.kind` between the two.
    `encoder`: vit (ViT-Base-style isotropic encoder, `vit_*`, `patch_size`), multires (conv-downsampled stages
    of plain windowed attention) or diffit (DiffiT ResBlocks with TMSA); `decoder`: setr-mla, multires or
    diffit. Outside the DiffiT parts time is "adaptively scaled and added" (scale-shift of normalised features).
    """

    kind: Literal["encdec"]  # the U-shaped fields (channels, blocks, ...) are UNetConfig's
    encoder: Literal["vit", "multires", "diffit"] = "multires"
    decoder: Literal["setr-mla", "multires", "diffit"] = "multires"
    patch_size: Pos = 2  # ViT encoder
    vit_depth: Pos = 12
    vit_width: Pos = 768
    vit_heads: Pos = 12
    mla_channels: Pos = 256  # SETR-MLA decoder

    @staticmethod
    def scale(m: dict, div: int, *, sizes: dict | None = None, **kwargs) -> None:
        """The U-shaped part as `unet` does; the ViT encoder and SETR-MLA decoder at the budget's fixed `sizes`,
        else ÷ `div`."""
        UNetConfig.scale(m, div, **kwargs)
        shrink_transformer(m, div, sizes, ("vit_width", 768), ("vit_heads", 12), {"mla_channels": (256, 8)})

    @model_validator(mode="after")
    def _valid(self) -> EncDecConfig:
        if self.encoder == "vit":
            if self.decoder != "setr-mla":
                raise ValueError("a ViT encoder has one resolution: pair it with decoder setr-mla (Table 4 A)")
            if self.img_resolution % self.patch_size or self.vit_width % self.vit_heads:
                raise ValueError(
                    f"ViT encoder: img_resolution {self.img_resolution} must be a multiple of patch_size "
                    f"{self.patch_size} and vit_width {self.vit_width} of vit_heads {self.vit_heads}"
                )
        return self


class DDPMppConfig(Section):
    """DDPM++ U-Net (Song et al. 2021, EDM's CIFAR-10 configuration) whose self-attention is plain or TMSA (Table 5)."""

    kind: Literal["ddpmpp"]
    img_resolution: Pos
    in_channels: Pos = 3
    model_channels: Pos = 128
    channel_mult: tuple[Pos, ...] = (2, 2, 2)
    channel_mult_emb: Pos = 4
    num_blocks: Pos = 4
    attn_resolutions: tuple[Pos, ...] = (16,)
    attention: Literal["plain", "tmsa"] = "plain"
    num_heads: Pos = 1
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.13
    num_classes: Annotated[int, Field(ge=0)] = 0
    label_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    augment_dim: Annotated[int, Field(ge=0)] = 9
    time_embedding: Literal["positional", "fourier"] = "positional"

    @property
    def spatial_size(self) -> int:
        return self.img_resolution

    @staticmethod
    def scale(m: dict, div: int, *, max_blocks: int | None = None, old_resolution: int | None = None, **_) -> None:
        """Shrink a raw `model` section for an ablation budget: widths ÷ `div`, at most `max_blocks` blocks per
        level, attention resolutions moved with the image resolution."""
        m["model_channels"] = max(8, int(m.get("model_channels", 128)) // div)
        if max_blocks is not None:
            m["num_blocks"] = min(int(m.get("num_blocks", 4)), max_blocks)
        new = int(m["img_resolution"])
        if old_resolution and new != old_resolution:
            m["attn_resolutions"] = [
                max(1, int(r) * new // int(old_resolution)) for r in m.get("attn_resolutions", [16])
            ]

    @model_validator(mode="after")
    def _valid(self) -> DDPMppConfig:
        levels = [self.img_resolution // 2**i for i in range(len(self.channel_mult))]
        if self.img_resolution % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(
                f"img_resolution {self.img_resolution} cannot be halved {len(self.channel_mult) - 1} times"
            )
        bad = [r for r in self.attn_resolutions if r not in levels]
        if bad:
            raise ValueError(f"attn_resolutions {bad} are not among the U-Net's resolutions {levels}")
        for m in self.channel_mult:
            if (self.model_channels * m) % self.num_heads:
                raise ValueError(f"width {self.model_channels * m} is not a multiple of num_heads {self.num_heads}")
        return self


class EDMVPConfig(Section):
    """EDM framework with the VP preconditioning and loss (EDM Table 1 "VP"; constants as EDM's VPPrecond).

    `sigma_min`/`sigma_max` are the sampling range (EDM's generate clamps VP's range to [0.002, 80])."""

    kind: Literal["edm-vp"]
    beta_d: Annotated[float, Field(gt=0)] = 19.9
    beta_min: Annotated[float, Field(gt=0)] = 0.1
    M: Pos = 1000
    epsilon_t: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    sigma_min: Annotated[float, Field(gt=0)] = 0.002
    sigma_max: Annotated[float, Field(gt=0)] = 80.0
    rho: Annotated[float, Field(gt=0)] = 7.0


class EDMVEConfig(Section):
    """EDM framework with the VE preconditioning and loss (EDM Table 1 "VE"; σ trained on [0.02, 100] log-uniform).

    Sampling runs over [sigma_min, min(sigma_max, sample_sigma_max)] (EDM's generate clamps to 80)."""

    kind: Literal["edm-ve"]
    sigma_min: Annotated[float, Field(gt=0)] = 0.02
    sigma_max: Annotated[float, Field(gt=0)] = 100.0
    sample_sigma_max: Annotated[float, Field(gt=0)] = 80.0
    rho: Annotated[float, Field(gt=0)] = 7.0
