"""The diffusion interface: what samplers (`core.samplers`) and guidance (`core.guidance`) use of a diffusion.

`EDM` and its VP/VE variants satisfy `SigmaDiffusion`; ADM's `GaussianDiffusion` satisfies both (its σ view is
k-diffusion's ε→D adapter). Checked structurally (`isinstance`), so a new diffusion needs no registration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]  # D(x, σ (B,)) -> x̂0


@runtime_checkable
class SigmaDiffusion(Protocol):
    """What σ-space samplers and guidance use (EDM and its VP/VE variants; DDPM through its ε→D adapter)."""

    sigma_min: float
    sigma_max: float

    def denoiser(
        self, net: Callable, y: Tensor | None = None, *, autocast_dtype: torch.dtype | None = None
    ) -> Denoiser: ...

    def sigma_from_network_time(self, t_in: Tensor) -> Tensor: ...


@runtime_checkable
class AncestralDiffusion(SigmaDiffusion, Protocol):
    """What the DDPM family and power-cosine guidance use in addition (ADM's GaussianDiffusion)."""

    num_timesteps: int
    original_num_timesteps: int

    def respace(self, section_counts: str | int | Sequence[int]) -> AncestralDiffusion: ...

    def network_time(self, t: Tensor) -> Tensor: ...

    def ddpm_t_from_network_time(self, t_in: Tensor) -> Tensor: ...

    def p_sample(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, noise: Tensor | None, clip_denoised: bool = False
    ) -> Tensor: ...

    def ddim_sample(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        noise: Tensor | None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> Tensor: ...
