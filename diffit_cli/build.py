"""The one place that turns a preset into a network, a diffusion object and an optimizer (DESIGN §2).

Each builder receives only its own preset section, so the schema and the constructors stay in step.
"""

from __future__ import annotations

import torch

from diffit_cli.config import DDPMConfig, EDMConfig, EDMVEConfig, EDMVPConfig, ModelConfig, TrainConfig
from diffit_cli.core.baselines import EncoderDecoder
from diffit_cli.core.ddpm import GaussianDiffusion
from diffit_cli.core.ddpmpp import DDPMpp
from diffit_cli.core.edm import EDM
from diffit_cli.core.precond import VEPrecond, VPPrecond
from diffit_cli.core.unet import ImageDiffiT
from diffit_cli.core.vit import LatentDiffiT


def build_network(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """Network from `preset.model` (ImageDiffiT for `unet`, LatentDiffiT for `vit`, ablation baselines otherwise)."""
    kwargs = cfg.model_dump(exclude={"kind"})
    if cfg.kind == "unet":
        net = ImageDiffiT(**kwargs)
    elif cfg.kind == "vit":
        net = LatentDiffiT(**kwargs)
    elif cfg.kind == "encdec":  # Table 4 baselines

        net = EncoderDecoder(**kwargs)
    elif cfg.kind == "ddpmpp":  # Table 5 baseline

        net = DDPMpp(**kwargs)
    else:
        raise TypeError(f"unknown model kind {cfg.kind!r}")
    return net if device is None else net.to(device)

def build_diffusion(cfg: EDMConfig | DDPMConfig, model: ModelConfig):
    """Diffusion object from `preset.diffusion`; the DDPM variance type follows the network's `learn_sigma`."""
    if isinstance(cfg, EDMConfig):
        return EDM(**cfg.model_dump(exclude={"kind"}))
    if isinstance(cfg, (EDMVPConfig, EDMVEConfig)):  # Table 5: EDM's VP / VE preconditioning

        return (VPPrecond if isinstance(cfg, EDMVPConfig) else VEPrecond)(**cfg.model_dump(exclude={"kind"}))
    learn_sigma = getattr(model, "learn_sigma", False)
    return GaussianDiffusion(num_timesteps=cfg.num_timesteps, schedule=cfg.schedule, learn_sigma=learn_sigma)

def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (EDM, image space) or AdamW (DiT/ADM, latent space) from `preset.train`."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

def count_parameters(net: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)

def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of a preset's network, counted on the meta device (no memory, instant even for XL/2)."""
    with torch.device("meta"):
        return count_parameters(build_network(cfg))
