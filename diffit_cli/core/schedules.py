"""Noise-level schedules shared by the samplers and the diffusions: EDM's σ steps, ADM's respacing, table lookup.

Pure functions of Python numbers or tables: the σ lists are Python floats, so sampling loops need no host syncs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """EDM eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i < N, then σ_N = 0.

    Computed on the host in float64 (Python floats), so the sampling loops need no device syncs.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if steps == 1:
        return [float(sigma_max), 0.0]
    inv_rho = 1.0 / rho
    lo, hi = sigma_min**inv_rho, sigma_max**inv_rho
    sigmas = [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)]
    return sigmas + [0.0]


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """ADM ``space_timesteps``: "250" (evenly strided, ends kept), "10,15,20" (per section) or "ddim50"."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * k) for k in range(count)]
        start += size
    return set(steps)


def interp(table: Tensor, t: Tensor) -> Tensor:
    """`table` (T,) read at fractional indices `t` (B,), linearly between neighbours (k-diffusion's log-σ lookup
    when `table` holds log σ)."""
    t = t.to(table.dtype)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return (1 - w) * table[low] + w * table[high]


__all__ = ["karras_sigmas", "space_timesteps", "interp"]
