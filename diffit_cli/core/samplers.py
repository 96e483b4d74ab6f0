"""Samplers: one registry and one entry point for the EDM (σ-space) and the ADM (DDPM) diffusions.

Entry point (the pipeline calls this for every model and sampler)::

    sample(diffusion, net, noise, *, y=None, sampler="heun", steps=18, guidance=None, guide=None, generators,
           autocast_dtype=None, sigmas=None, **sampler_options) -> x0  (float32, model space)

* ``noise`` is the initial N(0, I) tensor (B, C, H, W) the caller drew from ``generators`` (one
  ``torch.Generator`` per row). Every later random draw (EDM churn, DDPM/DDIM ancestral noise) is made row by
  row from that row's generator with the row's shape, so sample i depends only on generator i: the batch size
  never changes a sample's random stream. (Bit-identical outputs across batch sizes additionally need a
  batch-invariant network; vendor matmul kernels usually are not.)
* What a diffusion must provide is written down in `core.diffusion` as two protocols: `SigmaDiffusion` (a
  denoiser D(x; σ) and a σ range; EDM, its VP/VE variants, and DDPM through k-diffusion's ε→D adapter) and
  `AncestralDiffusion` (DDPM: respacing and the ancestral steps).
* σ-space solvers have k-diffusion's signature ``fn(denoise, x, sigmas, *, noise, callback, **options)``:
  ``x`` is already scaled by ``sigmas[0]``, ``sigmas`` is any decreasing list ending in 0, ``noise(like)`` draws
  fresh N(0, I) rows. ``sample`` builds the Karras list (EDM eq. 5) unless the caller passes ``sigmas``.
* The DDPM family runs one loop, :func:`ancestral`, over a respaced diffusion with a step
  ``x_{t−1} = step(x_t, t, z)`` that ``ddpm`` (ADM ``p_sample``) or ``ddim`` (eq. 12, η) builds.

  ===========  =========================================  ============  ==========================
  name         method                                     NFE (steps N)  diffusions
  ===========  =========================================  ============  ==========================
  heun         EDM Alg. 2 (2nd order, optional churn)     2N − 1        σ-space (DDPM via adapter)
  euler        EDM Alg. 2 without the 2nd-order step      N             σ-space (DDPM via adapter)
  dpmpp-2m     DPM-Solver++(2M) (k-diffusion)             N             σ-space (DDPM via adapter)
  ddpm         ADM ancestral, respaced to N, learned Σ    N             DDPM
  ddim         DDIM (η), respaced to N                    N             DDPM
  ===========  =========================================  ============  ==========================

  σ-space samplers accumulate in float64 as EDM's ``edm_sampler``. Options: ``sigma_min, sigma_max, rho`` (the
  Karras list; for DDPM clamped to the table's range), ``S_churn, S_min, S_max, S_noise`` (heun, euler;
  lower-case aliases accepted), ``eta`` (ddim), ``respacing`` (an ADM section string such as "250" or "ddim50",
  overriding ``steps``) and ``clip_denoised`` (ddpm, ddim).
* No host-device syncs inside the loops: σ steps and all step coefficients are Python floats.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffit_cli.core.diffusion import AncestralDiffusion, Denoiser, SigmaDiffusion
from diffit_cli.core.edm import autocast_network
from diffit_cli.core.guidance import Guidance, guided_network
from diffit_cli.core.schedules import karras_sigmas

Tensor = torch.Tensor
Callback = Callable[[int, Tensor], None] | None
NoiseFn = Callable[[Tensor], Tensor]  # like -> N(0, I) of its shape, row i from generator i


# ------------------------------------------------------------------------------------- randomness
def randn_rows(generators: Sequence[torch.Generator], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """N(0, I) like ``like`` (B, …), row i drawn from ``generators[i]`` (EDM ``StackedRandomGenerator``)."""
    dtype = like.dtype if dtype is None else dtype
    rows = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(like.device)  # (B, …)


def _full(x: Tensor, value: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """A (B,) tensor of one host value (no sync)."""
    return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)


def karras_steps(
    diffusion: SigmaDiffusion,
    steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
) -> list[float]:
    """EDM eq. 5 steps over the diffusion's σ range (a requested range is clamped to a DDPM table's, as EDM
    clamps to the network's), then 0."""
    lo = diffusion.sigma_min if sigma_min is None else sigma_min
    hi = diffusion.sigma_max if sigma_max is None else sigma_max
    if isinstance(diffusion, AncestralDiffusion):
        lo, hi = max(lo, diffusion.sigma_min), min(hi, diffusion.sigma_max)
    return karras_sigmas(steps, lo, hi, getattr(diffusion, "rho", 7.0) if rho is None else rho)


