"""EDM2's power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Sec. 3.1 and App. C.2-C.3).

A power-function EMA of the weights θ_τ (τ = 1 … t optimizer steps) with exponent γ,

    θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t,   β_t = (1 − 1/t)^(γ+1),

averages with the weights w_τ = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1): the integral of the profile
p_t(τ) = (γ+1) τ^γ / t^(γ+1) over step τ (telescope the product of the β's). Its width relative to its
length t is σ_rel = √((γ+1) / ((γ+2)² (γ+3))) (EDM2 eq. 3), largest (≈ 0.3003) at γ = (√5 − 3)/2.

Reconstruction: snapshots θ̂_i of profiles (t_i, γ_i) are stored during training; the average for a target
profile p_r is approximated by Σ x_i θ̂_i, with x minimising ∫ (p_r − Σ x_i p_i)² dτ subject to Σ x_i = 1: every
profile integrates to 1, so the combination is itself an average and weights that never moved come back unchanged
(the unconstrained minimum sums to 1 only where the fit is exact; a sum of 1.03 would scale every weight by 3%).
With a Lagrange multiplier λ the stationarity conditions are the bordered system [A 1; 1ᵀ 0] [x; λ] = [b; 1],
A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_r⟩, with the closed-form inner product

    ⟨p_a, p_b⟩ = (γ_a+1)(γ_b+1) / (γ_a+γ_b+1) · (m/t_a)^(γ_a+1) (m/t_b)^(γ_b+1) / m,   m = min(t_a, t_b),

written with ratios ≤ 1 so that long runs (t ~ 10⁶, γ ~ 10²) do not overflow. The residual of the fit,
√((⟨p_r, p_r⟩ − 2 x·b + xᵀA x) / ⟨p_r, p_r⟩), says how well the stored profiles span the target (0 = exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SIGMA_REL_MAX = math.sqrt((math.sqrt(5) - 1) / 2 / ((math.sqrt(5) + 1) / 2) ** 2 / ((math.sqrt(5) + 3) / 2))
GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2  # γ where σ_rel(γ) peaks; σ_rel falls monotonically for γ above it


def sigma_rel_of_gamma(gamma: float) -> float:
    """EDM2 eq. 3: the relative standard deviation of the power-function profile with exponent γ."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ > (√5 − 3)/2 with σ_rel(γ) = `sigma_rel` (EDM2 eq. 3 inverted; bisection on its monotone
    branch, to float precision)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    lo, hi = GAMMA_AT_MAX, 1.0
    while sigma_rel_of_gamma(hi) > sigma_rel:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigma_rel_of_gamma(mid) > sigma_rel else (lo, mid)
        if hi - lo <= 1e-15 * hi:
            break
    return (lo + hi) / 2


def power_beta(step: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1) for optimizer step t ≥ 1 (0 at t = 1: the first average is the first weights)."""
    return (1.0 - 1.0 / step) ** (gamma + 1)


def power_weights(t: int, gamma: float) -> torch.Tensor:
    """The closed form of the EMA after t steps: weight of θ_τ, τ = 1 … t, (t,) float64, summing to 1."""
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    return (tau / t) ** (gamma + 1) - ((tau - 1) / t) ** (gamma + 1)  # ratios ≤ 1: no overflow for large γ


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """⟨p_a, p_b⟩ = ∫₀^∞ p_a(τ) p_b(τ) dτ of two power-function profiles (module docstring)."""
    m = min(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m


def solve_profiles(
    stored: Sequence[tuple[float, float]], targets: Sequence[tuple[float, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares coefficients of the `targets` profiles (t, γ) in the `stored` ones, summing to 1 (module
    docstring): x (n_stored, n_targets) float64 with θ_r = Σ_i x_ir θ̂_i, and each target's relative residual
    (n_targets,)."""
    n = len(stored)
    A = torch.tensor([[profile_inner(*a, *b) for b in stored] for a in stored], dtype=torch.float64)
    B = torch.tensor([[profile_inner(*a, *r) for r in targets] for a in stored], dtype=torch.float64)
    scale = A.diagonal().mean()  # ⟨p, p⟩ ~ γ/t: brought to ~1 beside the constraint's row of ones (gelsd's rcond)
    K = torch.ones(n + 1, n + 1, dtype=torch.float64)
    K[:n, :n], K[n, n] = A / scale, 0.0
    rhs = torch.cat([B / scale, torch.ones(1, len(targets), dtype=torch.float64)])
    x = torch.linalg.lstsq(K, rhs, driver="gelsd").solution[:n]  # (n_stored, n_targets); gelsd: rank-deficient is fine
    norm = torch.tensor([profile_inner(*r, *r) for r in targets], dtype=torch.float64)
    left = (norm - 2 * (x * B).sum(0) + (x * (A @ x)).sum(0)).clamp(min=0)
    return x, (left / norm).sqrt()


__all__ = [
    "SIGMA_REL_MAX",
    "gamma_of_sigma_rel",
    "power_beta",
    "power_weights",
    "profile_inner",
    "sigma_rel_of_gamma",
    "solve_profiles",
]
