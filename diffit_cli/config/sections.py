"""The paper's preset sections (pydantic v2, frozen, extra="forbid"): networks, diffusions, data, training,
sampling and evaluation. Every value the paper fixes is cited in the shipped YAML files under `presets/`
(docs/paper.md, 'Training recipes')."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TimeMode = Literal["tmsa", "bias", "mlp", "adaln", "separate"]
AttentionKernel = Literal["sdpa", "flex"]  # the fast ones of core.attention.ATTENTION_KERNELS
Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Pos = Annotated[int, Field(gt=0)]


def round_to_multiple(value: float, multiple: int) -> int:
    """The nearest multiple of `multiple` to `value`, at least `multiple`."""
    return max(multiple, int(round(value / multiple)) * multiple)


def shrink_transformer(
    m: dict,
    div: int,
    sizes: dict | None,
    width: tuple[str, int],
    heads: tuple[str, int],
    counts: dict[str, tuple[int, int]],
) -> None:
    """Budget scaling of a transformer part of a raw `model` section: the budget's fixed `sizes`, else the width ÷
    `div` in multiples of the head count and each of `counts` (key: (default, least)) ÷ `div`."""
    if sizes:
        m.update(sizes)
    elif div > 1:
        m[width[0]] = round_to_multiple(m.get(width[0], width[1]) / div, m.get(heads[0], heads[1]))
        for key, (default, least) in counts.items():
            m[key] = max(least, int(m.get(key, default)) // div)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------------------------------- model
class UNetConfig(Section):
    """Image-space U-shaped DiffiT (docs/paper.md, 'Image-space network').

    One entry per stage in `channels`/`blocks`/`window_size`.
    """

    kind: Literal["unet"]
    img_resolution: Pos
    in_channels: Pos = 3
    channels: tuple[Pos, ...]
    blocks: tuple[Annotated[int, Field(ge=0)], ...]
    window_size: tuple[Pos, ...]
    head_dim: Pos = 32
    time_dim: Pos = 512
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    num_classes: Annotated[int, Field(ge=0)] = 0
    label_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    augment_dim: Annotated[int, Field(ge=0)] = 9
    time_mode: TimeMode = "tmsa"
    time_embedding: Literal["positional", "fourier"] = "positional"
    attention_kernel: AttentionKernel = "sdpa"  # TMSA: SDPA (bias as attn_mask) or flex_attention (score_mod)

    @property
    def spatial_size(self) -> int:
        """Side of the square input the network sees (pixels here; latent cells for `vit`)."""
        return self.img_resolution

    @staticmethod
    def scale(
        m: dict,
        div: int,
        *,
        head_dim: int | None = None,
        max_stages: int | None = None,
        max_blocks: int | None = None,
        **_,
    ) -> None:
        """Shrink a raw `model` section for a DiffiT ablation's budget: the first `max_stages` stages, widths ÷
        `div` in multiples of the head size, at most `max_blocks` blocks, windows no larger than the maps."""
        stages = len(m["channels"]) if max_stages is None else min(len(m["channels"]), max_stages)
        for key in ("channels", "blocks", "window_size"):
            m[key] = list(m[key])[:stages]
        hd = m["head_dim"] = head_dim or m.get("head_dim", 32)
        m["channels"] = [round_to_multiple(c / div, hd) for c in m["channels"]]
        m["time_dim"] = max(16, int(m.get("time_dim", 512)) // div)
        if max_blocks is not None:
            m["blocks"] = [min(int(x), max_blocks) for x in m["blocks"]]
        res = int(m["img_resolution"])
        m["window_size"] = [min(int(w), res >> i) for i, w in enumerate(m["window_size"])]

    @model_validator(mode="after")
    def _stages_agree(self) -> UNetConfig:
        n = len(self.channels)
        if not (len(self.blocks) == len(self.window_size) == n) or n == 0:
            raise ValueError(
                f"channels, blocks and window_size need one entry per stage; got {len(self.channels)}, "
                f"{len(self.blocks)} and {len(self.window_size)}"
            )
        for i, (c, w) in enumerate(zip(self.channels, self.window_size)):
            res = self.img_resolution // 2**i
            if self.img_resolution % 2**i or res % w:
                raise ValueError(f"stage {i} has resolution {res}, which window size {w} does not divide")
            if c % self.head_dim:
                raise ValueError(f"stage {i} width {c} is not a multiple of head_dim {self.head_dim}")
        return self


class ViTConfig(Section):
    """Latent DiffiT ViT (docs/paper.md, 'Latent network'); field names are the release constructor's arguments."""

    kind: Literal["vit"]
    input_size: Pos = 32
    patch_size: Pos = 2
    in_channels: Pos = 4
    hidden_size: Pos = 1152
    depth: Pos = 28
    num_heads: Pos = 16
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    class_dropout_prob: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    num_classes: Annotated[int, Field(ge=0)] = 1000
    learn_sigma: bool = True
    time_mode: TimeMode = "tmsa"
    attention_kernel: AttentionKernel = "sdpa"  # TMSA: SDPA (bias as attn_mask) or flex_attention (score_mod)

    @property
    def spatial_size(self) -> int:
        """Side of the square latent grid the network sees."""
        return self.input_size

    @staticmethod
    def scale(m: dict, div: int, *, sizes: dict | None = None, **_) -> None:
        """Shrink a raw `model` section for an ablation budget: the budget's fixed `sizes`, else width and depth ÷
        `div` (width in multiples of the head count)."""
        shrink_transformer(m, div, sizes, ("hidden_size", 1152), ("num_heads", 16), {"depth": (28, 1)})

    @model_validator(mode="after")
    def _divisible(self) -> ViTConfig:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return self


