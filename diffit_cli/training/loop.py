"""The training loop: Accelerate placement, kimg counters, EMA, warm-up, clipping, resume, reports
with the gradient norm and the largest attention logit (to log.jsonl, the experiment trackers and curves.png), the
loss-spike watch (warn, stop or roll back), FID along training (best.pt), and snapshots with a preview grid. One
loop trains every preset: pixel and latent data differ only in how a raw batch becomes model space
(`recipe.batch_to_x0`); the randomness is keyed (see `recipe`). Its steps: docs/architecture.md, 'Data flow'.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from diffit_cli.augment import AugmentPipe
from diffit_cli.build import (
    build_diffusion,
    build_network,
    build_optimizer,
    compile_blocks,
    count_config_parameters,
    count_parameters,
    want_compile,
)
from diffit_cli.checkpoint import latest_checkpoint
from diffit_cli.codecs import make_codec
from diffit_cli.config import Preset, dump_preset, preset_to_dict
from diffit_cli.core.attention import attention_logit_max
from diffit_cli.data import open_source
from diffit_cli.events import Message, Progress, Start, Step, main_process_only
from diffit_cli.fileio import atomic_write_bytes, new_output
from diffit_cli.preemption import AgreedStop, preemption_signals
from diffit_cli.training import lock
from diffit_cli.training.evaluate import fid_due, fid_point
from diffit_cli.training.monitor import SpikeDetector
from diffit_cli.training.preflight import preflight
from diffit_cli.training.recipe import (
    Ema,
    TrainError,
    TrainState,
    batch_to_x0,
    edm_ema_beta,
    enable_activation_checkpointing,
    keyed_seed,
    learning_rate,
    split_batch,
    step_unless,
)
from diffit_cli.training.recovery import check_checkpoint_space, on_spike, resume, snapshot
from diffit_cli.training.run import Run, log_record, redraw_curves, start_stream, zero
from diffit_cli.training.tracking import LOG_DIR as TRACKER_DIR
from diffit_cli.training.tracking import TrackerSpec, flat_config, start_trackers

PROBE_SAMPLES = 8  # samples of the last micro-batch that the report's attention-logit probe runs on


def train(
    preset: Preset,
    run_dir: Path | str,
    *,
    batch_gpu: int | None = None,
    force: bool = False,
    skip_bad_images: bool = False,
    trackers: TrackerSpec | None = None,
    inception_weights: str | None = None,
    progress: Progress | None = None,
) -> TrainState:
    """Train `preset` in `run_dir`, resuming from `checkpoints/latest.pt` when it exists; `trackers`: the experiment
    trackers to log to (Accelerate's), resumed with the run; `inception_weights`: a local weights file for FID
    along training on offline machines."""
    trackers = trackers or TrackerSpec()
    # what `--dry-run` checks too (no data, a bad dataset name or extractor, trackers, device, a file in the way)
    names = preflight(
        preset, run_dir=run_dir, batch_gpu=batch_gpu, trackers=trackers, inception_weights=inception_weights
    ).trackers
    run = _setup(preset, Path(run_dir), batch_gpu, skip_bad_images, names, progress)
    run.inception_weights = inception_weights
    main = run.accelerator.is_main_process
    # a new run that fails before its first checkpoint (e.g. a corrupt image in the first batch) leaves nothing
    with new_output(run.run_dir, keep=lambda: latest_checkpoint(run.run_dir) is not None, owner=main):
        if main:  # one training process per run folder (the other ranks of this launch take no lock)
            warning = lock.acquire(run.run_dir)
            if warning:
                run.emit(Message(warning, "warning"))
        try:
            return _train(run, force, trackers)
        finally:
            if main:
                lock.release(run.run_dir)


def _train(run: Run, force: bool, trackers: TrackerSpec) -> TrainState:
    """Resume or start, then the loop: steps, reports (with the spike watch), FID points and snapshots."""
    preset = run.preset
    tc, state, acc = preset.train, run.state, run.accelerator
    ckpt_path = resume(run, force)
    if ckpt_path is None:
        check_checkpoint_space(run)  # on every process: none is left waiting for the main one at a barrier
    if ckpt_path is None and acc.is_main_process:
        atomic_write_bytes(run.run_dir / "preset.yaml", dump_preset(preset).encode())
    start_trackers(acc, run.run_dir, trackers, {"run": run.run_dir.name, **flat_config(preset_to_dict(preset))})
    start_stream(run)
    run.emit(
        Start(
            "train",
            tc.total_kimg,
            state.nimg / 1000,
            "kimg",
            f"{'resuming' if ckpt_path is not None else 'starting'} at {state.nimg / 1000:.1f} kimg on "
            f"{acc.device} × {run.world} ({count_parameters(run.net):,} parameters; per-device batch "
            f"{run.batch_gpu} × {run.accum} accumulation)",
        )
    )
    total_nimg = int(tc.total_kimg * 1000)
    loss_sum, loss_n, t_report, n_report = zero(run), 0, time.perf_counter(), state.nimg
    run.model.train()
    warn = lambda text: run.emit(Message(text, "warning"))  # noqa: E731
    with preemption_signals(warn) as caught:
        stop = AgreedStop(caught, run.world, warn)
        while state.nimg < total_nimg:
            loss_sum += _step(run)
            loss_n += run.accum
            if signal_name := stop():  # SLURM's warning, a preemption, Ctrl-C: checkpoint now, then exit 3 (130)
                _settle_skips(run)
                snapshot(run, grid=False)
                state.preempted = signal_name
                break
            loss_sum, loss_n, t_report, n_report = _after_step(run, loss_sum, loss_n, t_report, n_report)
            if state.stopped:
                break
        stop.close()
    redraw_curves(run, force=True)
    acc.end_training()
    state.main_process = acc.is_main_process
    return state


def _after_step(run: Run, loss_sum, loss_n: int, t_report: float, n_report: int):
    """Report (with the spike watch), FID and snapshot when their boundaries are crossed; the report accumulators.
    An FID point is always a snapshot too, so that `best.pt` can point at it."""
    tc, state = run.preset.train, run.state
    total_nimg, report_every, snap_every = (
        int(tc.total_kimg * 1000),
        int(tc.report_kimg * 1000),
        int(tc.snapshot_kimg * 1000),
    )
    done = state.nimg >= total_nimg
    report_due = done or state.nimg // report_every > (state.nimg - tc.batch) // report_every
    fid = fid_due(run)
    snapshot_due = fid or done or state.nimg // snap_every > (state.nimg - tc.batch) // snap_every
    if report_due or snapshot_due:
        _settle_skips(run)
    if report_due:
        rec = _report(run, loss_sum / max(loss_n, 1), n_report, time.perf_counter() - t_report)
        loss_sum, loss_n, t_report, n_report = zero(run), 0, time.perf_counter(), state.nimg
        spike = run.monitor.update(rec["kimg"], rec["interval_start"], rec["loss"])
        if spike is not None and on_spike(run, spike):  # stopped, or rolled back to a checkpoint
            return loss_sum, loss_n, time.perf_counter(), state.nimg
    if snapshot_due:
        snapshot(run, best=fid and fid_point(run))
        t_report, n_report, state.data_s = time.perf_counter(), state.nimg, 0.0  # img/s counts training time only
    return loss_sum, loss_n, t_report, n_report


CPU_BF16_VARIABLE = "DIFFIT_CPU_BF16"


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), or `DIFFIT_CPU_BF16=1` asks for bf16 anyway."""
    return (
        os.environ.get(CPU_BF16_VARIABLE) == "1"
        or torch.cpu._is_avx512_bf16_supported()
        or torch.cpu._is_amx_tile_supported()
    )


def training_precision(mixed_precision: str) -> str:
    """The precision a preset's training really runs in: a bf16 preset trains in fp32 on a CPU without native bf16,
    where emulated bf16 runs ~10× slower (measured: 4.5 vs 43 img/s, `demo` at 32² on 2 EPYC cores)."""
    cpu_fp32 = mixed_precision == "bf16" and not torch.cuda.is_available() and not native_cpu_bf16()
    return "fp32" if cpu_fp32 else mixed_precision


def _setup(
    preset: Preset,
    run_dir: Path,
    batch_gpu: int | None,
    skip_bad_images: bool,
    trackers: list[str],
    progress: Progress | None,
) -> Run:
    """Accelerator, data source, codec, diffusion, network, EMA, optimizer (nothing read from the run folder yet)."""
    tc = preset.train
    mp = training_precision(tc.mixed_precision)  # (fp16 or flex attention without a GPU: refused by preflight)
    cpu_fp32 = mp != tc.mixed_precision
    # Accelerate keeps its settings in a process-wide singleton: a second train() in one process (ablate, a
    # notebook) with another precision starts from a fresh one (the process group, if any, is kept)
    AcceleratorState._reset_state()
    # cpu=True on GPU-less machines lets torchrun / `accelerate launch` run several gloo processes
    accelerator = Accelerator(
        mixed_precision="no" if mp == "fp32" else mp,
        cpu=not torch.cuda.is_available(),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TRACKER_DIR)),
    )
    device = accelerator.device
    batch_gpu, accum = split_batch(tc.batch, batch_gpu or tc.batch_gpu, accelerator.num_processes)
    emit = main_process_only(progress, accelerator.is_main_process)

    with accelerator.main_process_first():  # a dataset by name downloads once, on the main process
        dataset = open_source(preset.data, skip_bad_images=skip_bad_images)
    if dataset.kind == "latent" and preset.data.space != "latent":
        raise TrainError(
            f"{preset.data.path!r} holds VAE latents but preset {preset.name!r} trains in pixel space; "
            "use a latent preset such as imagenet256"
        )
    if dataset.kind == "latent" and dataset.num_channels != preset.model.in_channels:
        raise TrainError(
            f"the latents in {preset.data.path!r} have {dataset.num_channels} channels but the "
            f"network expects {preset.model.in_channels}; re-encode them or fix the preset"
        )
    _check_classes(preset, dataset)
    if cpu_fp32:  # after the checks of the user's data: an error there comes alone
        emit(
            Message(
                "this CPU has no native bf16 (AVX512-BF16 or AMX): training in fp32, about 10× faster here than "
                "emulated bf16 (set train.mixed_precision=fp32 to silence this, "
                f"{CPU_BF16_VARIABLE}=1 to force bf16)",
                "warning",
            )
        )
    # shards hold posterior stats already: no VAE needed to train on them
    codec = None if dataset.kind == "latent" else make_codec(preset.data, device)
    diffusion = build_diffusion(preset.diffusion, preset.model)
    torch.manual_seed(tc.seed)
    net = build_network(preset.model, device)
    ema = Ema(net)  # before activation checkpointing patches the blocks' forward
    if tc.grad_checkpointing:
        enable_activation_checkpointing(net)
    opt = build_optimizer(net.parameters(), tc)
    if want_compile(tc.compile, device):  # after checkpointing: the recomputed block is the compiled region
        compile_blocks(net, lambda text: emit(Message(text, "warning")))
    model, opt = accelerator.prepare(net, opt)
    monitor = SpikeDetector(factor=tc.spike_factor, patience=tc.spike_patience)
    return Run(
        preset,
        run_dir,
        accelerator,
        net,
        model,
        ema,
        opt,
        diffusion,
        codec,
        dataset,
        batch_gpu,
        accum,
        monitor,
        TrainState(),
        emit,
        augment=AugmentPipe(p=tc.augment_p) if tc.augment_p > 0 else None,
        noise_gen=torch.Generator(device),
    )


