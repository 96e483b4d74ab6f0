"""EDM's VP and VE preconditionings (Karras et al. 2022, Table 1 columns "VP" and "VE") for the Table 5 baselines.

Both reuse :class:`~diffit_cli.core.edm.EDM` (denoiser D = c_skip·x + c_out·F(c_in·x; c_noise), the per-sample
loss λ(σ)·‖D − x0‖², the σ-space samplers); only the four coefficients, the σ training distribution and the
loss weight change:

=========  ===========================  ========================================
           VP (DDPM++ of Song et al.)   VE (NCSN++ of Song et al.)
=========  ===========================  ========================================
c_skip     1                            1
c_out      −σ                           σ
c_in       1/√(σ²+1)                    1
c_noise    (M−1)·σ⁻¹(σ)                 ln(σ/2)
training   t ~ U(ε_t, 1), σ = σ(t)      ln σ ~ U(ln σ_min, ln σ_max)
λ(σ)       1/σ²                         1/σ²
=========  ===========================  ========================================

with σ(t) = √(exp(½β_d t² + β_min t) − 1) (VP). Sampling uses the deterministic Heun sampler over EDM's
clamped ranges, [0.002, 80] for VP and [0.02, 80] for VE, as EDM's ``generate.py`` does for these networks.
"""

from __future__ import annotations

import math

import torch

from .edm import EDM

Tensor = torch.Tensor


class _NoisePrecond(EDM):
    """What VP and VE share (Table 1): c_skip = 1, λ(σ) = 1/σ², and training σ = `_sigma_from_uniform(u)`, u ~ U(0, 1)
    (each subclass defines that map: its training distribution)."""

    def c_skip(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return 1 / sigma**2

    def sample_sigma(self, batch: int, device: torch.device | str) -> Tensor:
        return self._sigma_from_uniform(torch.rand([batch], device=device))

    def training_noise(self, batch: int, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        device = generator.device
        sigma = self._sigma_from_uniform(torch.rand([batch], generator=generator, device=device))
        return {"sigma": sigma, "noise": torch.randn((batch, *shape), generator=generator, device=device)}


class VPPrecond(_NoisePrecond):
    """VP preconditioning and loss (EDM ``VPPrecond`` / ``VPLoss`` constants)."""

    def __init__(
        self,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
    ) -> None:
        super().__init__(sigma_data=1.0, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)

    def __repr__(self) -> str:
        return f"VPPrecond(beta_d={self.beta_d}, beta_min={self.beta_min}, M={self.M}, epsilon_t={self.epsilon_t})"

    def sigma(self, t: Tensor) -> Tensor:
        """σ(t) = √(exp(½β_d t² + β_min t) − 1)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """t with σ(t) = σ."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def c_out(self, sigma: Tensor) -> Tensor:
        return -sigma

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1 / (sigma**2 + 1).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return ((self.M - 1) * self.sigma_inv(sigma)).to(sigma.dtype)

    def sigma_from_network_time(self, c_noise: Tensor) -> Tensor:
        return self.sigma(c_noise.to(torch.float64) / (self.M - 1)).to(torch.float32)

    def _sigma_from_uniform(self, u: Tensor) -> Tensor:
        return self.sigma(1 + u.to(torch.float64) * (self.epsilon_t - 1)).to(torch.float32)


class VEPrecond(_NoisePrecond):
    """VE preconditioning and loss (EDM ``VEPrecond`` / ``VELoss``): σ log-uniform on [σ_min, σ_max] for training."""

    def __init__(
        self, sigma_min: float = 0.02, sigma_max: float = 100.0, sample_sigma_max: float = 80.0, rho: float = 7.0
    ) -> None:
        super().__init__(sigma_data=1.0, sigma_min=sigma_min, sigma_max=min(sigma_max, sample_sigma_max), rho=rho)
        self.train_sigma_min, self.train_sigma_max = float(sigma_min), float(sigma_max)

    def __repr__(self) -> str:
        return f"VEPrecond(sigma_min={self.train_sigma_min}, sigma_max={self.train_sigma_max})"

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma

    def c_in(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (0.5 * sigma).log()

    def sigma_from_network_time(self, c_noise: Tensor) -> Tensor:
        return 2 * c_noise.to(torch.float32).exp()

    def _sigma_from_uniform(self, u: Tensor) -> Tensor:
        lo, hi = math.log(self.train_sigma_min), math.log(self.train_sigma_max)
        return (lo + u * (hi - lo)).exp()
