"""Checkpoints: atomic writes, `latest` pointer, keep-last-K, safe loading, release import.

A training checkpoint is one `torch.save` file holding the raw and EMA weights, the optimizer, the
counters and the preset (as YAML text), so it is self-describing. It is read with
`weights_only=True` (no arbitrary pickles). `.safetensors` files are weights only: ours carry the
preset in their metadata; NVIDIA's released DiffiT files do not, so their architecture comes from
`--preset`, checked tensor by tensor. The layout: docs/architecture.md, 'Run folder and checkpoint format'.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from diffit_cli.build import build_network
from diffit_cli.config import Preset, preset_from_yaml
from diffit_cli.errors import DiffitError
from diffit_cli.fileio import atomic_write, format_bytes
from diffit_cli.sharing.folder import read_model_folder

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"
BEST = "best.pt"  # the snapshot with the lowest FID along training (never pruned while it is the best)


class CheckpointError(DiffitError):
    """A missing, corrupt or mismatching checkpoint."""


class NoPresetError(CheckpointError):
    """A weight file that carries no preset (NVIDIA's release `.safetensors`) read without one: the architecture
    must come from a preset the caller names."""


def checkpoint_name(nimg: int) -> str:
    return f"ckpt-{nimg / 1000:012.3f}.pt"  # ckpt-<kimg>.pt, sortable


def save_checkpoint(run_dir: Path | str, state: dict, nimg: int, keep: int, best: bool = False) -> Path:
    """Write `checkpoints/ckpt-<kimg>.pt` atomically, repoint `latest.pt` (and `best.pt` when `best`), keep the
    newest `keep` files and the one `best.pt` points at."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = atomic_write(folder / checkpoint_name(nimg), lambda f: torch.save(state, f), size=state_nbytes(state))
    for pointer in (LATEST, BEST) if best else (LATEST,):
        link_tmp = folder / f".{pointer}.tmp"
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(path.name)
        os.replace(link_tmp, folder / pointer)  # the pointer moves only once the file is complete
    kept = best_checkpoint(run_dir)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        if old.resolve() != kept:
            old.unlink()
    return path


TENSOR_RECORD_BYTES = 320  # torch.save's zip entry per tensor: headers, name, 64-byte alignment (measured ~250-350)


def state_nbytes(obj) -> int:
    """Size on disk of a (nested) checkpoint dict saved with `torch.save`: its tensors and their zip records."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() + TENSOR_RECORD_BYTES
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def check_free_space(run_dir: Path | str, nbytes: int, count: int = 2) -> None:
    """Refuse to start a run whose folder's disk cannot hold `count` checkpoints of `nbytes` (a checkpoint is
    written beside the previous one before that is pruned)."""
    folder = Path(run_dir).absolute()
    while not folder.exists():  # the run folder may not exist yet: its disk is that of its nearest ancestor
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < count * nbytes:
        raise CheckpointError(
            f"{run_dir}: {format_bytes(free)} free, but {count} checkpoints of "
            f"{format_bytes(nbytes)} need {format_bytes(count * nbytes)}; free space or choose "
            "another --run-dir"
        )


def list_checkpoints(run_dir: Path | str) -> list[tuple[int, Path]]:
    """(nimg, path) of every `checkpoints/ckpt-<kimg>.pt`, oldest first."""
    found = []
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob("ckpt-*.pt"):
        try:
            found.append((round(float(path.stem[len("ckpt-") :]) * 1000), path))
        except ValueError:
            continue
    return sorted(found)


def last_checkpoint_before(run_dir: Path | str, nimg: int) -> Path | None:
    """The newest checkpoint saved at or before `nimg` images (the last good one before a loss spike)."""
    before = [path for n, path in list_checkpoints(run_dir) if n <= nimg]
    return before[-1] if before else None


def set_aside_checkpoints_after(run_dir: Path | str, keep: Path) -> list[Path]:
    """Rename the checkpoints newer than `keep` to `*.pt.spiked` (kept for inspection, never resumed from)."""
    moved = []
    for _, path in list_checkpoints(run_dir):
        if path.name > keep.name:
            moved.append(path.rename(path.with_name(path.name + ".spiked")))
    return moved


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    link = Path(run_dir) / CHECKPOINT_DIR / LATEST
    return link.resolve() if link.exists() else None


def best_checkpoint(run_dir: Path | str) -> Path | None:
    """The checkpoint `best.pt` points at (lowest FID along training), None without one."""
    link = Path(run_dir) / CHECKPOINT_DIR / BEST
    return link.resolve() if link.exists() else None


def load_checkpoint(path: Path | str) -> dict:
    """Load a training checkpoint on the CPU with `weights_only=True`; corrupt files get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a diffit checkpoint ({type(e).__name__}); "
            "use an earlier checkpoints/ckpt-*.pt or retrain"
        ) from None
    if not isinstance(state, dict) or "preset" not in state or "ema" not in state:
        raise CheckpointError(f"{str(path)!r} is not a diffit training checkpoint (no preset/ema inside)")
    return state