def _check_classes(preset: Preset, dataset) -> None:
    """The data's labels must index the network's class table (row `num_classes` is the null class): a dataset with
    more classes than `model.num_classes` (or none, for a class-conditional network) is refused before any step;
    a larger table than the data needs is fine."""
    wanted, have, name = preset.model.num_classes, dataset.num_classes, dataset.name
    if wanted and not have:
        raise TrainError(
            f"the network is class-conditional (model.num_classes {wanted}) but {name!r} has no class "
            "labels; give labelled data (class subfolders, dataset.json labels, arr_1, a label column) "
            "or set model.num_classes=0 for an unconditional model"
        )
    if wanted and have > wanted:
        raise TrainError(
            f"{name!r} has {have} classes but the network has model.num_classes {wanted}; set "
            f"--set model.num_classes={have} (or 0 for an unconditional model)"
        )


def _step(run: Run) -> torch.Tensor:
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
    grad_norm = _clip_and_step(run)
    opt.zero_grad(set_to_none=True)
    state.nimg += tc.batch
    state.step += 1
    run.ema.update(run.net, edm_ema_beta(tc, state.nimg, tc.batch))
    finite = torch.isfinite(grad_norm)
    run.grad_norm_sum += torch.where(finite, grad_norm, 0.0)
    run.grad_norm_max = torch.maximum(run.grad_norm_max, torch.where(finite, grad_norm, 0.0))
    return loss_sum


