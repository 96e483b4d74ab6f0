"""The training loop (DESIGN §5): Accelerate placement, kimg counters, EMA, warm-up, clipping, resume, reports
with the gradient norm and the largest attention logit, the loss-spike watch (warn, stop or roll back), and
snapshots with a preview grid. One loop trains every preset: pixel and latent data differ only in how a raw batch
becomes model space (`recipe.to_model_space`); the randomness is keyed (see `recipe`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffit_cli.augment import AugmentPipe
from diffit_cli.build import build_diffusion, build_network, build_optimizer, count_parameters, parameter_count
from diffit_cli.checkpoint import (
    CheckpointError,
    last_checkpoint_before,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_aside_checkpoints_after,
)
from diffit_cli.codecs import make_codec
from diffit_cli.config import Preset, dump_preset
from diffit_cli.core.layers import attention_logit_max
from diffit_cli.data import make_loader, open_source
from diffit_cli.fileio import atomic_write_bytes
from diffit_cli.events import Message, Progress, Start, Step, main_process_only
from diffit_cli.generate import preview_grid
from diffit_cli.training import lock
from diffit_cli.training.monitor import Spike, SpikeDetector
from diffit_cli.training.recipe import (
    Ema,
    TrainError,
    TrainState,
    edm_ema_beta,
    enable_activation_checkpointing,
    keyed_seed,
    learning_rate,
    resume_check,
    split_batch,
    to_model_space,
)

PREEMPTED_EXIT = 3  # exit code of a run stopped by SIGTERM/SIGUSR1 after writing a checkpoint: rerun to continue
PROBE_SAMPLES = 8  # samples of the last micro-batch that the report's attention-logit probe runs on


@dataclass
class _Run:
    """Everything one `train` call holds: placement, network, optimizer, data stream and the spike monitor."""

    preset: Preset
    run_dir: Path
    accelerator: object
    net: torch.nn.Module  # the raw network (checkpoints, EMA, probes)
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped `net`
    ema: Ema
    opt: torch.optim.Optimizer
    diffusion: object
    codec: object
    dataset: object
    batch_gpu: int
    accum: int
    monitor: SpikeDetector
    state: TrainState
    emit: Progress
    augment: object = None
    batches: object = None
    probe: tuple | None = None  # a few samples of the last micro-batch: the report's attention-logit probe
    grad_norm_sum: torch.Tensor | None = None
    grad_norm_max: torch.Tensor | None = None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def train(preset: Preset, run_dir: Path | str, *, batch_gpu: int | None = None, force: bool = False,
          skip_bad_images: bool = False, tensorboard: bool = False,
          progress: Progress | None = None) -> TrainState:
    """Train `preset` in `run_dir`, resuming from `checkpoints/latest.pt` when it exists."""
    summary_writer = _summary_writer() if tensorboard else None  # checked before anything is written
    run = _setup(preset, Path(run_dir), batch_gpu, skip_bad_images, progress)
    main = run.accelerator.is_main_process
    if main:  # one training process per run folder (the other ranks of this launch take no lock)
        warning = lock.acquire(run.run_dir)
        if warning:
            run.emit(Message(warning, "warning"))
    try:
        return _train(run, force, summary_writer)
    finally:
        if main:
            lock.release(run.run_dir)


def _train(run: _Run, force: bool, summary_writer) -> TrainState:
    """Resume or start, then the loop: steps, reports (with the spike watch) and snapshots."""
    preset = run.preset
    tc, state, acc = preset.train, run.state, run.accelerator
    ckpt_path = _resume(run, force)
    if ckpt_path is None and acc.is_main_process:
        atomic_write_bytes(run.run_dir / "preset.yaml", dump_preset(preset).encode())
    writer = summary_writer(run.run_dir / "tensorboard") if summary_writer and acc.is_main_process else None
    _start_stream(run)
    run.emit(Start("train", tc.total_kimg, state.nimg / 1000, "kimg",
                   f"{'resuming' if ckpt_path is not None else 'starting'} at {state.nimg / 1000:.1f} kimg on "
                   f"{acc.device} × {run.world} ({count_parameters(run.net):,} parameters; per-device batch "
                   f"{run.batch_gpu} × {run.accum} accumulation)"))
    total_nimg = int(tc.total_kimg * 1000)
    loss_sum, loss_n, t_report, n_report = _zero(run), 0, time.perf_counter(), state.nimg
    run.model.train()
    with _preemption_signals() as caught:
        while state.nimg < total_nimg:
            loss_sum += _step(run)
            loss_n += run.accum
            if caught:  # SLURM's warning before a time limit or preemption: checkpoint now, exit PREEMPTED_EXIT
                _snapshot(run, grid=False)
                state.preempted = caught[0]
                break
            loss_sum, loss_n, t_report, n_report = _after_step(run, writer, loss_sum, loss_n, t_report, n_report)
            if state.stopped:
                break
    if writer is not None:
        writer.close()
    acc.end_training()
    state.main_process = acc.is_main_process
    return state


def _after_step(run: _Run, writer, loss_sum, loss_n: int, t_report: float, n_report: int):
    """Report (with the spike watch) and snapshot when their boundaries are crossed; the report accumulators."""
    tc, state = run.preset.train, run.state
    total_nimg, report_every, snap_every = int(tc.total_kimg * 1000), int(tc.report_kimg * 1000), int(tc.snapshot_kimg * 1000)
    done = state.nimg >= total_nimg
    if done or state.nimg // report_every > (state.nimg - tc.batch) // report_every:
        rec = _report(run, loss_sum / max(loss_n, 1), n_report, time.perf_counter() - t_report, writer)
        loss_sum, loss_n, t_report, n_report = _zero(run), 0, time.perf_counter(), state.nimg
        spike = run.monitor.update(rec["kimg"], rec["interval_start"], rec["loss"])
        if spike is not None and _on_spike(run, spike):  # stopped, or rolled back to a checkpoint
            return loss_sum, loss_n, time.perf_counter(), state.nimg
    if done or state.nimg // snap_every > (state.nimg - tc.batch) // snap_every:
        _snapshot(run)
        t_report, n_report, state.data_s = time.perf_counter(), state.nimg, 0.0  # img/s counts training time only
    return loss_sum, loss_n, t_report, n_report


@contextlib.contextmanager
def _preemption_signals():
    """Collect SIGTERM / SIGUSR1 (what SLURM sends with `--signal`) into a list while training; the loop checks it
    after each optimizer step. Only the main thread can install handlers; elsewhere nothing is caught."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    names = [n for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), lambda sig, frame: caught.append(signal.Signals(sig).name))
                for n in names}
    try:
        yield caught
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