# ------------------------------------------------------------------------------------------------- diffusion
class EDMConfig(Section):
    """EDM preconditioning, loss and σ range (Karras et al. 2022; DiffiT App. I.1)."""

    kind: Literal["edm"]
    sigma_data: Annotated[float, Field(gt=0)] = 0.5
    p_mean: float = -1.2
    p_std: Annotated[float, Field(gt=0)] = 1.2
    sigma_min: Annotated[float, Field(gt=0)] = 0.002
    sigma_max: Annotated[float, Field(gt=0)] = 80.0
    rho: Annotated[float, Field(gt=0)] = 7.0


class DDPMConfig(Section):
    """ADM Gaussian diffusion with learned-range variance (DiffiT App. I.2)."""

    kind: Literal["ddpm"]
    num_timesteps: Pos = 1000
    schedule: Literal["linear", "cosine"] = "linear"


# ------------------------------------------------------------------------------------------- data / train
class DataConfig(Section):
    # image folder, .zip, .npz, latent folder, torchvision:NAME[:split] or hf:OWNER/NAME[:split] (data.named)
    path: str | None = None
    # the built-in synthetic shapes in this style (data.SYNTHETIC_STYLES), used only when `path` is empty; with
    # neither, training stops with the ways to supply data (data.catalog) instead of silently using the shapes
    synthetic: Literal["varied", "simple"] | None = None
    image_column: str | None = None  # hf: the image column (default: the first Image feature)
    label_column: str | None = None  # hf: the label column (default: the first ClassLabel feature)
    space: Literal["pixel", "latent"] = "pixel"
    resolution: Pos = 32  # image resolution (latent grid = resolution / 8)
    channels: Pos = 3  # channels the network sees (4 for SD-VAE latents)
    use_labels: bool = False
    xflip: bool = False
    vae: str | None = None  # latent space: Hub id, folder or .safetensors file of the SD VAE
    latent_scale: Annotated[float, Field(gt=0)] = 0.18215
    num_workers: Annotated[int, Field(ge=0)] = 2

    @model_validator(mode="before")
    @classmethod
    def _style_only_without_path(cls, raw: Any) -> Any:
        """A path makes the synthetic style moot; dropping it keeps presets saved before `synthetic` could be
        null (which always wrote a style) equal to today's when they name data."""
        if isinstance(raw, dict) and raw.get("path") is not None and "synthetic" in raw:
            raw = {k: v for k, v in raw.items() if k != "synthetic"}
        return raw

    @model_validator(mode="after")
    def _latent_has_vae(self) -> DataConfig:
        if self.space == "latent" and not self.vae:
            raise ValueError("latent-space data needs data.vae (e.g. stabilityai/sd-vae-ft-ema)")
        return self


