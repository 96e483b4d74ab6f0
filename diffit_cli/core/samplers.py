"""Samplers: one registry, one signature, for the EDM (σ-space) and the ADM (DDPM) diffusions.

Entry point (the pipeline calls this for every model and sampler)::

    sample(diffusion, net, noise, *, y=None, sampler="heun", steps=18, guidance=None, generators,
           autocast_dtype=None, **sampler_options) -> x0  (float32, model space)

* ``noise`` is the initial N(0, I) tensor (B, C, H, W) the caller drew from ``generators`` (one
  ``torch.Generator`` per row). σ-space samplers scale it by σ_max themselves; DDPM samplers use it as x_T.
* Every later random draw (EDM churn, DDPM/DDIM ancestral noise) is made row by row from that row's
  generator with the row's shape, so sample i depends only on generator i: the batch size never
  changes a sample's random stream. (Bit-identical outputs across batch sizes additionally need a
  batch-invariant network; vendor matmul/conv kernels usually are not.)
* Registered samplers share the signature
  ``fn(diffusion, net, noise, *, steps, generators, callback=None, **options) -> x0`` where ``net`` is
  the label-bound network from :func:`guidance.guided_network` (samplers never see labels or scales)
  and ``callback(i, x)`` is called after step i.

  ===========  =========================================  ============  ==========================
  name         method                                     NFE (steps N)  diffusions
  ===========  =========================================  ============  ==========================
  heun         EDM Alg. 2 (2nd order, optional churn)     2N − 1        EDM, DDPM (σ adapter)
  euler        EDM Alg. 2 without the 2nd-order step      N             EDM, DDPM (σ adapter)
  dpmpp-2m     DPM-Solver++(2M) (k-diffusion)             N             EDM, DDPM (σ adapter)
  ddpm         ADM ancestral, respaced to N, learned Σ    N             DDPM
  ddim         DDIM (η), respaced to N                    N             DDPM
  ===========  =========================================  ============  ==========================

  σ-space samplers use Karras et al. steps (EDM eq. 5, ρ = 7): σ_max 80 → σ_min 0.002 then 0 for EDM,
  the table's [σ_min, σ_max] for DDPM (≈0.01 → 157 for the linear schedule), and accumulate in
  float64 as EDM's ``edm_sampler``. Options: ``sigma_min, sigma_max, rho`` (all σ samplers),
  ``S_churn, S_min, S_max, S_noise`` (heun, euler; lower-case aliases accepted), ``eta`` (ddim),
  ``respacing`` (an ADM section string such as "250" or "ddim50", overriding ``steps``) and
  ``clip_denoised`` (ddpm, ddim).
* No host-device syncs inside the loops: σ steps and all step coefficients are Python floats.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from diffit_cli.core.ddpm import GaussianDiffusion
from diffit_cli.core.edm import EDM, autocast_network, karras_sigmas
from diffit_cli.core.guidance import Guidance, guided_network

Tensor = torch.Tensor
Callback = Callable[[int, Tensor], None] | None


# ------------------------------------------------------------------------------------- randomness
def randn_rows(generators: Sequence[torch.Generator], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """N(0, I) like ``like`` (B, …), row i drawn from ``generators[i]`` (EDM ``StackedRandomGenerator``)."""
    dtype = like.dtype if dtype is None else dtype
    rows = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(like.device)  # (B, …)


def _full(x: Tensor, value: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """A (B,) tensor of one host value (no sync)."""
    return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)


# ------------------------------------------------------------------------------------- σ-space samplers
def _sigma_steps(
    diffusion: Any, steps: int, sigma_min: float | None, sigma_max: float | None, rho: float | None
) -> list[float]:
    """EDM eq. 5 steps; for DDPM the range is clamped to the table (as EDM clamps to the net's range)."""
    lo = diffusion.sigma_min if sigma_min is None else sigma_min
    hi = diffusion.sigma_max if sigma_max is None else sigma_max
    if isinstance(diffusion, GaussianDiffusion):
        lo, hi = max(lo, diffusion.sigma_min), min(hi, diffusion.sigma_max)
    rho = getattr(diffusion, "rho", 7.0) if rho is None else rho
    return karras_sigmas(steps, lo, hi, rho)


def _edm_loop(
    diffusion: Any, net: Callable, noise: Tensor, steps: int, generators: Sequence[torch.Generator], second_order: bool,
    callback: Callback, sigma_min: float | None, sigma_max: float | None, rho: float | None,
    S_churn: float, S_min: float, S_max: float, S_noise: float,
) -> Tensor:
    """EDM Alg. 2 (``edm_sampler``): Euler step plus Heun's 2nd-order correction, optional churn."""
    D = diffusion.denoiser(net)
    sigmas = _sigma_steps(diffusion, steps, sigma_min, sigma_max, rho)
    N = len(sigmas) - 1
    x_next = noise.to(torch.float64) * sigmas[0]  # (B, C, H, W), float64
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_cur = x_next
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if S_churn > 0:  # EDM draws the churn noise at every step once churn is on
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * randn_rows(generators, x_cur)
        denoised = D(x_hat, _full(x_hat, t_hat)).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if second_order and i < N - 1:
            denoised = D(x_next, _full(x_next, t_next)).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next


def heun(
    diffusion: Any, net: Callable, noise: Tensor, *, steps: int, generators: Sequence[torch.Generator],
    callback: Callback = None, sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
    S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
) -> Tensor:
    """EDM Alg. 2: Heun 2nd order, NFE 2N − 1 (18 steps → 35)."""
    churn = (S_churn, S_min, S_max, S_noise)
    return _edm_loop(diffusion, net, noise, steps, generators, True, callback, sigma_min, sigma_max, rho, *churn)


def euler(
    diffusion: Any, net: Callable, noise: Tensor, *, steps: int, generators: Sequence[torch.Generator],
    callback: Callback = None, sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
    S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
) -> Tensor:
    """EDM Alg. 2 without the correction (k-diffusion ``sample_euler``): NFE N."""
    churn = (S_churn, S_min, S_max, S_noise)
    return _edm_loop(diffusion, net, noise, steps, generators, False, callback, sigma_min, sigma_max, rho, *churn)


def dpmpp_2m(
    diffusion: Any, net: Callable, noise: Tensor, *, steps: int, generators: Sequence[torch.Generator],
    callback: Callback = None, sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; k-diffusion ``sample_dpmpp_2m``), λ = −ln σ; NFE N."""
    D = diffusion.denoiser(net)
    sigmas = _sigma_steps(diffusion, steps, sigma_min, sigma_max, rho)
    x = noise.to(torch.float64) * sigmas[0]  # (B, C, H, W), float64
    old_denoised = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = D(x, _full(x, s)).to(torch.float64)
        if s_next == 0:
            x = denoised  # σ_fn(∞) = 0, −expm1(−∞) = 1
        else:
            h = math.log(s) - math.log(s_next)  # λ_next − λ
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (math.log(sigmas[i - 1]) - math.log(s)) / h  # h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s_next / s) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
        if callback is not None:
            callback(i, x)
    return x


# ------------------------------------------------------------------------------------- DDPM samplers
def _spaced(diffusion: Any, steps: int, respacing: str | None) -> GaussianDiffusion:
    return diffusion.respace(respacing if respacing is not None else str(steps))


def ddpm(
    diffusion: Any, net: Callable, noise: Tensor, *, steps: int, generators: Sequence[torch.Generator],
    callback: Callback = None, respacing: str | None = None, clip_denoised: bool = False,
) -> Tensor:
    """ADM ``p_sample_loop`` over the respaced steps (SPEC §6b: 250 of 1000, learned Σ, no clipping)."""
    spaced = _spaced(diffusion, steps, respacing)
    x = noise.to(torch.float32)  # x_T, (B, C, H, W)
    for n, i in enumerate(reversed(range(spaced.num_timesteps))):
        t = _full(x, i, torch.int64)
        out = net(x, spaced.network_time(t), None)  # (B, 2C, H, W)
        z = randn_rows(generators, x) if i > 0 else None
        x = spaced.p_sample(out, x, t, z, clip_denoised)
        if callback is not None:
            callback(n, x)
    return x


def ddim(
    diffusion: Any, net: Callable, noise: Tensor, *, steps: int, generators: Sequence[torch.Generator],
    callback: Callback = None, eta: float = 0.0, respacing: str | None = None, clip_denoised: bool = False,
) -> Tensor:
    """ADM ``ddim_sample_loop`` (DDIM eq. 12) over the respaced steps; η = 0 is deterministic."""
    spaced = _spaced(diffusion, steps, respacing)
    x = noise.to(torch.float32)
    for n, i in enumerate(reversed(range(spaced.num_timesteps))):
        t = _full(x, i, torch.int64)
        out = net(x, spaced.network_time(t), None)
        z = randn_rows(generators, x) if (eta > 0 and i > 0) else None
        x = spaced.ddim_sample(out, x, t, z, eta, clip_denoised)
        if callback is not None:
            callback(n, x)
    return x


# ------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, NFE for N steps and the diffusions it can drive."""

    fn: Callable[..., Tensor]
    nfe: Callable[[int], int]
    diffusions: tuple[type, ...]


SAMPLERS: dict[str, SamplerSpec] = {
    "heun": SamplerSpec(heun, lambda n: 2 * n - 1, (EDM, GaussianDiffusion)),
    "euler": SamplerSpec(euler, lambda n: n, (EDM, GaussianDiffusion)),
    "dpmpp-2m": SamplerSpec(dpmpp_2m, lambda n: n, (EDM, GaussianDiffusion)),
    "ddpm": SamplerSpec(ddpm, lambda n: n, (GaussianDiffusion,)),
    "ddim": SamplerSpec(ddim, lambda n: n, (GaussianDiffusion,)),
}
_ALIASES = {"s_churn": "S_churn", "s_min": "S_min", "s_max": "S_max", "s_noise": "S_noise"}


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler ``name``; ValueError listing the valid names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations per sample (a guided step counts once: one forward of the doubled batch)."""
    return get_sampler(sampler).nfe(steps)


def _check_options(name: str, spec: SamplerSpec, options: dict[str, Any]) -> dict[str, Any]:
    options = {_ALIASES.get(k, k): v for k, v in options.items()}
    params = inspect.signature(spec.fn).parameters
    keyword_only = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    valid = [p for p in keyword_only if p not in ("steps", "generators")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"sampler {name!r} does not take {', '.join(unknown)}; its options: {', '.join(valid)}")
    return options


def sample(
    diffusion: Any,
    net: Callable,
    noise: Tensor,
    *,
    y: Tensor | None = None,
    sampler: str = "heun",
    steps: int = 18,
    guidance: Guidance | None = None,
    generators: Sequence[torch.Generator],
    autocast_dtype: torch.dtype | None = None,
    **sampler_options: Any,
) -> Tensor:
    """Draw x0 (float32, model space) from ``noise`` (B, C, H, W) with the named sampler (module doc)."""
    spec = get_sampler(sampler)
    if not isinstance(diffusion, spec.diffusions):
        names = [n for n, s in SAMPLERS.items() if isinstance(diffusion, s.diffusions)]
        raise ValueError(f"sampler {sampler!r} cannot drive {type(diffusion).__name__}; use one of: {', '.join(names)}")
    if len(generators) != noise.shape[0]:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {noise.shape[0]}")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    options = _check_options(sampler, spec, sampler_options)
    model = guided_network(autocast_network(net, autocast_dtype), y, guidance, diffusion)
    with torch.no_grad():
        x0 = spec.fn(diffusion, model, noise, steps=steps, generators=generators, **options)
    return x0.to(torch.float32)


__all__ = [
    "sample", "SAMPLERS", "SamplerSpec", "get_sampler", "nfe", "randn_rows",
    "heun", "euler", "dpmpp_2m", "ddpm", "ddim",
]
