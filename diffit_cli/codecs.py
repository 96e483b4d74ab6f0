"""Codecs: a raw source batch → model space (`encode`), model output → uint8 NHWC (`decode`).

- `PixelCodec`: uint8 images ⇄ [-1, 1]. Decoding rounds half up, `(x + 1)·127.5 + 0.5` truncated, i.e.
  `clamp(127.5·x + 128, 0, 255)` as DiT's / the DiffiT release's `sample_ddp.py` and EDM write samples.
  `decode` of both codecs returns a uint8 NHWC NumPy array on the CPU (`decode_pixels` and
  `VAECodec.decode_tensor` keep a tensor on the device).
- `VAECodec`: the Stable-Diffusion KL-f8 autoencoder (diffusers `AutoencoderKL`), default
  `stabilityai/sd-vae-ft-ema`, latents scaled by 0.18215. It loads from a Hub id, a local folder
  (`save_pretrained` layout, or a pipeline folder with `vae/`) or one `.safetensors` file (diffusers or
  original-LDM key names; the architecture is the shipped sd-vae-ft-ema config, with block widths/depth
  read from the weights). Offline (HF_HUB_OFFLINE=1 or no network) and not cached, a Hub id fails at once
  with a `DiffitError` that says how to pass a local copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from diffit_cli.data import DEFAULT_LATENT_SCALE, normalize_pixels, sample_latent
from diffit_cli.downloads import offline
from diffit_cli.errors import DiffitError
from diffit_cli.precision import check_precision

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
VAE_CONFIG_PATH = Path(__file__).resolve().parent / "assets" / "sd-vae-ft-ema.json"
LOCAL_HINT = (
    "pass a local copy instead: --vae /path/to/folder (holding config.json and "
    "diffusion_pytorch_model.safetensors, e.g. from `huggingface-cli download {id}`) or "
    "--vae /path/to/weights.safetensors"
)


class VAEError(DiffitError):
    """The VAE cannot be found, downloaded or loaded."""


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model-space images (B, C, H, W) in [-1, 1] → uint8 (B, H, W, C), clamped, rounded half up."""
    return (x.detach().to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class PixelCodec:
    """Image-space codec: uint8 NCHW ⇄ float [-1, 1]."""

    kind = "pixel"

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None

    def encode(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.device is not None:
            batch = batch.to(self.device, non_blocking=True)
        return normalize_pixels(batch)

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Model-space images → uint8 NHWC NumPy array on the CPU (what the PNG/NPZ writers take)."""
        return decode_pixels(x).cpu().numpy()


# -------------------------------------------------------------------------------------------- loading
def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or os.sep != "/"
        and os.sep in spec
        or spec.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin"))
    )


def vae_config() -> dict:
    """The shipped sd-vae-ft-ema `AutoencoderKL` config."""
    return json.loads(VAE_CONFIG_PATH.read_text())


def _config_from_weights(sd: dict[str, torch.Tensor]) -> dict:
    """The shipped config, with block widths, depth and channels read from the weights' shapes."""
    cfg = vae_config()
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    if blocks:
        cfg["block_out_channels"] = [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in blocks]
        cfg["down_block_types"] = ["DownEncoderBlock2D"] * len(blocks)
        cfg["up_block_types"] = ["UpDecoderBlock2D"] * len(blocks)
        cfg["layers_per_block"] = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
    if "quant_conv.weight" in sd:
        cfg["latent_channels"] = sd["quant_conv.weight"].shape[0] // 2
    if "encoder.conv_in.weight" in sd:
        cfg["in_channels"] = sd["encoder.conv_in.weight"].shape[1]
    if "decoder.conv_out.weight" in sd:
        cfg["out_channels"] = sd["decoder.conv_out.weight"].shape[0]
    return cfg


def _load_single_file(path: Path):
    from diffusers import AutoencoderKL  # here: diffusers takes seconds to import and pixel runs never need it

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise VAEError(f"cannot read VAE weights {str(path)!r}: {e}") from None
    if not any(k.startswith("encoder.down_blocks.") for k in sd):  # original LDM names (encoder.down.0 ...)
        try:
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # (diffusers: slow import)

            sd = convert_ldm_vae_checkpoint(sd, vae_config())
        except Exception as e:
            raise VAEError(
                f"{str(path)!r} does not hold AutoencoderKL weights in diffusers or LDM layout ({e})"
            ) from None
    vae = AutoencoderKL.from_config(_config_from_weights(sd))
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise VAEError(
            f"{str(path)!r} does not match the SD-VAE (KL-f8) architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]})"
        )
    return vae


def load_vae(spec: Any = DEFAULT_VAE, *, cache_dir: str | Path | None = None):
    """`AutoencoderKL` from a Hub id, a local folder, a `.safetensors` file, or an instance (returned as is)."""
    from diffusers import AutoencoderKL  # here: diffusers takes seconds to import and pixel runs never need it

    if isinstance(spec, torch.nn.Module):
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise VAEError(f"--vae {text!r}: single-file VAE weights must be a .safetensors file")
        return _load_single_file(path)
    if path.is_dir():
        sub = next((s for s in ("", "vae") if (path / s / "config.json").is_file()), None)
        if sub is None:
            raise VAEError(
                f"--vae {text!r}: the folder has no config.json (nor vae/config.json); pass a "
                "folder written by AutoencoderKL.save_pretrained or a .safetensors file"
            )
        try:
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub or None)
        except Exception as e:
            raise VAEError(f"cannot load the VAE folder {text!r}: {e}") from None
    if _looks_like_path(text):
        raise VAEError(
            f"--vae {text!r} does not exist (expected a Hub id such as {DEFAULT_VAE}, a folder or a .safetensors file)"
        )
    no_downloads = offline()
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated huggingface_hub argument
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return AutoencoderKL.from_pretrained(text, local_files_only=no_downloads, cache_dir=cache_dir)
    except Exception as e:
        reason = (
            "downloads are off (HF_HUB_OFFLINE/DIFFIT_OFFLINE) and it is not in the local Hugging Face cache"
            if no_downloads
            else f"the download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        )
        raise VAEError(
            f"cannot load the VAE {text!r} from the Hugging Face Hub: {reason}; " + LOCAL_HINT.format(id=text)
        ) from None


def _module_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


class VAECodec:
    """SD-VAE latent codec. `encode_stats(uint8 images)` → posterior (mean, std); `encode(raw batch)` →
    model-space latents (scaled samples) from images or stored stats; `decode(latents)` → uint8 NHWC."""

    kind = "latent"

    def __init__(
        self,
        vae: Any = DEFAULT_VAE,
        *,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        scale: float = DEFAULT_LATENT_SCALE,
        cache_dir: str | Path | None = None,
    ):
        check_precision(precision, "VAE precision", VAEError)
        self.vae_id = str(vae) if not isinstance(vae, torch.nn.Module) else type(vae).__name__
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.vae = load_vae(vae, cache_dir=cache_dir).to(self.device).eval().requires_grad_(False)
        self.precision = precision
        self.scaling_factor = float(scale)
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self._hash: str | None = None

    @property
    def content_hash(self) -> str:
        """sha256 over the weights (names and fp32 values): ties latents to the exact VAE."""
        if self._hash is None:
            self._hash = _module_hash(self.vae)
        return self._hash

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def encode_stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (or [-1, 1] float) images (B, 3, H, W) → posterior mean and std (B, C, H/8, W/8), float32."""
        x = images.to(self.device, non_blocking=True)
        x = normalize_pixels(x) if x.dtype == torch.uint8 else x.to(torch.float32)
        with self._autocast():
            dist = self.vae.encode(x).latent_dist
        return dist.mean.to(torch.float32), dist.std.to(torch.float32)

    def encode(
        self, batch: torch.Tensor, generator: torch.Generator | None = None, *, xflip: bool = True
    ) -> torch.Tensor:
        """Raw batch → model-space latents: stored stats (B, 2, 2, C, h, w) via `sample_latent`, or uint8
        images encoded now (then `xflip` mirrors each image with probability ½ first)."""
        if batch.dtype == torch.uint8:
            batch = batch.to(self.device, non_blocking=True)
            if xflip:
                flip = torch.randint(0, 2, (batch.shape[0], 1, 1, 1), generator=generator, device=batch.device)
                batch = torch.where(flip == 1, batch.flip(3), batch)
            mean, std = self.encode_stats(batch)
            eps = torch.randn(mean.shape, generator=generator, device=mean.device)
            return (mean + std * eps) * self.scaling_factor
        return sample_latent(
            batch.to(self.device, non_blocking=True), scale=self.scaling_factor, xflip=xflip, generator=generator
        )

    @torch.no_grad()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents → uint8 images (B, H, W, 3) as a tensor on the codec's device."""
        with self._autocast():
            x = self.vae.decode(latents.to(self.device) / self.scaling_factor).sample
        return decode_pixels(x)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Model-space latents → uint8 NHWC NumPy array on the CPU (what the PNG/NPZ writers take)."""
        return self.decode_tensor(latents).cpu().numpy()


def make_codec(data_cfg: Any, device: torch.device | str | None = None, vae: str | None = None, **kwargs):
    """The codec a `DataConfig` needs: PixelCodec for `space: pixel`, VAECodec for `latent` (`vae` if given,
    else `data.vae`)."""
    if data_cfg.space == "pixel":
        return PixelCodec(device)
    return VAECodec(vae or data_cfg.vae, device=device, scale=data_cfg.latent_scale, **kwargs)
