"""EDM2's post-hoc EMA during training (Karras et al. 2024, Sec. 3.1 and App. C): the power-function EMA profiles
of `train.posthoc_ema`, tracked beside the classic EMA on every process (like it, so resume is symmetric), part of
the checkpoint, and stored every `train.posthoc_ema_kimg` under `posthoc-ema/` for `diffit ema` to combine."""

from __future__ import annotations

from pathlib import Path

import torch

from diffit_cli.config import Preset
from diffit_cli.core.posthoc_ema import gamma_of_sigma_rel, power_beta
from diffit_cli.fileio import format_bytes
from diffit_cli.posthoc.store import snapshot_nbytes, write_snapshot
from diffit_cli.training.recipe import Ema, TrainError, kimg_images


class PowerEmaProfiles:
    """One `Ema` per σ_rel, each updated at optimizer step t with β_t = (1 − 1/t)^(γ+1): one fused `_foreach_lerp_`
    per profile, β a host float (no sync)."""

    def __init__(self, net: torch.nn.Module, sigma_rels: tuple[float, ...]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.emas = [Ema(net) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        for ema, gamma in zip(self.emas, self.gammas):
            ema.update(net, power_beta(step, gamma))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {repr(s): ema.net.state_dict() for s, ema in zip(self.sigma_rels, self.emas)}

    def load_state_dict(self, state: dict | None, source: Path) -> None:
        missing = [s for s in self.sigma_rels if repr(s) not in (state or {})]
        if missing:
            raise TrainError(
                f"{str(source)!r} holds no post-hoc EMA profile for σ_rel {', '.join(map(repr, missing))}: a profile "
                "averages from the first step, so it cannot be added to a run under way; drop it from "
                "train.posthoc_ema or start a new --run-dir"
            )
        for s, ema in zip(self.sigma_rels, self.emas):
            ema.net.load_state_dict(state[repr(s)])

    def store(self, run_dir: Path, step: int, nimg: int, preset_yaml: str) -> list[Path]:
        """Write every profile's snapshot at this step (main process)."""
        return [
            write_snapshot(run_dir, ema.net.state_dict(), s, g, step, nimg, preset_yaml)
            for s, g, ema in zip(self.sigma_rels, self.gammas, self.emas)
        ]


def make_profiles(preset: Preset, net: torch.nn.Module) -> PowerEmaProfiles | None:
    """The run's profiles (None when `train.posthoc_ema` is empty)."""
    return PowerEmaProfiles(net, preset.train.posthoc_ema) if preset.train.posthoc_ema else None


def storage_note(preset: Preset, net: torch.nn.Module) -> str | None:
    """What the snapshots will take on disk at the planned length (printed at the start of a run)."""
    tc = preset.train
    if not tc.posthoc_ema:
        return None
    count = -(-kimg_images(tc.total_kimg) // kimg_images(tc.posthoc_every_kimg))  # each crossing, and the end
    each = snapshot_nbytes(net.state_dict())
    total = count * len(tc.posthoc_ema) * each
    sigmas = ", ".join(f"{s:g}" for s in tc.posthoc_ema)
    return (
        f"post-hoc EMA: σ_rel {sigmas} stored every {tc.posthoc_every_kimg:g} kimg under posthoc-ema/: {count} × "
        f"{len(tc.posthoc_ema)} snapshots of {format_bytes(each)} = {format_bytes(total)} at {tc.total_kimg:g} kimg "
        "(never pruned; train.posthoc_ema_kimg sets the interval)"
    )


def store_due(preset: Preset, nimg: int, done: bool) -> bool:
    """A snapshot of the profiles is due when `posthoc_ema_kimg` is crossed by this step, and at the end."""
    tc = preset.train
    if not tc.posthoc_ema:
        return False
    every = kimg_images(tc.posthoc_every_kimg)
    return done or nimg // every > (nimg - tc.batch) // every
