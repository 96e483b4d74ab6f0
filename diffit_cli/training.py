"""The training loop (DESIGN §5): Accelerate placement, kimg counters, EMA, warm-up, clipping, resume.

One loop trains every preset: pixel and latent data differ only in how a raw batch becomes model
space (`_to_model_space`). Randomness is keyed, not carried: at optimizer step *k* the global torch
RNG of rank *r* is seeded from (seed, k, r), and the diffusion noise of every sample is drawn for the
*global* batch from a generator seeded from (seed, k) and sliced per rank. So rerunning the same
command resumes bit-exactly from the last checkpoint, and N processes compute the same update as one
process with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from diffit_cli.build import build_diffusion, build_network, build_optimizer, count_parameters
from diffit_cli.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffit_cli.config import Preset, diff_presets, dump_preset, preset_from_yaml, preset_to_dict
from diffit_cli.errors import DiffitError
from diffit_cli.fileio import atomic_write_bytes

# Keys that may change when a run resumes: they schedule the run but do not change its maths.
RESUMABLE_KEYS = ("train.total_kimg", "train.report_kimg", "train.snapshot_kimg", "train.keep_checkpoints",
                  "train.batch_gpu", "train.compile", "train.grad_checkpointing", "data.num_workers", "description",
                  "sample.", "eval.")
GRID_SEEDS = 64


class TrainError(DiffitError):
    """A training setup that cannot work (batch split, precision, changed preset on resume)."""


@dataclass
class TrainState:
    nimg: int = 0  # images seen (global)
    step: int = 0  # optimizer steps
    skipped: int = 0  # steps skipped for non-finite gradients
    history: list = field(default_factory=list)
    main_process: bool = True


def _seed(*parts: int) -> int:
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


def _split_batch(batch: int, batch_gpu: int | None, world: int) -> tuple[int, int]:
    per_rank = batch // world
    if batch % world:
        raise TrainError(f"global batch {batch} is not divisible by {world} processes")
    batch_gpu = batch_gpu or per_rank
    if per_rank % batch_gpu:
        raise TrainError(f"per-process batch {per_rank} is not a multiple of --batch-gpu {batch_gpu}")
    return batch_gpu, per_rank // batch_gpu


def _resume_check(saved_yaml: str, preset: Preset, force: bool, path: Path) -> None:
    saved = preset_to_dict(preset_from_yaml(saved_yaml, str(path)))
    changed = [k for k in diff_presets(saved, preset_to_dict(preset)) if not k.startswith(RESUMABLE_KEYS)]
    if changed and not force:
        raise TrainError(f"the run in {str(path.parent.parent)!r} was made with a different preset "
                         f"(changed: {', '.join(changed)}); rerun with the same settings, pick a new --run-dir, "
                         "or pass --force to resume anyway")


def enable_activation_checkpointing(net: torch.nn.Module) -> int:
    """Recompute each outermost DiffiT block / ResBlock in the backward pass (memory for compute); returns the count."""
    from torch.utils.checkpoint import checkpoint

    from diffit_cli.core.layers import DiffiTBlock
    from diffit_cli.core.unet import ResBlock

    inner = {id(c) for m in net.modules() if isinstance(m, ResBlock) for c in m.modules() if c is not m}
    blocks = [m for m in net.modules() if isinstance(m, (DiffiTBlock, ResBlock)) and id(m) not in inner]
    for m in blocks:
        m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    return len(blocks)


class _Ema:
    """EMA of the trained weights, kept on every rank so resume is symmetric (no host syncs)."""

    def __init__(self, net: torch.nn.Module):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, beta: float) -> None:
        ema_p = list(self.net.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in net.parameters()], 1.0 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


def _to_model_space(batch, preset: Preset, codec, device: torch.device):
    """Raw loader batch (uint8 images, or latent stats from shards) → (x0 in model space, labels or None)."""
    from diffit_cli.data import sample_latent

    x, y = batch
    x = x.to(device, non_blocking=True)
    if codec is None:  # latent shards: z = (mean + std·ε)·scale, mirror with probability ½
        x = sample_latent(x, scale=preset.data.latent_scale, xflip=preset.data.xflip)
    else:
        x = codec.encode(x, None, xflip=preset.data.xflip) if preset.data.space == "latent" else codec.encode(x)
    y = y.to(device, non_blocking=True) if preset.model.num_classes > 0 else None
    return x, y


def train(preset: Preset, run_dir: Path | str, *, batch_gpu: int | None = None, force: bool = False,
          skip_bad_images: bool = False, tensorboard: bool = False,
          progress: Callable[[dict], None] | None = None) -> TrainState:
    """Train `preset` in `run_dir`, resuming from `checkpoints/latest.pt` when it exists."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from diffit_cli.augment import AugmentPipe
    from diffit_cli.codecs import make_codec
    from diffit_cli.data import make_loader, open_source
    from diffit_cli.generate import SamplingOptions, generate, image_grid, save_png

    run_dir = Path(run_dir)
    tc = preset.train
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainError("--tensorboard needs the tensorboard package: pip install 'diffit-cli[tensorboard]'") \
                from None
    mp = tc.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise TrainError("fp16 mixed precision does not run on the CPU (Accelerate silently stays fp32); "
                         "use --set train.mixed_precision=bf16 (or fp32)")
    # Accelerate keeps its settings in a process-wide singleton: a second train() in one process (ablate, a
    # notebook) with another precision starts from a fresh one (the process group, if any, is kept)
    AcceleratorState._reset_state()
    # cpu=True on GPU-less machines lets torchrun / `accelerate launch` run several gloo processes
    accelerator = Accelerator(mixed_precision="no" if mp == "fp32" else mp, cpu=not torch.cuda.is_available())
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    batch_gpu, accum = _split_batch(tc.batch, batch_gpu or tc.batch_gpu, world)
    emit = progress if (progress is not None and accelerator.is_main_process) else (lambda e: None)

    dataset = open_source(preset.data, skip_bad_images=skip_bad_images)
    if dataset.kind == "latent" and preset.data.space != "latent":
        raise TrainError(f"{preset.data.path!r} holds VAE latents but preset {preset.name!r} trains in pixel space; "
                         "use a latent preset such as imagenet256")
    if dataset.kind == "latent" and dataset.num_channels != preset.model.in_channels:
        raise TrainError(f"the latents in {preset.data.path!r} have {dataset.num_channels} channels but the "
                         f"network expects {preset.model.in_channels}; re-encode them or fix the preset")
    # shards hold posterior stats already: no VAE needed to train on them
    codec = None if dataset.kind == "latent" else make_codec(preset.data, device)
    diffusion = build_diffusion(preset.diffusion, preset.model)
    torch.manual_seed(tc.seed)
    net = build_network(preset.model, device)
    ema = _Ema(net)  # before activation checkpointing patches the blocks' forward
    if tc.grad_checkpointing:
        enable_activation_checkpointing(net)
    opt = build_optimizer(net.parameters(), tc)
    state = TrainState()

    ckpt_path = latest_checkpoint(run_dir)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        _resume_check(ckpt["preset"], preset, force, ckpt_path)
        net.load_state_dict(ckpt["model"])
        ema.net.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        state = TrainState(nimg=ckpt["nimg"], step=ckpt["step"], skipped=ckpt["skipped"])
        del ckpt
    elif accelerator.is_main_process:
        atomic_write_bytes(run_dir / "preset.yaml", dump_preset(preset).encode())

    model = torch.compile(net) if tc.compile else net
    model, opt = accelerator.prepare(model, opt)
    augment = AugmentPipe(p=tc.augment_p) if tc.augment_p > 0 else None
    aug_dim = getattr(preset.model, "augment_dim", 0)
    loader = make_loader(dataset, batch_gpu * world, seed=tc.seed, rank=rank, world_size=world,
                         num_workers=preset.data.num_workers, pin_memory=device.type == "cuda",
                         start_index=state.nimg)
    batches = iter(loader)
    noise_gen = torch.Generator(device)
    total_nimg = int(tc.total_kimg * 1000)
    log_path = run_dir / "log.jsonl"
    writer = SummaryWriter(run_dir / "tensorboard") if tensorboard and accelerator.is_main_process else None

    def snapshot() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(run_dir, {
                "model": net.state_dict(), "ema": ema.net.state_dict(), "optimizer": opt.state_dict(),
                "nimg": state.nimg, "step": state.step, "skipped": state.skipped,
                "preset": dump_preset(preset),
            }, state.nimg, tc.keep_checkpoints)
            if codec is not None:  # trained from shards there is no VAE loaded: `diffit sample` decodes those
                opts = SamplingOptions.from_preset(preset, precision="bf16" if mp == "bf16" else "fp32")
                k = preset.model.num_classes
                classes = list(range(min(k, 8))) if k else None  # class-conditional: one class per column
                images = [imgs for _, _, imgs in generate(ema.net, diffusion, preset, list(range(GRID_SEEDS)),
                                                          codec.decode, opts=opts, batch=GRID_SEEDS, device=device,
                                                          classes=classes)]
                grid = image_grid(images[0], ncol=len(classes) if classes else None)
                path = save_png(run_dir / "samples" / f"grid-{state.nimg / 1000:012.3f}.png", grid)
                save_png(run_dir / "samples" / "grid-latest.png", grid)
                emit({"event": "snapshot", "kimg": state.nimg / 1000, "grid": str(path)})
        accelerator.wait_for_everyone()

    emit({"event": "start", "kimg": state.nimg / 1000, "total_kimg": tc.total_kimg, "world": world,
          "batch_gpu": batch_gpu, "accum": accum, "device": str(device), "resumed": ckpt_path is not None,
          "params": count_parameters(net)})
    report_every, snap_every = int(tc.report_kimg * 1000), int(tc.snapshot_kimg * 1000)
    loss_sum, loss_n = torch.zeros((), device=device), 0
    t_report, n_report, data_s = time.perf_counter(), state.nimg, 0.0
    model.train()
    while state.nimg < total_nimg:
        torch.manual_seed(_seed(tc.seed, state.step, rank))  # dropout, label dropout, augmentation
        noise_gen.manual_seed(_seed(tc.seed, state.step, 1 << 20))
        draws = None  # diffusion noise (σ or t, and n) for the whole global batch of this step
        for g in opt.param_groups:
            g["lr"] = learning_rate(tc, state.nimg)
        for a in range(accum):
            t_wait = time.perf_counter()
            raw_batch = next(batches)
            data_s += time.perf_counter() - t_wait
            x0, y = _to_model_space(raw_batch, preset, codec, device)
            aug = None
            if augment is not None:
                x0, aug = augment(x0)
            elif aug_dim:  # zero labels = "not augmented" (bias-free map): keeps every parameter in the DDP graph
                aug = x0.new_zeros(x0.shape[0], aug_dim)
            if draws is None:
                draws = diffusion.training_noise(tc.batch, tuple(x0.shape[1:]), noise_gen)
            lo = (a * world + rank) * batch_gpu  # global index of this rank's first sample in this round
            loss_kwargs = {k: v[lo:lo + batch_gpu] for k, v in draws.items()}
            sync = a == accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = diffusion.loss(model, x0, y, **({"augment_labels": aug} if aug is not None else {}),
                                      **loss_kwargs)
                accelerator.backward(loss.mean() / accum)
            loss_sum += loss.detach().mean()
            loss_n += 1
        if tc.grad_clip is not None:  # (unscales fp16 gradients first)
            accelerator.clip_grad_norm_(net.parameters(), tc.grad_clip)
        if accelerator.scaler is not None:  # fp16: the grad scaler skips non-finite steps and lowers its scale
            opt.step()
            state.skipped += int(accelerator.optimizer_step_was_skipped)
        elif bool(torch.stack([torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None]).all()):
            opt.step()  # one host sync per optimizer step: EDM skips non-finite updates
        else:
            state.skipped += 1
        opt.zero_grad(set_to_none=True)
        state.nimg += tc.batch
        state.step += 1
        ema.update(net, edm_ema_beta(tc, state.nimg, tc.batch))

        done = state.nimg >= total_nimg
        if done or state.nimg // report_every > (state.nimg - tc.batch) // report_every:
            loss_avg = accelerator.reduce(loss_sum / max(loss_n, 1), "mean").item()
            now = time.perf_counter()
            rec = {"kimg": round(state.nimg / 1000, 3), "step": state.step, "loss": loss_avg,
                   "lr": opt.param_groups[0]["lr"], "img_per_s": (state.nimg - n_report) / max(now - t_report, 1e-9),
                   "data_share": data_s / max(now - t_report, 1e-9), "skipped": state.skipped,
                   "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            state.history.append(rec)
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if writer is not None:
                    for k in ("loss", "lr", "img_per_s"):
                        writer.add_scalar(f"train/{k}", rec[k], state.step)
            emit({"event": "report", **rec, "total_kimg": tc.total_kimg})
            loss_sum, loss_n, t_report, n_report, data_s = torch.zeros((), device=device), 0, now, state.nimg, 0.0
        if done or state.nimg // snap_every > (state.nimg - tc.batch) // snap_every:
            snapshot()
            t_report, n_report, data_s = time.perf_counter(), state.nimg, 0.0  # img/s counts training time only
    if writer is not None:
        writer.close()
    emit({"event": "done", "kimg": state.nimg / 1000, "skipped": state.skipped})
    accelerator.end_training()
    state.main_process = accelerator.is_main_process
    return state


def dry_run_summary(preset: Preset) -> dict:
    """What `diffit train --dry-run` prints: the resolved preset and the network's parameter count."""
    from diffit_cli.build import parameter_count

    return {"preset": dump_preset(preset), "parameters": parameter_count(preset.model),
            "images_per_step": preset.train.batch, "steps": math.ceil(preset.train.total_kimg * 1000 / preset.train.batch)}
