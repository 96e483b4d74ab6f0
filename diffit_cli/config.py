"""Preset schema (pydantic v2, frozen, extra="forbid"), `load_preset` with `--set` overrides, YAML dump.

A preset is the complete recipe of a run: network (`model`), diffusion, data, training, sampling and
evaluation. Overrides are applied to the raw dict *before* validation, so a typo is a validation error
that names the key. Every value that SPEC.md fixes is cited in the shipped YAML files under `presets/`.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diffit_cli.errors import DiffitError

TimeMode = Literal["tmsa", "bias", "mlp", "adaln", "separate"]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Pos = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------------------------------- model
class UNetConfig(_Section):
    """Image-space U-shaped DiffiT (SPEC §4); one entry per stage in `channels`/`blocks`/`window_size`."""

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

    @model_validator(mode="after")
    def _stages_agree(self) -> "UNetConfig":
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


class ViTConfig(_Section):
    """Latent DiffiT ViT (SPEC §5); field names are the release constructor's arguments."""

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

    @model_validator(mode="after")
    def _divisible(self) -> "ViTConfig":
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return self


class EncDecConfig(UNetConfig):
    """Table 4 encoder/decoder baselines (SPEC §8; `diffit_cli.core.baselines.EncoderDecoder`).

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

    @property
    def input_size(self) -> int:
        """Square input size (what the sampler reads for non-`unet` kinds)."""
        return self.img_resolution

    @model_validator(mode="after")
    def _valid(self) -> "EncDecConfig":
        if self.encoder == "vit":
            if self.decoder != "setr-mla":
                raise ValueError("a ViT encoder has one resolution: pair it with decoder setr-mla (Table 4 A)")
            if self.img_resolution % self.patch_size or self.vit_width % self.vit_heads:
                raise ValueError(f"ViT encoder: img_resolution {self.img_resolution} must be a multiple of patch_size "
                                 f"{self.patch_size} and vit_width {self.vit_width} of vit_heads {self.vit_heads}")
        return self


class DDPMppConfig(_Section):
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
    def input_size(self) -> int:
        """Square input size (what the sampler reads for non-`unet` kinds)."""
        return self.img_resolution

    @model_validator(mode="after")
    def _valid(self) -> "DDPMppConfig":
        levels = [self.img_resolution // 2**i for i in range(len(self.channel_mult))]
        if self.img_resolution % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"img_resolution {self.img_resolution} cannot be halved {len(self.channel_mult) - 1} times")
        bad = [r for r in self.attn_resolutions if r not in levels]
        if bad:
            raise ValueError(f"attn_resolutions {bad} are not among the U-Net's resolutions {levels}")
        for m in self.channel_mult:
            if (self.model_channels * m) % self.num_heads:
                raise ValueError(f"width {self.model_channels * m} is not a multiple of num_heads {self.num_heads}")
        return self


# ------------------------------------------------------------------------------------------------- diffusion
class EDMConfig(_Section):
    """EDM preconditioning, loss and σ range (Karras et al. 2022; SPEC §6a)."""

    kind: Literal["edm"]
    sigma_data: Annotated[float, Field(gt=0)] = 0.5
    p_mean: float = -1.2
    p_std: Annotated[float, Field(gt=0)] = 1.2
    sigma_min: Annotated[float, Field(gt=0)] = 0.002
    sigma_max: Annotated[float, Field(gt=0)] = 80.0
    rho: Annotated[float, Field(gt=0)] = 7.0


class DDPMConfig(_Section):
    """ADM Gaussian diffusion with learned-range variance (SPEC §6b)."""

    kind: Literal["ddpm"]
    num_timesteps: Pos = 1000
    schedule: Literal["linear", "cosine"] = "linear"


class EDMVPConfig(_Section):
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


class EDMVEConfig(_Section):
    """EDM framework with the VE preconditioning and loss (EDM Table 1 "VE"; σ trained on [0.02, 100] log-uniform).

    Sampling runs over [sigma_min, min(sigma_max, sample_sigma_max)] (EDM's generate clamps to 80)."""

    kind: Literal["edm-ve"]
    sigma_min: Annotated[float, Field(gt=0)] = 0.02
    sigma_max: Annotated[float, Field(gt=0)] = 100.0
    sample_sigma_max: Annotated[float, Field(gt=0)] = 80.0
    rho: Annotated[float, Field(gt=0)] = 7.0


# ------------------------------------------------------------------------------------------- data / train
class DataConfig(_Section):
    path: str | None = None  # None → the built-in synthetic dataset
    synthetic: Literal["varied", "simple"] = "varied"  # style of the built-in dataset (data.SYNTHETIC_STYLES)
    space: Literal["pixel", "latent"] = "pixel"
    resolution: Pos = 32  # image resolution (latent grid = resolution / 8)
    channels: Pos = 3  # channels the network sees (4 for SD-VAE latents)
    use_labels: bool = False
    xflip: bool = False
    vae: str | None = None  # latent space: Hub id, folder or .safetensors file of the SD VAE
    latent_scale: Annotated[float, Field(gt=0)] = 0.18215
    num_workers: Annotated[int, Field(ge=0)] = 2

    @model_validator(mode="after")
    def _latent_has_vae(self) -> "DataConfig":
        if self.space == "latent" and not self.vae:
            raise ValueError("latent-space data needs data.vae (e.g. stabilityai/sd-vae-ft-ema)")
        return self


class TrainConfig(_Section):
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
    report_kimg: Annotated[float, Field(gt=0)] = 50.0
    snapshot_kimg: Annotated[float, Field(gt=0)] = 500.0
    keep_checkpoints: Pos = 3
    compile: bool = False
    grad_checkpointing: bool = False
    # loss-spike watch (diffit_cli.monitor): `spike_patience` reports in a row above `spike_factor` × the running
    # median make a spike; warn, stop, or roll back to the last checkpoint before it with lr × `spike_lr_factor`
    on_spike: Literal["warn", "stop", "rollback"] = "warn"
    spike_factor: Annotated[float, Field(gt=1)] = 2.0
    spike_patience: Pos = 3
    spike_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.5

    @model_validator(mode="after")
    def _one_ema(self) -> "TrainConfig":
        if (self.ema_halflife_kimg is None) == (self.ema_decay is None):
            raise ValueError("set exactly one of train.ema_halflife_kimg (EDM) and train.ema_decay (per step)")
        if self.batch_gpu is not None and self.batch % self.batch_gpu:
            raise ValueError(f"train.batch {self.batch} is not a multiple of train.batch_gpu {self.batch_gpu}")
        return self


class GuidanceConfig(_Section):
    """Classifier-free guidance: exactly the fields of `core.guidance.Guidance` (its null class is the model's
    `num_classes`). `channels`: how many prediction channels are guided (3 = the release's three-channel CFG)."""

    scale: Annotated[float, Field(ge=0)] = 1.0
    schedule: Literal["constant", "power-cosine", "interval"] = "constant"
    power: Annotated[float, Field(gt=0)] = 4.0
    channels: Pos | Literal["all"] = 3
    interval: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(gt=0)]] = (0.28, 5.42)

    @model_validator(mode="after")
    def _ordered(self) -> "GuidanceConfig":
        if not self.interval[0] < self.interval[1]:
            raise ValueError(f"interval must be (σ_lo, σ_hi) with σ_lo < σ_hi, got {self.interval}")
        return self


