"""The training recipe apart from the loop: keyed randomness, learning-rate ramp, EMA, batch split, what may change
on resume, activation checkpointing and the raw batch → model space step.

Randomness is keyed, not carried: at optimizer step *k* the global torch RNG of rank *r* is seeded from
(seed, k, r), and the diffusion noise of every sample is drawn for the *global* batch from a generator seeded from
(seed, k) and sliced per rank. So rerunning the same command resumes bit-exactly from the last checkpoint, and N
processes compute the same update as one process with the same global batch.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from diffit_cli.config import Preset, diff_presets, preset_from_yaml, preset_to_dict
from diffit_cli.data import sample_latent
from diffit_cli.errors import DiffitError

# Keys that may change when a run resumes: they schedule the run but do not change its maths.
RESUMABLE_KEYS = (
    "train.total_kimg",
    "train.report_kimg",
    "train.snapshot_kimg",
    "train.keep_checkpoints",
    "train.posthoc_ema_kimg",
    "train.batch_gpu",
    "train.compile",
    "train.grad_checkpointing",
    "data.num_workers",
    "description",
    "train.on_spike",
    "train.spike_",
    "train.max_skipped_steps",
    "sample.",
    "eval.",
    "model.attention_kernel",
)


def kimg_images(kimg: float) -> int:
    """The image count of `kimg` thousand images, rounded: int() would truncate 1.001 kimg (1000.9999…) to 1000."""
    return round(kimg * 1000)


class TrainError(DiffitError):
    """A training setup that cannot work (batch split, precision, changed preset on resume)."""


@dataclass
class TrainState:
    nimg: int = 0  # images seen (global)
    step: int = 0  # optimizer steps
    skipped: int = 0  # steps skipped for non-finite gradients
    skipped_in_a_row: int = 0  # consecutive skipped steps (train.max_skipped_steps stops the run)
    lr_scale: float = 1.0  # learning-rate multiplier, lowered by each spike rollback (train.spike_lr_factor)
    rollbacks: int = 0
    stopped: str | None = None  # why the run stopped early (train.on_spike=stop)
    preempted: str | None = None  # the signal that stopped the run after a checkpoint (SIGTERM, SIGUSR1, SIGINT)
    data_s: float = 0.0  # seconds spent waiting for the data loader since the last report
    best: dict | None = None  # FID along training: {"fid", "kimg", "extractor"} of the best snapshot (best.pt)
    history: list = field(default_factory=list)
    main_process: bool = True


def keyed_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style mixing, stable across platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def edm_ema_beta(cfg, nimg: int, batch: int) -> float:
    """EDM training loop: half-life in images with ramp-up, β = 0.5^(batch / half-life); else DiT's decay."""
    if cfg.ema_decay is not None:
        return cfg.ema_decay
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup_ratio is not None:
        halflife = min(halflife, nimg * cfg.ema_rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


def learning_rate(cfg, nimg: int) -> float:
    """EDM linear warm-up over `lr_rampup_kimg`, then constant."""
    if cfg.lr_rampup_kimg > 0:
        return cfg.lr * min(nimg / (cfg.lr_rampup_kimg * 1000), 1.0)
    return cfg.lr


def split_batch(batch: int, batch_gpu: int | None, world: int) -> tuple[int, int]:
    per_rank = batch // world
    if batch % world:
        raise TrainError(f"global batch {batch} is not divisible by {world} processes")
    batch_gpu = batch_gpu or per_rank
    if per_rank % batch_gpu:
        raise TrainError(f"per-process batch {per_rank} is not a multiple of --batch-gpu {batch_gpu}")
    return batch_gpu, per_rank // batch_gpu


def resume_check(saved_yaml: str, preset: Preset, force: bool, path: Path) -> list[str]:
    """The keys outside RESUMABLE_KEYS that differ from the checkpoint's preset: an error unless `force`."""
    saved = preset_to_dict(preset_from_yaml(saved_yaml, str(path)))
    changed = [k for k in diff_presets(saved, preset_to_dict(preset)) if not k.startswith(RESUMABLE_KEYS)]
    if changed and not force:
        raise TrainError(
            f"the run in {str(path.parent.parent)!r} was made with a different preset "
            f"(changed: {', '.join(changed)}); rerun with the same settings, pick a new --run-dir, "
            "or pass --force to resume anyway"
        )
    return changed


def enable_activation_checkpointing(net: torch.nn.Module) -> int:
    """Recompute each of the network's `checkpointable_blocks()` in the backward pass (memory for compute);
    returns the count."""
    blocks = net.checkpointable_blocks()
    for m in blocks:
        m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    return len(blocks)


class Ema:
    """EMA of the trained weights, kept on every rank so resume is symmetric (no host syncs)."""

    def __init__(self, net: torch.nn.Module):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, beta: float) -> None:
        ema_p = list(self.net.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in net.parameters()], 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


def step_unless(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`opt.step()` unless `found_inf` (0-dim float on the device, 1 = skip: EDM skips non-finite updates). A fused
    optimizer reads the flag in its kernel, without a host sync, and leaves parameters, moments and step count as
    they were; other optimizers read it on the host (one sync)."""
    inner = getattr(opt, "optimizer", opt)  # under Accelerate's AcceleratedOptimizer
    if inner.defaults.get("fused"):
        inner.found_inf = found_inf
        opt.step()
    elif not found_inf.item():
        opt.step()


def batch_to_x0(batch, preset: Preset, codec, device: torch.device):
    """Raw loader batch (uint8 images, or latent stats from shards) → (x0 in model space, labels or None)."""
    x, y = batch
    x = x.to(device, non_blocking=True)
    if codec is None:  # latent shards: z = (mean + std·ε)·scale, mirror with probability ½
        x = sample_latent(x, scale=preset.data.latent_scale, xflip=preset.data.xflip)
    else:
        x = codec.encode(x, None, xflip=preset.data.xflip) if preset.data.space == "latent" else codec.encode(x)
    y = y.to(device, non_blocking=True) if preset.model.num_classes > 0 else None
    return x, y
