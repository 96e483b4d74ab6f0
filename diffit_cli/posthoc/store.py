"""The stored snapshots of post-hoc EMA profiles: `RUN_DIR/posthoc-ema/pema-<σ_rel>-<kimg>.safetensors`.

Each file holds one profile's averaged network (its full state dict, floating tensors as float32) at one optimizer
step, and in its safetensors metadata the profile (σ_rel, γ), the step and image count, and the run's preset, so that
a snapshot is itself a weights file that `diffit sample --ckpt` reads. Training writes them atomically and never
prunes them; a snapshot written again at the same image count (a resumed or rolled-back run) replaces the old one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from diffit_cli.errors import DiffitError
from diffit_cli.fileio import atomic_write_bytes

SNAPSHOT_DIR = "posthoc-ema"
FORMAT = "diffit-posthoc-ema-1"
_NAME = re.compile(r"pema-(?P<sigma>[0-9.]+)-(?P<kimg>[0-9.]+)\.safetensors")


@dataclass(frozen=True)
class StoredProfile:
    """One snapshot file: the profile (σ_rel, γ) averaged over optimizer steps 1 … `step`."""

    path: Path
    sigma_rel: float
    gamma: float
    step: int
    nimg: int


def snapshot_name(sigma_rel: float, nimg: int) -> str:
    return f"pema-{sigma_rel:.4f}-{nimg / 1000:012.3f}.safetensors"  # sortable by profile, then time


def snapshot_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes one stored profile takes (floating tensors as float32, the others in their dtype, as `write_snapshot`
    stores them; the header is negligible)."""
    return sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in state.values())


def write_snapshot(
    run_dir: Path | str,
    state: dict[str, torch.Tensor],
    sigma_rel: float,
    gamma: float,
    step: int,
    nimg: int,
    preset: str,
) -> Path:
    """Store one profile's state dict (floating tensors as float32, on the CPU) with its metadata, atomically.
    Integer buffers (attention's relative position index) keep their dtype: a reconstruction copies them, and
    one read back as float could be truncated when loaded into an integer buffer."""
    tensors = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in state.items()
    }
    meta = {
        "format": FORMAT,
        "sigma_rel": repr(float(sigma_rel)),
        "gamma": repr(float(gamma)),
        "step": str(int(step)),
        "nimg": str(int(nimg)),
        "preset": preset,
    }
    return atomic_write_bytes(Path(run_dir) / SNAPSHOT_DIR / snapshot_name(sigma_rel, nimg), save(tensors, meta))


def read_profile(path: Path | str) -> StoredProfile:
    """The metadata of one snapshot file (no tensors read)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DiffitError(f"{str(path)!r} cannot be read as a post-hoc EMA snapshot ({e}); move it aside") from e
    if meta.get("format") != FORMAT:
        raise DiffitError(f"{str(path)!r} is not a post-hoc EMA snapshot (no '{FORMAT}' metadata); move it aside")
    return StoredProfile(path, float(meta["sigma_rel"]), float(meta["gamma"]), int(meta["step"]), int(meta["nimg"]))


def list_profiles(run_dir: Path | str) -> list[StoredProfile]:
    """Every snapshot under `run_dir/posthoc-ema/`, oldest first (then by σ_rel)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = [read_profile(p) for p in sorted(folder.glob("pema-*.safetensors")) if _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda s: (s.nimg, s.sigma_rel))


def snapshot_preset(path: Path | str) -> str:
    """The preset YAML a snapshot carries."""
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {})["preset"]


def load_profile_state(path: Path | str) -> dict[str, torch.Tensor]:
    """A snapshot's tensors (CPU, float32)."""
    return load_file(str(path))


def set_aside_profiles_after(run_dir: Path | str, nimg: int, suffix: str = ".spiked") -> list[Path]:
    """Rename the snapshots stored after `nimg` images to `*<suffix>` (`.spiked` after a rollback), so that no
    reconstruction uses them."""
    found = [s for s in list_profiles(run_dir) if s.nimg > nimg]
    return [s.path.rename(s.path.with_name(s.path.name + suffix)) for s in found]