class TrainConfig(Section):
    total_kimg: Annotated[float, Field(gt=0)]
    batch: Pos  # global batch, split into per-device batch × gradient accumulation
    batch_gpu: Pos | None = None
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: Annotated[float, Field(gt=0)]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    lr_rampup_kimg: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    ema_halflife_kimg: Annotated[float, Field(gt=0)] | None = None  # EDM-style EMA (image space)
    ema_rampup_ratio: Annotated[float, Field(gt=0)] | None = None
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None  # per-step EMA (latent space, DiT)
    augment_p: Prob = 0.0
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 0
    report_kimg: Annotated[float, Field(ge=0.001)] = 50.0
    snapshot_kimg: Annotated[float, Field(ge=0.001)] = 500.0
    keep_checkpoints: Pos = 3
    compile: bool | Literal["auto"] = "auto"  # torch.compile each block: auto = on CUDA, off on CPU
    grad_checkpointing: bool = False
    # loss-spike watch (diffit_cli.training.monitor): `spike_patience` reports in a row above `spike_factor` × the
    # running median make a spike; warn, stop, or roll back to the last checkpoint before it with lr × `spike_lr_factor`
    on_spike: Literal["warn", "stop", "rollback"] = "warn"
    max_skipped_steps: Pos = 50  # this many non-finite steps in a row stop the run (exit 2, naming the checkpoint)
    spike_factor: Annotated[float, Field(gt=1)] = 2.0
    spike_patience: Pos = 3
    spike_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.5
    # EDM2's post-hoc EMA (docs/guidance-and-ema.md): the relative standard deviations σ_rel of the power-function EMA
    # profiles tracked beside the classic EMA (EDM2's choice: [0.05, 0.10]; empty = off), each stored every
    # `posthoc_ema_kimg` (default: train.snapshot_kimg) under posthoc-ema/ and never pruned
    posthoc_ema: tuple[Annotated[float, Field(gt=0, lt=0.3)], ...] = ()
    posthoc_ema_kimg: Annotated[float, Field(ge=0.001)] | None = None

    @model_validator(mode="after")
    def _one_ema(self) -> TrainConfig:
        if (self.ema_halflife_kimg is None) == (self.ema_decay is None):
            raise ValueError("set exactly one of train.ema_halflife_kimg (EDM) and train.ema_decay (per step)")
        if self.batch_gpu is not None and self.batch % self.batch_gpu:
            raise ValueError(f"train.batch {self.batch} is not a multiple of train.batch_gpu {self.batch_gpu}")
        names = [f"{s:.4f}" for s in self.posthoc_ema]  # as the snapshot files name them (posthoc.store)
        if len(set(names)) != len(names):
            raise ValueError(
                f"train.posthoc_ema lists a σ_rel twice (to 4 decimals, as its snapshots are named): "
                f"{list(self.posthoc_ema)}"
            )
        return self

    @property
    def posthoc_every_kimg(self) -> float:
        """How often the post-hoc EMA profiles are stored (kimg)."""
        return self.posthoc_ema_kimg if self.posthoc_ema_kimg is not None else self.snapshot_kimg


