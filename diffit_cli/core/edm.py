"""EDM (Karras et al. 2022, arXiv 2206.00364): preconditioning, σ sampling and loss for image space.

Contracts (other modules rely on them):

* The raw network is called as ``net(x_in, c_noise, y, augment_labels=aug)`` where ``x_in = c_in·x``
  (B, C, H, W), ``c_noise = ¼·ln σ`` has shape (B,) float32, ``y`` is passed positionally (``None`` for
  unconditional models) and the ``augment_labels`` keyword is passed only when it is not ``None``.
* ``EDM.loss(net, x0, y=None, augment_labels=None, *, sigma=None, noise=None) -> (B,)``: per-sample
  loss, the **mean** over the non-batch dimensions of ``λ(σ)·‖D(x0 + σn; σ) − x0‖²``. EDM's
  ``training/loss.py`` returns the per-element loss and its training loop sums it (over elements,
  divided by the batch): the mean differs from that sum by the constant factor C·H·W only. All
  randomness (σ first, then the noise, the order EDM draws them in) comes from the global torch RNG
  on ``x0``'s device, so a saved RNG state replays a step. ``training_noise(batch, shape, generator)
  -> {"sigma", "noise"}`` draws them from a generator instead, for a whole global batch, to be sliced
  per device and passed back to ``loss``.
* ``EDM.denoiser(net, y=None) -> D(x, sigma)``: the preconditioned denoiser (EDM Table 1, ``EDMPrecond``);
  ``x`` may be float64 (the samplers accumulate in float64), ``sigma`` has shape (B,); it returns float32.
* Optional ``autocast_dtype`` (e.g. ``torch.bfloat16``): the network runs under ``torch.autocast`` while
  the preconditioning stays float32 and the network output is cast to float32 (EDM's ``use_fp16``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def call_network(net: Callable, autocast_dtype: torch.dtype | None, x: Tensor, *args, **kwargs) -> Tensor:
    """Run ``net(x, *args, **kwargs)``, under autocast when a dtype is given; the output is float32."""
    if autocast_dtype is None:
        return net(x, *args, **kwargs).to(torch.float32)
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        out = net(x, *args, **kwargs)
    return out.to(torch.float32)


def autocast_network(net: Callable, autocast_dtype: torch.dtype | None) -> Callable:
    """``net`` with the same call signature, run under autocast, returning float32."""
    if autocast_dtype is None:
        return net

    def wrapped(x: Tensor, *args, **kwargs) -> Tensor:
        return call_network(net, autocast_dtype, x, *args, **kwargs)

    return wrapped


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, ...) → (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _expand(sigma: Tensor | float, x: Tensor) -> Tensor:
    """σ as float32 (B, 1, …, 1) broadcastable against x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class EDM:
    """EDM preconditioning, log-normal σ training distribution and loss weighting (EDM Table 1)."""

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
    ) -> None:
        self.sigma_data = float(sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)

    def __repr__(self) -> str:
        return (
            f"EDM(sigma_data={self.sigma_data}, p_mean={self.p_mean}, p_std={self.p_std}, "
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"
        )

    # ------------------------------------------------------------------ preconditioning (EDM Table 1)
    def c_skip(self, sigma: Tensor) -> Tensor:
        """EDM Table 1: c_skip(σ) = σ_d² / (σ² + σ_d²)."""
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        """EDM Table 1: c_out(σ) = σ·σ_d / √(σ² + σ_d²)."""
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: Tensor) -> Tensor:
        """EDM Table 1: c_in(σ) = 1 / √(σ² + σ_d²)."""
        return 1 / (self.sigma_data**2 + sigma**2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        """EDM Table 1: c_noise(σ) = ¼·ln σ."""
        return sigma.log() / 4

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM Table 1: λ(σ) = (σ² + σ_d²) / (σ·σ_d)²."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # ------------------------------------------------------------------ network time ↔ σ (used by guidance)
    def sigma_from_network_time(self, c_noise: Tensor) -> Tensor:
        """σ of the network's time input c_noise = ¼·ln σ: σ = exp(4·c_noise)."""
        return (4 * c_noise.to(torch.float32)).exp()

    def ddpm_t_from_network_time(self, c_noise: Tensor) -> Tensor:
        """EDM has no discrete DDPM index (power-cosine guidance needs one)."""
        raise ValueError("EDM has no DDPM timestep index; use guidance schedule 'constant' or 'interval'")

    # ------------------------------------------------------------------ denoiser D(x; σ)
    def denoise(
        self,
        net: Callable,
        x: Tensor,
        sigma: Tensor | float,
        y: Tensor | None = None,
        augment_labels: Tensor | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """EDM eq. 7 / ``EDMPrecond``: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise). Returns float32."""
        x = x.to(torch.float32)
        sigma = _expand(sigma, x).expand(x.shape[0], *([1] * (x.ndim - 1)))  # (B, 1, …, 1)
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        c_noise = self.c_noise(sigma).flatten()  # (B,)
        F_x = call_network(net, autocast_dtype, self.c_in(sigma) * x, c_noise, y, **kwargs)
        if F_x.shape != x.shape:  # a broadcast here would train and sample the wrong thing without an error
            raise ValueError(f"the network maps {tuple(x.shape)} to {tuple(F_x.shape)}; EDM needs the input's shape")
        return self.c_skip(sigma) * x + self.c_out(sigma) * F_x

    def denoiser(
        self, net: Callable, y: Tensor | None = None, *, autocast_dtype: torch.dtype | None = None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``D(x, sigma)`` for the samplers, with the labels bound (EDM Alg. 2's D_θ)."""

        def D(x: Tensor, sigma: Tensor) -> Tensor:
            return self.denoise(net, x, sigma, y, autocast_dtype=autocast_dtype)

        return D

    # ------------------------------------------------------------------ training
    def sample_sigma(self, batch: int, device: torch.device | str) -> Tensor:
        """EDM Table 1: ln σ ~ N(P_mean, P_std²); shape (B,). Global torch RNG."""
        rnd_normal = torch.randn([batch], device=device)
        return (rnd_normal * self.p_std + self.p_mean).exp()

    def training_noise(self, batch: int, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """The loss's random draws for a whole (global) batch from ``generator``: σ (B,) then n (B, *shape),
        so a training step's noise does not depend on how the batch is split across devices."""
        device = generator.device
        rnd_normal = torch.randn([batch], generator=generator, device=device)
        sigma = (rnd_normal * self.p_std + self.p_mean).exp()
        return {"sigma": sigma, "noise": torch.randn((batch, *shape), generator=generator, device=device)}

    def loss(
        self,
        net: Callable,
        x0: Tensor,
        y: Tensor | None = None,
        augment_labels: Tensor | None = None,
        *,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """EDM eq. 8 / ``EDMLoss``: λ(σ)·‖D(x0 + σn; σ) − x0‖², n ~ N(0, I); mean per sample → (B,).

        ``sigma`` (B,) and the unit ``noise`` (B, …) may be given (see :meth:`training_noise`);
        otherwise they are drawn from the global torch RNG on x0's device, σ first as EDM does.
        """
        x0 = x0.to(torch.float32)
        if sigma is None:
            sigma = self.sample_sigma(x0.shape[0], x0.device)  # (B,)
        if noise is None:
            noise = torch.randn_like(x0)
        sigma = sigma.to(device=x0.device, dtype=torch.float32)
        n = noise.to(device=x0.device, dtype=torch.float32) * _expand(sigma, x0)
        D_yn = self.denoise(net, x0 + n, sigma, y, augment_labels, autocast_dtype=autocast_dtype)
        return self.loss_weight(sigma) * mean_flat((D_yn - x0) ** 2)


__all__ = ["EDM", "call_network", "autocast_network", "mean_flat"]
