"""Attention maps of a trained image-space network at several noise levels (Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffit_cli.ablation.study import CHANGE_FLOOR, StudyError
from diffit_cli.config import Preset
from diffit_cli.core.attention import TMSA
from diffit_cli.core.edm import EDM
from diffit_cli.data import normalize_pixels, open_source
from diffit_cli.plots import colormap
from diffit_cli.sampling.sinks import save_png


def attention_maps(net, diffusion, preset: Preset, sigmas: list[float], layer: int = 0, seed: int = 0) -> dict:
    """Fig. 2 maps from one attention layer of an EDM-family image network (module docstring of the study).

    Returns `fixed` and `trajectory` maps (T, H, W) — per window, the centre query's attention averaged over
    heads — the uint8 inputs, and `change`: the mean total-variation distance between the fixed-input attention
    distributions at consecutive noise levels."""

    if not isinstance(diffusion, EDM):
        raise StudyError("attention maps are drawn for image-space (EDM-family) networks")
    mods = [m for m in net.modules() if isinstance(m, TMSA)]
    if not mods:
        raise StudyError(f"{type(net).__name__} has no TMSA-style attention layer to draw")
    attn = mods[min(layer, len(mods) - 1)]
    hw: dict = {}
    hook = attn.register_forward_pre_hook(lambda mod, args: hw.update(hw=args[2] if len(args) > 2 else None))
    src = open_source(preset.data)
    x0 = normalize_pixels(src[seed][0][None])  # (1, C, H, W)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = sorted(float(s) for s in sigmas)
    ref = sigmas[(len(sigmas) - 1) // 2]

    def run(x: torch.Tensor, sigma_in: float, sigma_t: float) -> torch.Tensor:
        s_in, s_t = torch.tensor([sigma_in]), torch.tensor([sigma_t])
        with torch.no_grad():
            net(diffusion.c_in(s_in).view(-1, 1, 1, 1) * x, diffusion.c_noise(s_t))
        return attn.last_attn.float()  # (nW, heads, n, n[+1])

    def to_map(a: torch.Tensor) -> np.ndarray:
        w = attn.window_size
        H, W = hw.get("hw") or (x0.shape[-2], x0.shape[-1])
        centre = (w // 2) * w + w // 2
        m = a[:, :, centre, : w * w].mean(1)  # (nW, w²)
        m = m.view(H // w, W // w, w, w).permute(0, 2, 1, 3).reshape(H, W)
        return m.numpy()

    attn.store_attn = True
    try:
        fixed_x = x0 + ref * noise
        fixed = [run(fixed_x, ref, s) for s in sigmas]
        traj = [run(x0 + s * noise, s, s) for s in sigmas]
    finally:
        attn.store_attn, attn.last_attn = False, None
        hook.remove()
    tv = [0.5 * (a - b).abs().sum(-1).mean().item() for a, b in zip(fixed[:-1], fixed[1:])]

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        return ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()

    fixed_maps = np.stack([to_map(a) for a in fixed])
    return {
        "sigmas": np.asarray(sigmas, dtype=np.float32),
        "fixed": fixed_maps,
        "trajectory": np.stack([to_map(a) for a in traj]),
        "fixed_change": np.abs(fixed_maps - fixed_maps.mean(0, keepdims=True)),
        "fixed_input": to_uint8(fixed_x),
        "trajectory_inputs": np.stack([to_uint8(x0 + s * noise) for s in sigmas]),
        "change": float(np.mean(tv)),
        "layer": f"{mods.index(attn)} of {len(mods)} ({type(attn).__name__}, window {attn.window_size})",
    }


def save_map_pngs(folder: Path, maps: dict) -> None:
    """One colour-mapped PNG per noise level and protocol (one colour scale per protocol); `fixed-change`: the
    distance of each fixed-input map from their mean over t, scaled to its own maximum (all dark: no t effect)."""

    for proto in ("fixed", "trajectory", "fixed_change"):
        arr = maps[proto]
        for s, m in zip(maps["sigmas"], arr):
            name = proto.replace("_", "-")
            save_png(folder / f"{name}-sigma{float(s):g}.png", colormap(m, 0.0, max(float(arr.max()), CHANGE_FLOOR)))