class GuidanceConfig(Section):
    """Guidance: the fields of `core.guidance.Guidance` (its null class is the model's `num_classes`) and the
    guiding network. `mode`: `cfg`, classifier-free guidance; `auto`, autoguidance (Karras et al. 2024, "Guiding a
    Diffusion Model with a Bad Version of Itself"): D = D_guide + scale·(D_main − D_guide) with `guide` a weaker
    network of the same data, resolution, channels, classes and diffusion (an earlier checkpoint or a smaller
    model); it guides all prediction channels, so `channels` applies to `cfg` only. `guide`: what `diffit sample
    --ckpt` accepts (a `.pt`/`.safetensors` file, an exported folder, REPO:FILE or OWNER/NAME). `channels`: how many
    prediction channels CFG guides: `all` by default (for RGB images the same as 3, and right for grey ones); the
    latent presets set 3, the release's three-channel CFG of 4 latent channels."""

    mode: Literal["cfg", "auto"] = "cfg"
    scale: Annotated[float, Field(ge=0)] = 1.0
    schedule: Literal["constant", "power-cosine", "interval"] = "constant"
    power: Annotated[float, Field(gt=0)] = 4.0
    channels: Pos | Literal["all"] = "all"
    interval: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(gt=0)]] = (0.28, 5.42)
    guide: str | None = None

    @field_validator("guide")
    @classmethod
    def _absolute(cls, guide: str | None) -> str | None:
        """A guide file or folder that exists here is kept as an absolute path: the preset travels in checkpoints,
        and a relative one would name another file (or none) when they are sampled from another folder."""
        return str(Path(guide).absolute()) if guide and Path(guide).exists() else guide

    @model_validator(mode="after")
    def _ordered(self) -> GuidanceConfig:
        if not self.interval[0] < self.interval[1]:
            raise ValueError(f"interval must be (σ_lo, σ_hi) with σ_lo < σ_hi, got {self.interval}")
        if self.mode == "auto" and not self.guide:
            raise ValueError(
                "mode auto (autoguidance) needs the guiding network: set sample.guidance.guide (--guide-ckpt) to "
                "its checkpoint"
            )
        return self


# Flat `sample.cfg_*` keys of presets and checkpoints written before `sample.guidance` existed (read only).
_LEGACY_GUIDANCE_KEYS = {
    "cfg_scale": "scale",
    "cfg_schedule": "schedule",
    "cfg_power": "power",
    "cfg_channels": "channels",
    "cfg_interval": "interval",
}


class SampleConfig(Section):
    sampler: Literal["heun", "euler", "ddpm", "ddim", "dpmpp-2m"] = "heun"
    steps: Pos = 18
    guidance: GuidanceConfig = GuidanceConfig()
    s_churn: Annotated[float, Field(ge=0)] = 0.0
    s_min: Annotated[float, Field(ge=0)] = 0.0
    s_max: float = float("inf")
    s_noise: Annotated[float, Field(gt=0)] = 1.0
    eta: Annotated[float, Field(ge=0, le=1)] = 0.0
    batch: Pos = 64
    num_images: Pos = 50000

    @model_validator(mode="before")
    @classmethod
    def _legacy_guidance_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and any(k in raw for k in _LEGACY_GUIDANCE_KEYS):
            raw = dict(raw)
            guidance = dict(raw.get("guidance") or {})
            for old, new in _LEGACY_GUIDANCE_KEYS.items():
                if old in raw:
                    guidance[new] = raw.pop(old)
            raw["guidance"] = guidance
        return raw

    def sampler_kwargs(self) -> dict:
        """The stochastic settings the chosen sampler takes (EDM Alg. 2 churn for heun/euler, η for ddim)."""
        if self.sampler in ("heun", "euler"):
            return {"S_churn": self.s_churn, "S_min": self.s_min, "S_max": self.s_max, "S_noise": self.s_noise}
        if self.sampler == "ddim":
            return {"eta": self.eta}
        return {}


class EvalConfig(Section):
    metrics: tuple[Literal["fid", "sfid", "is", "kid", "pr"], ...] = ("fid",)
    num_samples: Pos = 50000
    # FID reference: "train" = the training set's statistics, computed once and cached (fid.reference; image-space
    # presets), or a statistics file / image folder / dataset file; null in older presets means "train"
    reference: str = "train"
    batch: Pos = 64

    @model_validator(mode="before")
    @classmethod
    def _null_reference_is_train(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "reference" in raw and raw["reference"] is None:
            raw = dict(raw, reference="train")
        return raw

    # FID along training: every `every_kimg` (0 = off) the EMA network samples `num_samples` images (seeds
    # 0..num_samples-1) and is scored against `reference`; `feature_extractor` is a torch-fidelity registry name
    # (inception-v3-compat, as the published numbers; diffit-randconv-v1: the offline stand-in, not comparable)
    every_kimg: Annotated[float, Field(ge=0)] = 0.0
    feature_extractor: str = "inception-v3-compat"
    # the labels of the scored samples (FID along training, `eval-fid --ckpt`): "random" drawn per seed (ADM's
    # protocol), "balanced" num_samples / num_classes per class (seed at position j: class j mod num_classes)
    classes: Literal["random", "balanced"] = "random"