def _setup(preset: Preset, run_dir: Path, batch_gpu: int | None, skip_bad_images: bool,
           progress: Progress | None) -> _Run:
    """Accelerator, data source, codec, diffusion, network, EMA, optimizer (nothing read from the run folder yet)."""
    from accelerate import Accelerator  # here, not at the top: `diffit train --dry-run` needs no Accelerate
    from accelerate.state import AcceleratorState  # (same reason)

    tc = preset.train
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
    batch_gpu, accum = split_batch(tc.batch, batch_gpu or tc.batch_gpu, accelerator.num_processes)
    emit = main_process_only(progress, accelerator.is_main_process)

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
    ema = Ema(net)  # before activation checkpointing patches the blocks' forward
    if tc.grad_checkpointing:
        enable_activation_checkpointing(net)
    opt = build_optimizer(net.parameters(), tc)
    model = torch.compile(net) if tc.compile else net
    model, opt = accelerator.prepare(model, opt)
    monitor = SpikeDetector(factor=tc.spike_factor, patience=tc.spike_patience)
    return _Run(preset, run_dir, accelerator, net, model, ema, opt, diffusion, codec, dataset, batch_gpu, accum,
                monitor, TrainState(), emit, augment=AugmentPipe(p=tc.augment_p) if tc.augment_p > 0 else None)


