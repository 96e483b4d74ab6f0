"""Guidance: classifier-free guidance (Ho & Salimans 2022) with a learned null class, as the DiffiT release / DiT
apply it, and autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself").

Contracts (other modules rely on them):

* :class:`Guidance` ``(scale=1.0, schedule="constant", power=4.0, channels=3, interval=(0.28, 5.42),
  null_class=1000, mode="cfg")``: a frozen dataclass; ``channels="all"`` is stored as ``None``.
* :func:`guided_network` ``(net, y, guidance, diffusion, guide=None)`` returns a callable with the raw network's
  signature, ``g(x, t_in, y=None, **kwargs)``, whose labels are bound (the ``y`` argument must be
  ``None``), so samplers and the diffusions' denoisers never see labels or scales. Its output is float32.
* ``scale == 1`` (or ``guidance=None``): exactly the conditional network, one forward of the B rows.
  Otherwise one forward of the doubled batch ``[x; x]`` with labels ``[y; null]`` (both halves share
  the conditional input, as the release's ``forward_with_cfg``); the first ``channels`` channels of the
  prediction part (the first C = x.shape[1] output channels) are guided,
  ``ε = ε_u + s·(ε_c − ε_u)``; the remaining prediction channels and all learned-variance channels
  come from the conditional half (three-channel CFG of DiT / DiffiT; ``channels=None`` guides all C).
* ``mode="auto"`` (autoguidance): ``guide`` is a weaker network with the main one's input, output and labels;
  both see the same x, time and labels (B rows each, two forwards) and all C prediction channels are guided,
  ``D = D_guide + s·(D_main − D_guide)`` (Karras et al. 2024, Sec. 3); learned-variance channels come from the
  main network; ``channels`` and ``null_class`` are not used. Combining raw outputs equals combining the
  denoisers D = c_skip·x + c_out·F because both networks share the diffusion's preconditioning. Unconditional
  models can be autoguided (``y=None``).
* Schedules of the scale s (per row, no host syncs):
  ``constant``: s = w.
  ``power-cosine`` (MDT / DiffiT ImageNet-256): s(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − t/T)^p)), t the
  original DDPM index, T the original number of steps (needs a DDPM diffusion).
  ``interval`` (Kynkäänniemi et al. 2024, arXiv 2404.07724): s = w for σ ∈ (σ_lo, σ_hi], else 1. The
  default (0.28, 5.42] is that paper's interval for EDM2 on ImageNet-512 in EDM σ units (also the
  default of ComfyUI's GuidanceLimiter node); for the latent DDPM model σ = √((1 − ᾱ_t)/ᾱ_t).
  A call with no row inside the interval evaluates the conditional batch alone (B rows, not 2B): one host read
  of the in-interval count per call, far cheaper than the unconditional half it saves (the samplers give all
  rows one σ, so a call is all in or all out). The other schedules evaluate the doubled batch at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffit_cli.core.diffusion import SigmaDiffusion

Tensor = torch.Tensor
SCHEDULES = ("constant", "power-cosine", "interval")
MODES = ("cfg", "auto")


@dataclass(frozen=True)
class Guidance:
    """Guidance settings (CFG: w = 4.4 power-cosine at 256, 1.49 constant at 512; docs/paper.md)."""

    scale: float = 1.0
    schedule: str = "constant"
    power: float = 4.0
    channels: int | str | None = 3
    interval: tuple[float, float] = (0.28, 5.42)
    null_class: int = 1000
    mode: str = "cfg"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown guidance mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown guidance schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.channels == "all":
            object.__setattr__(self, "channels", None)
        if self.channels is not None and (not isinstance(self.channels, int) or self.channels < 1):
            raise ValueError(f"guidance channels must be a positive int, 'all' or None, got {self.channels!r}")
        lo, hi = self.interval
        if not 0 <= lo < hi:
            raise ValueError(f"guidance interval must satisfy 0 ≤ σ_lo < σ_hi, got {self.interval}")

    @property
    def active(self) -> bool:
        """False when the scale is 1: the conditional model alone, no doubled batch."""
        return float(self.scale) != 1.0


def power_cosine_scale(w: float, t: Tensor, num_timesteps: int = 1000, power: float = 4.0) -> Tensor:
    """MDT "improved CFG": s(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − t/T)^p)); s(T) = 1, s(0) = w."""
    u = (1 - t.to(torch.float32) / num_timesteps).clamp(min=0)
    return 1 + (w - 1) * 0.5 * (1 - torch.cos(math.pi * u**power))


def in_interval(sigma: Tensor, interval: tuple[float, float]) -> Tensor:
    """Kynkäänniemi et al. 2024: guidance is on for σ ∈ (σ_lo, σ_hi]; (B,) bool."""
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def guidance_scale(guidance: Guidance, t_in: Tensor, diffusion: SigmaDiffusion) -> Tensor | float:
    """The scale for the network time input ``t_in`` (B,): a float for ``constant`` and ``interval`` (applied
    only inside the interval, see :class:`GuidedNetwork`), per row for ``power-cosine``."""
    w = float(guidance.scale)
    if guidance.schedule != "power-cosine":
        return w
    t = diffusion.ddpm_t_from_network_time(t_in)
    return power_cosine_scale(w, t, diffusion.original_num_timesteps, guidance.power)


def cfg_combine(
    out: Tensor, in_channels: int, scale: Tensor | float, channels: int | None, active: Tensor | None = None
) -> Tensor:
    """Combine a [cond; uncond] output (2B, C_out, …) → (B, C_out, …): guide the first ``channels``
    prediction channels, take the rest from the conditional half (DiT ``forward_with_cfg``); rows
    where ``active`` (B,) is False are exactly the conditional output."""
    cond, uncond = out.chunk(2, dim=0)
    k = in_channels if channels is None else min(channels, in_channels)
    if isinstance(scale, Tensor):
        scale = scale.reshape(-1, *([1] * (out.ndim - 1)))  # (B, 1, …, 1)
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    if active is not None:
        guided = torch.where(active.reshape(-1, *([1] * (out.ndim - 1))), guided, cond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


def _double(value: Any, batch: int) -> Any:
    """Repeat a per-row tensor for the doubled batch; anything else passes unchanged."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value], dim=0)
    return value