# ------------------------------------------------------------------------------------- σ-space solvers
def _edm_loop(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    noise: NoiseFn,
    callback: Callback,
    second_order: bool,
    S_churn: float,
    S_min: float,
    S_max: float,
    S_noise: float,
) -> Tensor:
    """EDM Alg. 2 (``edm_sampler``): Euler step plus Heun's 2nd-order correction, optional churn."""
    N = len(sigmas) - 1
    x_next = x.to(torch.float64)  # (B, C, H, W), float64
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x_cur = x_next
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if S_churn > 0:  # EDM draws the churn noise at every step once churn is on
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * noise(x_cur)
        denoised = denoise(x_hat, _full(x_hat, t_hat)).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if second_order and t_next > 0:
            denoised = denoise(x_next, _full(x_next, t_next)).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next


def heun(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    noise: NoiseFn,
    callback: Callback = None,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
) -> Tensor:
    """EDM Alg. 2: Heun 2nd order, NFE 2N − 1 (18 steps → 35)."""
    return _edm_loop(denoise, x, sigmas, noise, callback, True, S_churn, S_min, S_max, S_noise)


def euler(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    *,
    noise: NoiseFn,
    callback: Callback = None,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
) -> Tensor:
    """EDM Alg. 2 without the correction (k-diffusion ``sample_euler``): NFE N."""
    return _edm_loop(denoise, x, sigmas, noise, callback, False, S_churn, S_min, S_max, S_noise)


def dpmpp_2m(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], *, noise: NoiseFn, callback: Callback = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; k-diffusion ``sample_dpmpp_2m``), λ = −ln σ; NFE N."""
    x = x.to(torch.float64)  # (B, C, H, W)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, _full(x, s)).to(torch.float64)
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


# ------------------------------------------------------------------------------------- DDPM family
Step = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # x_t, t (B,), z or None -> x_{t−1}


def ancestral(step: Step, x: Tensor, num_timesteps: int, *, noise: NoiseFn | None, callback: Callback = None) -> Tensor:
    """x_T → x_0 over a (respaced) chain: x_{t−1} = step(x_t, t, z), z fresh noise except at t = 0 (or None)."""
    x = x.to(torch.float32)  # x_T, (B, C, H, W)
    for n, i in enumerate(reversed(range(num_timesteps))):
        z = noise(x) if (noise is not None and i > 0) else None
        x = step(x, _full(x, i, torch.int64), z)
        if callback is not None:
            callback(n, x)
    return x


def ddpm(spaced: AncestralDiffusion, net: Callable, *, clip_denoised: bool = False) -> tuple[Step, bool]:
    """ADM ``p_sample`` over the respaced steps (DiffiT App. I.2: 250 of 1000, learned Σ, no clipping); stochastic."""
    return (lambda x, t, z: spaced.p_sample(net(x, spaced.network_time(t), None), x, t, z, clip_denoised)), True


def ddim(
    spaced: AncestralDiffusion, net: Callable, *, eta: float = 0.0, clip_denoised: bool = False
) -> tuple[Step, bool]:
    """ADM ``ddim_sample`` (DDIM eq. 12) over the respaced steps; η = 0 is deterministic."""

    def step(x, t, z):
        return spaced.ddim_sample(net(x, spaced.network_time(t), None), x, t, z, eta, clip_denoised)

    return step, eta > 0


# ------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, NFE for N steps, and whether it is a σ-space solver (else DDPM)."""

    fn: Callable[..., Any]
    nfe: Callable[[int], int]
    sigma_space: bool

    def accepts(self, diffusion: Any) -> bool:
        return isinstance(diffusion, SigmaDiffusion if self.sigma_space else AncestralDiffusion)