def _restore(run: _Run, ckpt_path: Path, force: bool = False) -> None:
    """Load weights, optimizer, counters, learning-rate scale and monitor state from a training checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    resume_check(ckpt["preset"], run.preset, force, ckpt_path)
    run.net.load_state_dict(ckpt["model"])
    run.ema.net.load_state_dict(ckpt["ema"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.state.nimg, run.state.step, run.state.skipped = ckpt["nimg"], ckpt["step"], ckpt["skipped"]
    run.state.skipped_before_step = run.state.skipped
    run.state.lr_scale = ckpt.get("lr_scale", 1.0)
    run.state.rollbacks = ckpt.get("rollbacks", 0)
    if "monitor" in ckpt:
        run.monitor.load_state_dict(ckpt["monitor"])


def _resume(run: _Run, force: bool) -> Path | None:
    """Restore the newest readable checkpoint (`latest.pt` first); a torn one, e.g. truncated by a machine crash,
    is skipped with a warning naming both. None for a new run."""
    latest = latest_checkpoint(run.run_dir)
    candidates = ([latest] if latest else []) + [p for _, p in reversed(list_checkpoints(run.run_dir)) if p != latest]
    for path in candidates:
        try:
            _restore(run, path, force)
        except CheckpointError:
            continue
        if path != candidates[0]:
            run.emit(Message(f"{candidates[0]} cannot be read (a torn file?); resumed from {path}", "warning"))
        return path
    if candidates:
        raise CheckpointError(f"no checkpoint in {run.run_dir / 'checkpoints'} can be read ({len(candidates)} tried); "
                              "move the folder aside to start over")
    return None


def _start_stream(run: _Run) -> None:
    """(Re)open the data stream at the current image count (keyed order: the same batches after a resume)."""
    device = run.accelerator.device
    run.batches = iter(make_loader(run.dataset, run.batch_gpu * run.world, seed=run.preset.train.seed,
                                   rank=run.accelerator.process_index, world_size=run.world,
                                   num_workers=run.preset.data.num_workers, pin_memory=device.type == "cuda",
                                   start_index=run.state.nimg))
    run.grad_norm_sum, run.grad_norm_max, run.state.data_s = _zero(run), _zero(run), 0.0


def _zero(run: _Run) -> torch.Tensor:
    return torch.zeros((), device=run.accelerator.device)


def _step(run: _Run) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches; returns the summed per-micro-batch mean loss (device)."""
    tc, state, acc, opt = run.preset.train, run.state, run.accelerator, run.opt
    rank, world = acc.process_index, run.world
    torch.manual_seed(keyed_seed(tc.seed, state.step, rank))  # dropout, label dropout, augmentation
    noise_gen = torch.Generator(acc.device).manual_seed(keyed_seed(tc.seed, state.step, 1 << 20))
    draws = None  # diffusion noise (σ or t, and n) for the whole global batch of this step
    for g in opt.param_groups:
        g["lr"] = learning_rate(tc, state.nimg) * state.lr_scale
    aug_dim = getattr(run.preset.model, "augment_dim", 0)
    loss_sum = _zero(run)
    for a in range(run.accum):
        t_wait = time.perf_counter()
        raw_batch = next(run.batches)
        state.data_s += time.perf_counter() - t_wait
        x0, y = to_model_space(raw_batch, run.preset, run.codec, acc.device)
        aug = None
        if run.augment is not None:
            x0, aug = run.augment(x0)
        elif aug_dim:  # zero labels = "not augmented" (bias-free map): keeps every parameter in the DDP graph
            aug = x0.new_zeros(x0.shape[0], aug_dim)
        if draws is None:
            draws = run.diffusion.training_noise(tc.batch, tuple(x0.shape[1:]), noise_gen)
        lo = (a * world + rank) * run.batch_gpu  # global index of this rank's first sample in this round
        kwargs = {k: v[lo:lo + run.batch_gpu] for k, v in draws.items()}
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