# Flat `sample.cfg_*` keys of presets and checkpoints written before `sample.guidance` existed (read only).
_LEGACY_GUIDANCE_KEYS = {"cfg_scale": "scale", "cfg_schedule": "schedule", "cfg_power": "power",
                         "cfg_channels": "channels", "cfg_interval": "interval"}


class SampleConfig(_Section):
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


class EvalConfig(_Section):
    metrics: tuple[Literal["fid", "is", "kid", "pr"], ...] = ("fid",)
    num_samples: Pos = 50000
    reference: str | None = None  # statistics file, image folder or dataset; None → the training data
    batch: Pos = 64


ModelConfig = Annotated[Union[UNetConfig, ViTConfig, EncDecConfig, DDPMppConfig], Field(discriminator="kind")]
DiffusionConfig = Annotated[Union[EDMConfig, DDPMConfig, EDMVPConfig, EDMVEConfig], Field(discriminator="kind")]
_KINDS = {"unet": UNetConfig, "vit": ViTConfig, "encdec": EncDecConfig, "ddpmpp": DDPMppConfig, "edm": EDMConfig,
          "ddpm": DDPMConfig, "edm-vp": EDMVPConfig, "edm-ve": EDMVEConfig}


class Preset(_Section):
    name: str
    description: str = ""
    model: ModelConfig
    diffusion: DiffusionConfig
    data: DataConfig
    train: TrainConfig
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> "Preset":
        m, d = self.model, self.data
        grid = d.resolution // 8 if d.space == "latent" else d.resolution
        size = m.img_resolution if m.kind == "unet" else m.input_size
        if size != grid:
            raise ValueError(
                f"model size {size} does not match data.resolution {d.resolution}"
                + (" (latent grid = resolution / 8)" if d.space == "latent" else "")
            )
        if m.in_channels != d.channels:
            raise ValueError(f"model.in_channels {m.in_channels} does not match data.channels {d.channels}")
        g = self.sample.guidance
        if g.scale != 1.0 and m.num_classes == 0:
            raise ValueError("sample.guidance.scale != 1 needs a class-conditional model (model.num_classes > 0)")
        if g.channels != "all" and g.channels > m.in_channels:
            raise ValueError(f"sample.guidance.channels {g.channels}: the model predicts {m.in_channels} channels; "
                             f"use 1..{m.in_channels} or all")
        if self.sample.sampler in ("ddpm", "ddim") and self.diffusion.kind != "ddpm":
            raise ValueError(f"sampler {self.sample.sampler!r} needs diffusion.kind ddpm; EDM uses heun/euler/dpmpp-2m")
        if g.schedule == "power-cosine" and self.diffusion.kind != "ddpm":
            raise ValueError("sample.guidance.schedule power-cosine is defined on DDPM steps t (diffusion.kind ddpm); "
                             "EDM models use constant or interval")
        return self