SAMPLERS: dict[str, SamplerSpec] = {
    "heun": SamplerSpec(heun, lambda n: 2 * n - 1, True),
    "euler": SamplerSpec(euler, lambda n: n, True),
    "dpmpp-2m": SamplerSpec(dpmpp_2m, lambda n: n, True),
    "ddpm": SamplerSpec(ddpm, lambda n: n, False),
    "ddim": SamplerSpec(ddim, lambda n: n, False),
}
_ALIASES = {"s_churn": "S_churn", "s_min": "S_min", "s_max": "S_max", "s_noise": "S_noise"}
_SIGMA_OPTIONS = ("sigma_min", "sigma_max", "rho")  # the Karras list, built by `sample`
_ANCESTRAL_OPTIONS = ("respacing",)  # the respaced chain, built by `sample`


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
    own = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in ("noise", "callback")]
    valid = own + list(_SIGMA_OPTIONS if spec.sigma_space else _ANCESTRAL_OPTIONS)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"sampler {name!r} does not take {', '.join(unknown)}; its options: {', '.join(valid)}")
    return options


def sample(
    diffusion: SigmaDiffusion,
    net: Callable,
    noise: Tensor,
    *,
    y: Tensor | None = None,
    sampler: str = "heun",
    steps: int = 18,
    guidance: Guidance | None = None,
    guide: Callable | None = None,
    generators: Sequence[torch.Generator],
    autocast_dtype: torch.dtype | None = None,
    sigmas: Sequence[float] | None = None,
    callback: Callback = None,
    **sampler_options: Any,
) -> Tensor:
    """Draw x0 (float32, model space) from ``noise`` (B, C, H, W) with the named sampler (module doc); σ-space
    samplers run over ``sigmas`` when given (any decreasing list ending in 0), else over the Karras list.
    ``guide``: the guiding network of autoguidance (``guidance.mode == "auto"``), run under the same autocast."""
    spec = get_sampler(sampler)
    if not spec.accepts(diffusion):
        names = [n for n, s in SAMPLERS.items() if s.accepts(diffusion)]
        raise ValueError(f"sampler {sampler!r} cannot drive {type(diffusion).__name__}; use one of: {', '.join(names)}")
    if len(generators) != noise.shape[0]:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {noise.shape[0]}")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    options = _check_options(sampler, spec, sampler_options)
    guide = None if guide is None else autocast_network(guide, autocast_dtype)
    model = guided_network(autocast_network(net, autocast_dtype), y, guidance, diffusion, guide)
    fresh = lambda like: randn_rows(generators, like)  # noqa: E731
    with torch.no_grad():
        if spec.sigma_space:
            karras = {k: options.pop(k) for k in _SIGMA_OPTIONS if k in options}
            if sigmas is None:
                sigmas = karras_steps(diffusion, steps, **karras)
            elif list(sigmas) != sorted(sigmas, reverse=True) or sigmas[-1] != 0 or len(sigmas) < 2:
                raise ValueError("sigmas must be a decreasing list ending in 0, e.g. [80.0, ..., 0.002, 0.0]")
            sigmas = [float(s) for s in sigmas]
            x0 = spec.fn(
                diffusion.denoiser(model),
                noise.to(torch.float64) * sigmas[0],
                sigmas,
                noise=fresh,
                callback=callback,
                **options,
            )
        else:
            respacing = options.pop("respacing", None)
            spaced = diffusion.respace(respacing if respacing is not None else str(steps))
            step, stochastic = spec.fn(spaced, model, **options)
            x0 = ancestral(step, noise, spaced.num_timesteps, noise=fresh if stochastic else None, callback=callback)
    return x0.to(torch.float32)


__all__ = [
    "sample",
    "SAMPLERS",
    "SamplerSpec",
    "SigmaDiffusion",
    "AncestralDiffusion",
    "get_sampler",
    "nfe",
    "randn_rows",
    "karras_steps",
    "heun",
    "euler",
    "dpmpp_2m",
    "ancestral",
    "ddpm",
    "ddim",
]