def _clip_and_step(run: _Run) -> torch.Tensor:
    """Global gradient norm (before clipping), optional clipping to `train.grad_clip`, then the optimizer step;
    a step whose gradients are not finite is skipped (EDM), through the grad scaler for fp16."""
    tc, acc, state = run.preset.train, run.accelerator, run.state
    if acc.scaler is not None:  # fp16: unscale first; the grad scaler skips non-finite steps and lowers its scale
        acc.unscale_gradients()
    grads = [p.grad for p in run.net.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()  # (no host sync)
    if tc.grad_clip is not None:
        torch._foreach_mul_(grads, (tc.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
    if acc.scaler is not None:
        run.opt.step()
        state.skipped += int(acc.optimizer_step_was_skipped)
    elif bool(torch.isfinite(grad_norm)):  # one host sync per optimizer step: EDM skips non-finite updates
        run.opt.step()
    else:
        state.skipped += 1
    skipped_now = state.skipped - state.skipped_before_step
    state.skipped_in_a_row = state.skipped_in_a_row + 1 if skipped_now else 0
    state.skipped_before_step = state.skipped
    if state.skipped_in_a_row >= tc.max_skipped_steps:
        last = latest_checkpoint(run.run_dir)
        raise TrainError(f"{state.skipped_in_a_row} optimizer steps in a row had non-finite gradients (the last at "
                         f"step {state.step + 1}): training has diverged; last checkpoint: {last or 'none'}; lower "
                         "train.lr or set train.on_spike=rollback and rerun")
    return grad_norm


def _attention_logit_max(run: _Run) -> float | None:
    """Largest pre-softmax attention logit over the network's TMSA layers, probed on a few samples of the last
    micro-batch under the training precision (at report time only); None for networks without TMSA."""
    if run.probe is None:
        return None
    x0, y, kwargs = run.probe
    run.net.eval()
    with run.accelerator.autocast():
        found = attention_logit_max(run.net, lambda: run.diffusion.loss(run.net, x0, y, **kwargs))
    run.net.train()
    return max(v.item() for v in found.values()) if found else None


def _report(run: _Run, loss_mean: torch.Tensor, n_report: int, seconds: float, writer) -> dict:
    """Reduce the interval's figures across processes, append them to log.jsonl and emit them as a `Step`."""
    acc, state, tc = run.accelerator, run.state, run.preset.train
    steps = max((state.nimg - n_report) // tc.batch, 1)
    loss, grad_mean, grad_max = acc.reduce(torch.stack([loss_mean, run.grad_norm_sum / steps, run.grad_norm_max]),
                                           "mean").tolist()
    rec = {"kimg": round(state.nimg / 1000, 3), "step": state.step, "loss": loss,
           "lr": run.opt.param_groups[0]["lr"], "img_per_s": (state.nimg - n_report) / max(seconds, 1e-9),
           "data_share": state.data_s / max(seconds, 1e-9), "skipped": state.skipped,
           "grad_norm": grad_mean, "grad_norm_max": grad_max, "attn_logit_max": _attention_logit_max(run),
           "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if acc.device.type == "cuda" else None}
    run.grad_norm_sum, run.grad_norm_max, state.data_s = _zero(run), _zero(run), 0.0
    state.history.append(rec)
    _log(run, rec, writer)
    run.emit(Step("train", rec["kimg"], tc.total_kimg, rec, f"loss {loss:.4f}  {rec['img_per_s']:.1f} img/s"
                  + (f"  skipped {state.skipped}" if state.skipped else "")))
    return {**rec, "interval_start": n_report}


def _log(run: _Run, rec: dict, writer=None) -> None:
    if run.accelerator.is_main_process:
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if writer is not None and "loss" in rec:
            for k in ("loss", "lr", "img_per_s", "grad_norm", "attn_logit_max"):
                if rec.get(k) is not None:
                    writer.add_scalar(f"train/{k}", rec[k], rec["step"])


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard is an optional extra
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install 'diffit-cli[tensorboard]'") from None
    return SummaryWriter


def _on_spike(run: _Run, spike: Spike) -> bool:
    """Warn about a loss spike (log.jsonl and a `spike` event) and apply `train.on_spike`; True when the loop must
    stop (stop) or continue from a rolled-back state (rollback), False to go on (warn)."""
    tc, acc = run.preset.train, run.accelerator
    good = last_checkpoint_before(run.run_dir, spike.start_nimg)
    action = tc.on_spike if (tc.on_spike != "rollback" or good is not None) else "stop"
    event = {"event": "spike", "kimg": spike.kimg, "first_kimg": spike.first_kimg, "loss": spike.loss,
             "median": spike.median, "ratio": spike.ratio, "checkpoint": None if good is None else str(good),
             "action": action}
    if action == "rollback":  # set the newer (suspect) checkpoints aside, lower the good one's lr scale, load it
        acc.wait_for_everyone()
        if acc.is_main_process:
            set_aside_checkpoints_after(run.run_dir, good)
            ckpt = load_checkpoint(good)
            ckpt["lr_scale"] = ckpt.get("lr_scale", 1.0) * tc.spike_lr_factor
            ckpt["rollbacks"] = ckpt.get("rollbacks", 0) + 1
            save_checkpoint(run.run_dir, ckpt, ckpt["nimg"], tc.keep_checkpoints)
        acc.wait_for_everyone()
        _restore(run, good, force=True)
        _start_stream(run)
        event.update(lr_scale=run.state.lr_scale, rollback_kimg=run.state.nimg / 1000)
    elif action == "stop":
        run.state.stopped = (f"loss spike at {spike.kimg:g} kimg ({spike.ratio:.1f}× the running median); "
                             + (f"last good checkpoint: {good}" if good else "no checkpoint was saved before it"))
    _log(run, event)
    run.emit(Message(_spike_text(event), "warning", event))
    return action != "warn"


def _spike_text(e: dict) -> str:
    """The one-paragraph warning for a spike event (what happened, the last good checkpoint, what was done)."""
    where = f"last good checkpoint: {e['checkpoint']}" if e["checkpoint"] else "no checkpoint was saved before it"
    head = (f"loss spike at {e['kimg']:g} kimg: {e['loss']:.4g} is {e['ratio']:.1f}× the running median "
            f"{e['median']:.4g} since {e['first_kimg']:g} kimg; {where}")
    if e["action"] == "rollback":
        return head + f" — rolled back to it with the learning rate × {e['lr_scale']:g}"
    if e["action"] == "warn":
        return head + " — continuing (set train.on_spike=rollback or stop to act on spikes)"
    return head


def _snapshot(run: _Run, grid: bool = True) -> None:
    """Checkpoint (weights, EMA, optimizer, counters, lr scale, monitor, preset) and a sample grid of the EMA."""
    acc, state, tc, preset = run.accelerator, run.state, run.preset.train, run.preset
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(run.run_dir, {
            "model": run.net.state_dict(), "ema": run.ema.net.state_dict(), "optimizer": run.opt.state_dict(),
            "nimg": state.nimg, "step": state.step, "skipped": state.skipped, "lr_scale": state.lr_scale,
            "rollbacks": state.rollbacks, "monitor": run.monitor.state_dict(), "preset": dump_preset(preset),
        }, state.nimg, tc.keep_checkpoints)
        if grid and run.codec is not None:  # from shards there is no VAE loaded: `diffit sample` decodes those
            path = preview_grid(run.ema.net, run.diffusion, preset, run.codec.decode,
                                run.run_dir / "samples" / f"grid-{state.nimg / 1000:012.3f}.png", acc.device)
            run.emit(Message(f"snapshot at {state.nimg / 1000:.1f} kimg → {path}",
                             data={"event": "snapshot", "kimg": state.nimg / 1000, "grid": str(path)}))
    acc.wait_for_everyone()


def dry_run_summary(preset: Preset) -> dict:
    """What `diffit train --dry-run` prints: the resolved preset and the network's parameter count."""
    return {"preset": dump_preset(preset), "parameters": parameter_count(preset.model),
            "images_per_step": preset.train.batch, "steps": math.ceil(preset.train.total_kimg * 1000 / preset.train.batch)}