# ------------------------------------------------------------------------------------------ load and dump
class PresetError(DiffitError):
    """An unknown preset, a malformed override or a value the schema rejects."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 loader that also reads `1e-3` (no dot) as a float, as YAML 1.2 and users do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def preset_dir() -> Path:
    """The shipped presets: inside the installed package (wheel) or at the repository root (editable)."""
    here = Path(__file__).resolve().parent
    return here / "presets" if (here / "presets").is_dir() else here.parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def parse_overrides(overrides: list[str] | None) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings → (key path, YAML scalar) pairs."""
    parsed = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            raise PresetError(f"malformed --set {item!r}: write it as section.key=value, e.g. --set train.lr=2e-4")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except yaml.YAMLError as e:
            raise PresetError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
        parsed.append(([k.strip() for k in keys], value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Return a copy of the raw preset dict with `--set` overrides applied (before validation)."""
    out = copy.deepcopy(raw)
    for keys, value in parse_overrides(overrides):
        node = out
        for depth, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k, {}), dict):
                raise PresetError(f"--set {'.'.join(keys)}: {'.'.join(keys[:depth + 1])} is a value, not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def check_sample_values(values: dict[str, Any]) -> None:
    """Validate typed `sample` values (the `diffit sample` flags) on their own, before any checkpoint is read: a bad
    enumerated value names the valid ones. Checks that need the model (guidance channels) come with the preset."""
    try:
        SampleConfig.model_validate(set_values({}, values))
    except ValidationError as e:
        raise PresetError(_explain(e, values, "sampling flags").replace("fix the preset file or the --set value",
                                                                         "fix the flag")) from None


def set_values(raw: dict, values: dict[str, Any] | None) -> dict:
    """A copy of the raw preset dict with typed values set by dotted key (CLI flags; validated afterwards)."""
    out = copy.deepcopy(raw)
    for key, value in (values or {}).items():
        if value is None:
            continue
        *path, last = key.split(".")
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def read_preset_file(name_or_path: str | Path) -> tuple[dict, str]:
    """Resolve a bare preset name or a path and return (raw dict, where it came from)."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = preset_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise PresetError(
                f"unknown preset {str(name_or_path)!r}; available: {', '.join(available_presets())} "
                "(or pass the path of a .yaml file)"
            )
    if not path.is_file():
        raise PresetError(f"preset file {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise PresetError(f"preset file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"preset file {str(path)!r} must hold a mapping of sections (model, diffusion, ...)")
    return raw, str(path)


def validate_preset(raw: dict, source: str = "preset") -> Preset:
    try:
        return Preset.model_validate(raw)
    except ValidationError as e:
        raise PresetError(_explain(e, raw, source)) from None


def load_preset(name_or_path: str | Path, overrides: list[str] | None = None) -> Preset:
    """Load a shipped preset by name (`ffhq64`) or a YAML file, apply `a.b=value` overrides, validate."""
    raw, source = read_preset_file(name_or_path)
    return validate_preset(apply_overrides(raw, overrides), source)


def preset_to_dict(preset: Preset) -> dict:
    return preset.model_dump(mode="json")


def dump_preset(preset: Preset) -> str:
    """YAML text that `load_preset` reads back to an equal preset."""
    return yaml.safe_dump(preset_to_dict(preset), sort_keys=False, allow_unicode=True)


def preset_from_yaml(text: str, source: str = "preset") -> Preset:
    raw = yaml.load(text, Loader=_Loader)
    if not isinstance(raw, dict):
        raise PresetError(f"{source}: not a preset mapping")
    return validate_preset(raw, source)


def diff_presets(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two preset dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_presets(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _section_fields(loc: tuple) -> list[str]:
    """Field names valid at a location of the schema (for 'did you mean' hints)."""
    model: Any = Preset
    for part in loc[:-1]:
        if isinstance(part, str) and model is not None and part in getattr(model, "model_fields", {}):
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif isinstance(part, str) and part in _KINDS:
            model = _KINDS[part]
    return list(getattr(model, "model_fields", {}) or [])


def _explain(err: ValidationError, raw: dict, source: str) -> str:
    lines = []
    for e in err.errors():
        # drop the union tag pydantic inserts (model.unet.channels → model.channels)
        loc = tuple(p for p in e["loc"] if p not in _KINDS or p == e["loc"][-1])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _section_fields(e["loc"]), n=1)
            lines.append(f"{key}: unknown key" + (f" — did you mean {hint[0]!r}?" if hint else ""))
        elif e["type"] == "missing":
            lines.append(f"{key}: required but missing")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{key}: kind must be one of {e['ctx']['expected_tags']}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{key}: {e['msg']}{shown}")
    return f"invalid preset ({source}):\n  " + "\n  ".join(lines) + "\nfix the preset file or the --set value"