def trained_weights(state: dict, path: Path | str) -> str:
    """The key of a checkpoint's trained weights; a post-hoc EMA reconstruction (`diffit ema`) holds none."""
    if "model" not in state:
        raise CheckpointError(
            f"{str(path)!r} holds only EMA weights (a post-hoc EMA reconstruction); --raw applies to training "
            "checkpoints"
        )
    return "model"


def strip_prefixes(state_dict: dict) -> dict:
    """Remove DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def file_sha256(path: Path | str, digits: int | None = None) -> str:
    """SHA-256 of the whole file in hex, shortened to its first `digits` hex digits when given."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:digits]


def check_state_dict(net: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Compare keys and shapes before loading; a mismatch names the offending keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:  # counts and the first two of each kind: one readable message
        parts = [
            f"{len(found)} {what} ({'; '.join(found[:2])}{' ...' if len(found) > 2 else ''})"
            for what, found in (
                ("tensors of another shape", shapes),
                ("missing keys", missing),
                ("unexpected keys", unexpected),
            )
            if found
        ]
        raise CheckpointError(
            f"{source} does not fit the preset's network: "
            + ", ".join(parts)
            + "; pass the --preset the weights were trained with"
        )


def _read_safetensors(path: Path) -> tuple[dict, dict]:

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def read_snapshot(path: Path | str, *, preset: Preset | None = None, ema: bool = True) -> tuple[dict, Preset]:
    """(weights, preset) from a `.pt` checkpoint, a `.safetensors` file or an exported model folder (`diffit
    export`), without building a network: callers check their settings against the preset before any model exists.
    A folder holds one set of weights (the EMA's unless exported with `--raw`), so `ema=False` is refused there."""
    path = Path(path)
    if path.is_dir():
        weights, folder_preset, config = read_model_folder(path, preset)
        if not ema:
            raise CheckpointError(
                f"{str(path)!r} is an exported model holding only its {config.get('weights', 'ema')} weights; "
                "--raw applies to training checkpoints (export the trained weights with diffit export --raw)"
            )
        return weights, folder_preset
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        weights, meta = _read_safetensors(path)
        if "preset" in meta:
            preset = preset if preset is not None else preset_from_yaml(meta["preset"], str(path))
        elif preset is None:
            raise NoPresetError(
                f"{str(path)!r} carries no preset (a released weight file?); pass --preset, e.g. --preset imagenet256"
            )
    else:
        state = load_checkpoint(path)
        preset = preset if preset is not None else preset_from_yaml(state["preset"], str(path))
        weights = state["ema" if ema else trained_weights(state, path)]
    return strip_prefixes(weights), preset


def snapshot_network(weights: dict, preset: Preset, source: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The preset's network with `weights` loaded (checked key by key), in eval mode without gradients."""

    net = build_network(preset.model)
    check_state_dict(net, weights, repr(source))
    net.load_state_dict(weights, strict=True)
    return net.eval().requires_grad_(False).to(device)


def load_snapshot(
    path: Path | str, *, preset: Preset | None = None, ema: bool = True, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Preset]:
    """(network in eval mode, preset) from a `.pt` checkpoint or a `.safetensors` file."""
    weights, preset = read_snapshot(path, preset=preset, ema=ema)
    return snapshot_network(weights, preset, str(path), device), preset