class GuidedNetwork:
    """A network with labels bound and CFG or autoguidance applied; called like the raw network (module doc)."""

    def __init__(
        self,
        net: Callable,
        y: Tensor | None,
        guidance: Guidance | None,
        diffusion: SigmaDiffusion,
        guide: Callable | None = None,
    ) -> None:
        self.net, self.y, self.diffusion, self.guide = net, y, diffusion, guide
        self.guidance = guidance if guidance is not None and guidance.active else None
        if self.guidance is None:
            return
        if self.guidance.mode == "auto" and guide is None:
            raise ValueError("autoguidance (mode 'auto', scale ≠ 1) needs a guiding network")
        if self.guidance.mode == "cfg" and y is None:
            raise ValueError("classifier-free guidance (scale ≠ 1) needs class labels y")
        if self.guidance.schedule == "power-cosine":
            diffusion.ddpm_t_from_network_time(torch.zeros(1))  # raises for diffusions without a DDPM index

    def __call__(self, x: Tensor, t_in: Tensor, y: Tensor | None = None, **kwargs: Any) -> Tensor:
        if y is not None:
            raise ValueError("labels are bound in GuidedNetwork; call it with y=None")
        if self.guidance is None:
            return self.net(x, t_in, self.y, **kwargs).to(torch.float32)
        B, g = x.shape[0], self.guidance
        active = None  # interval: outside it, exactly the conditional output
        if g.schedule == "interval":
            active = in_interval(self.diffusion.sigma_from_network_time(t_in), g.interval)
            if not bool(active.any()):  # host read: the unconditional half is not needed at all
                return self.net(x, t_in, self.y, **kwargs).to(torch.float32)
        if g.mode == "auto":  # [main; guide] outputs, combined like [cond; uncond]
            main = self.net(x, t_in, self.y, **kwargs).to(torch.float32)
            out = torch.cat([main, self.guide(x, t_in, self.y, **kwargs).to(torch.float32)])
            return cfg_combine(out, x.shape[1], guidance_scale(g, t_in, self.diffusion), None, active)
        null = torch.full_like(self.y, g.null_class)
        kwargs = {k: _double(v, B) for k, v in kwargs.items()}
        out = self.net(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([self.y, null]), **kwargs)  # (2B, Co, …)
        return cfg_combine(
            out.to(torch.float32), x.shape[1], guidance_scale(g, t_in, self.diffusion), g.channels, active
        )


def guided_network(
    net: Callable,
    y: Tensor | None,
    guidance: Guidance | None,
    diffusion: SigmaDiffusion,
    guide: Callable | None = None,
) -> GuidedNetwork:
    """Bind labels (and CFG or autoguidance by ``guide`` when ``guidance.scale != 1``) to ``net``; see
    :class:`GuidedNetwork`."""
    return GuidedNetwork(net, y, guidance, diffusion, guide)


__all__ = [
    "Guidance",
    "GuidedNetwork",
    "guided_network",
    "guidance_scale",
    "power_cosine_scale",
    "in_interval",
    "cfg_combine",
    "SCHEDULES",
    "MODES",
]
