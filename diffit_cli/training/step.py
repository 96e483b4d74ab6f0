"""One optimizer step of training, with no host sync: keyed seeds, `accum` micro-batches (the last one
all-reduces), the gradient norm, optional clipping, the step skipped on the device when the gradients are not
finite, EMA; and the skip counters read at report and snapshot time."""

from __future__ import annotations

import contextlib
import time

import torch

from diffit_cli.checkpoint import latest_checkpoint
from diffit_cli.training.recipe import (
    TrainError,
    batch_to_x0,
    edm_ema_beta,
    keyed_seed,
    learning_rate,
    step_unless,
)
from diffit_cli.training.run import Run, zero

PROBE_SAMPLES = 8  # samples of the last micro-batch that the report's attention-logit probe runs on


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches; returns the summed per-micro-batch mean loss (device)."""
    tc, state, acc, opt = run.preset.train, run.state, run.accelerator, run.opt
    rank, world = acc.process_index, run.world
    torch.manual_seed(keyed_seed(tc.seed, state.step, rank))  # dropout, label dropout, augmentation
    run.noise_gen.manual_seed(keyed_seed(tc.seed, state.step, 1 << 20))
    draws = None  # diffusion noise (σ or t, and n) for the whole global batch of this step
    for g in opt.param_groups:
        g["lr"] = learning_rate(tc, state.nimg) * state.lr_scale
    aug_dim = getattr(run.preset.model, "augment_dim", 0)
    loss_sum = zero(run)
    for a in range(run.accum):
        t_wait = time.perf_counter()
        raw_batch = next(run.batches)
        state.data_s += time.perf_counter() - t_wait
        x0, y = batch_to_x0(raw_batch, run.preset, run.codec, acc.device)
        aug = None
        if run.augment is not None:
            x0, aug = run.augment(x0)
        elif aug_dim:  # zero labels = "not augmented" (bias-free map): keeps every parameter in the DDP graph
            aug = x0.new_zeros(x0.shape[0], aug_dim)
        if draws is None:
            draws = run.diffusion.training_noise(tc.batch, tuple(x0.shape[1:]), run.noise_gen)
        lo = (a * world + rank) * run.batch_gpu  # global index of this rank's first sample in this round
        kwargs = {k: v[lo : lo + run.batch_gpu] for k, v in draws.items()}
        if aug is not None:
            kwargs["augment_labels"] = aug
        with contextlib.nullcontext() if a == run.accum - 1 else acc.no_sync(run.model):
            loss = run.diffusion.loss(run.model, x0, y, **kwargs)
            acc.backward(loss.mean() / run.accum)
        loss_sum += loss.detach().mean()
    k = min(PROBE_SAMPLES, run.batch_gpu)
    run.probe = (x0[:k], None if y is None else y[:k], {n: v[:k] for n, v in kwargs.items()})
    grad_norm = clip_and_step(run)
    opt.zero_grad(set_to_none=True)
    state.nimg += tc.batch
    state.step += 1
    run.ema.update(run.net, edm_ema_beta(tc, state.nimg, tc.batch))
    if run.posthoc is not None:
        run.posthoc.update(run.net, state.step)
    finite = torch.isfinite(grad_norm)
    run.grad_norm_sum += torch.where(finite, grad_norm, 0.0)
    run.grad_norm_max = torch.maximum(run.grad_norm_max, torch.where(finite, grad_norm, 0.0))
    return loss_sum


def clip_and_step(run: Run) -> torch.Tensor:
    """Global gradient norm (before clipping), optional clipping to `train.grad_clip`, then the optimizer step.
    A step whose gradients are not finite is skipped (EDM) without a host sync: the fused optimizer reads the flag
    on the device (fp16: the grad scaler's own flag, the same condition on the same unscaled gradients, which also
    lowers its scale); `run.skips` counts on the device and `settle_skips` reads it at report time."""
    tc, acc = run.preset.train, run.accelerator
    if acc.scaler is not None:  # fp16: unscale first
        acc.unscale_gradients()
    grads = [p.grad for p in run.net.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()  # (no host sync)
    if tc.grad_clip is not None:
        torch._foreach_mul_(grads, (tc.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
    skipped = (~torch.isfinite(grad_norm)).float()  # 0-dim, on the device
    if acc.scaler is not None:
        run.opt.step()
    else:
        step_unless(run.opt, skipped)
    run.skips = torch.stack([run.skips[0] + skipped, (run.skips[1] + 1) * skipped])
    return grad_norm


def settle_skips(run: Run) -> None:
    """Fold the device-side skip counters into the state (one host read, at report and snapshot time); a run whose
    last `train.max_skipped_steps` or more steps were all non-finite stops here."""
    tc, state = run.preset.train, run.state
    skipped, in_a_row = (int(v) for v in run.skips.tolist())
    state.skipped += skipped
    state.skipped_in_a_row = in_a_row
    run.skips = torch.tensor([0.0, in_a_row], device=run.skips.device)
    if in_a_row >= tc.max_skipped_steps:
        last = latest_checkpoint(run.run_dir)
        raise TrainError(
            f"{in_a_row} optimizer steps in a row had non-finite gradients (the last at step "
            f"{state.step}): training has diverged; last checkpoint: {last or 'none'}; lower "
            "train.lr or set train.on_spike=rollback and rerun"
        )