def _clip_and_step(run: Run) -> torch.Tensor:
    """Global gradient norm (before clipping), optional clipping to `train.grad_clip`, then the optimizer step.
    A step whose gradients are not finite is skipped (EDM) without a host sync: the fused optimizer reads the flag
    on the device (fp16: the grad scaler's own flag, the same condition on the same unscaled gradients, which also
    lowers its scale); `run.skips` counts on the device and `_settle_skips` reads it at report time."""
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


def _settle_skips(run: Run) -> None:
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


def _attention_logit_max(run: Run) -> float | None:
    """Largest pre-softmax attention logit over the network's TMSA layers, probed on a few samples of the last
    micro-batch under the training precision (at report time only); None for networks without TMSA."""
    if run.probe is None or not run.accelerator.is_main_process:  # only the main process writes the log
        return None
    x0, y, kwargs = run.probe
    run.net.eval()
    with run.accelerator.autocast():
        found = attention_logit_max(run.net, lambda: run.diffusion.loss(run.net, x0, y, **kwargs))
    run.net.train()
    return max(v.item() for v in found.values()) if found else None


def _report(run: Run, loss_mean: torch.Tensor, n_report: int, seconds: float) -> dict:
    """Reduce the interval's figures across processes, append them to log.jsonl and emit them as a `Step`."""
    acc, state, tc = run.accelerator, run.state, run.preset.train
    steps = max((state.nimg - n_report) // tc.batch, 1)
    loss, grad_mean, grad_max = acc.reduce(
        torch.stack([loss_mean, run.grad_norm_sum / steps, run.grad_norm_max]), "mean"
    ).tolist()
    rec = {
        "kimg": round(state.nimg / 1000, 3),
        "step": state.step,
        "loss": loss,
        "lr": run.opt.param_groups[0]["lr"],
        "img_per_s": (state.nimg - n_report) / max(seconds, 1e-9),
        "data_share": state.data_s / max(seconds, 1e-9),
        "skipped": state.skipped,
        "grad_norm": grad_mean,
        "grad_norm_max": grad_max,
        "attn_logit_max": _attention_logit_max(run),
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if acc.device.type == "cuda" else None,
    }
    run.grad_norm_sum, run.grad_norm_max, state.data_s = zero(run), zero(run), 0.0
    state.history.append(rec)
    log_record(run, rec)
    run.emit(
        Step(
            "train",
            rec["kimg"],
            tc.total_kimg,
            rec,
            f"loss {loss:.4f}  {rec['img_per_s']:.1f} img/s" + (f"  skipped {state.skipped}" if state.skipped else ""),
        )
    )
    return {**rec, "interval_start": n_report}


def dry_run_summary(preset: Preset) -> dict:
    """What `diffit train --dry-run` prints: the resolved preset and the network's parameter count."""
    return {
        "preset": dump_preset(preset),
        "parameters": count_config_parameters(preset.model),
        "images_per_step": preset.train.batch,
        "steps": math.ceil(preset.train.total_kimg * 1000 / preset.train.batch),
    }
