"""The training loop: set-up (`setup`), resume, then steps (`step`: kimg counters, EMA, warm-up, clipping), reports
with the gradient norm and the largest attention logit (to log.jsonl, the experiment trackers and curves.png), the
loss-spike watch (warn, stop or roll back), FID along training (best.pt), and snapshots with a preview grid. One
loop trains every preset: pixel and latent data differ only in how a raw batch becomes model space
(`recipe.batch_to_x0`); the randomness is keyed (see `recipe`). Its steps: docs/architecture.md, 'Data flow'.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from diffit_cli.build import count_config_parameters, count_parameters
from diffit_cli.checkpoint import latest_checkpoint
from diffit_cli.config import Preset, dump_preset, preset_to_dict
from diffit_cli.core.attention import attention_logit_max
from diffit_cli.events import Message, Progress, Start, Step
from diffit_cli.fileio import atomic_write_bytes, new_output
from diffit_cli.preemption import AgreedStop, preemption_signals
from diffit_cli.training import lock
from diffit_cli.training.evaluate import fid_due, fid_point
from diffit_cli.training.posthoc import storage_note, store_due
from diffit_cli.training.preflight import preflight
from diffit_cli.training.recipe import TrainState, kimg_images
from diffit_cli.training.recovery import check_checkpoint_space, on_spike, resume, snapshot
from diffit_cli.training.run import Run, log_record, redraw_curves, start_stream, zero
from diffit_cli.training.setup import setup_run
from diffit_cli.training.step import settle_skips, train_step
from diffit_cli.training.tracking import TrackerSpec, flat_config, start_trackers


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
    run = setup_run(preset, Path(run_dir), batch_gpu, skip_bad_images, names, progress)
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
    if note := storage_note(preset, run.net):
        run.emit(Message(note))
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
    total_nimg = kimg_images(tc.total_kimg)
    loss_sum, loss_n, t_report, n_report = zero(run), 0, time.perf_counter(), state.nimg
    run.model.train()
    warn = lambda text: run.emit(Message(text, "warning"))  # noqa: E731
    with preemption_signals(warn) as caught:
        stop = AgreedStop(caught, run.world, warn)
        while state.nimg < total_nimg:
            loss_sum += train_step(run)
            loss_n += run.accum
            if signal_name := stop():  # SLURM's warning, a preemption, Ctrl-C: checkpoint now, then exit 3 (130)
                settle_skips(run)
                store_profiles(run, state.nimg >= total_nimg)  # the resumed run starts after this step
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
        kimg_images(tc.total_kimg),
        kimg_images(tc.report_kimg),
        kimg_images(tc.snapshot_kimg),
    )
    done = state.nimg >= total_nimg
    report_due = done or state.nimg // report_every > (state.nimg - tc.batch) // report_every
    fid = fid_due(run)
    snapshot_due = fid or done or state.nimg // snap_every > (state.nimg - tc.batch) // snap_every
    if report_due or snapshot_due:
        settle_skips(run)
    if report_due:
        rec = _report(run, loss_sum / max(loss_n, 1), n_report, time.perf_counter() - t_report)
        loss_sum, loss_n, t_report, n_report = zero(run), 0, time.perf_counter(), state.nimg
        spike = run.monitor.update(rec["kimg"], rec["interval_start"], rec["loss"])
        if spike is not None and on_spike(run, spike):  # stopped, or rolled back to a checkpoint
            return loss_sum, loss_n, time.perf_counter(), state.nimg
    store_profiles(run, done)
    if snapshot_due:
        snapshot(run, best=fid and fid_point(run))
        t_report, n_report, state.data_s = time.perf_counter(), state.nimg, 0.0  # img/s counts training time only
    return loss_sum, loss_n, t_report, n_report


def store_profiles(run: Run, done: bool) -> None:
    """Store the post-hoc EMA profiles when this step crossed `train.posthoc_ema_kimg` (or ended the run)."""
    if store_due(run.preset, run.state.nimg, done) and run.accelerator.is_main_process:
        run.posthoc.store(run.run_dir, run.state.step, run.state.nimg, dump_preset(run.preset))


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
