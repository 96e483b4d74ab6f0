"""What keeps a run's results safe: checkpoints and resume (the newest readable one), free space for them, the
loss-spike response (warn, stop, roll back), and snapshots with their preview grid."""

from __future__ import annotations

from pathlib import Path

import torch

from diffit_cli.checkpoint import (
    CheckpointError,
    check_free_space,
    last_checkpoint_before,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_aside_checkpoints_after,
    state_nbytes,
)
from diffit_cli.config import dump_preset
from diffit_cli.events import Message
from diffit_cli.posthoc.store import set_aside_profiles_after
from diffit_cli.sampling.generate import preview_grid
from diffit_cli.training.evaluate import run_guide
from diffit_cli.training.monitor import Spike
from diffit_cli.training.recipe import resume_check
from diffit_cli.training.run import Run, log_record, start_stream
from diffit_cli.training.tracking import log_image


def restore(run: Run, ckpt_path: Path, force: bool = False) -> list[str]:
    """Load weights, optimizer, counters, learning-rate scale and monitor state from a training checkpoint; returns
    the preset keys that `force` let differ from the checkpoint's (`resume_check`)."""
    ckpt = load_checkpoint(ckpt_path)
    changed = resume_check(ckpt["preset"], run.preset, force, ckpt_path)
    run.net.load_state_dict(ckpt["model"])
    run.ema.net.load_state_dict(ckpt["ema"])
    if run.posthoc is not None:
        run.posthoc.load_state_dict(ckpt.get("posthoc_ema"), ckpt_path)
    run.opt.load_state_dict(ckpt["optimizer"])
    run.state.nimg, run.state.step, run.state.skipped = ckpt["nimg"], ckpt["step"], ckpt["skipped"]
    run.state.lr_scale = ckpt.get("lr_scale", 1.0)
    run.state.rollbacks = ckpt.get("rollbacks", 0)
    run.state.best = ckpt.get("best")
    if "monitor" in ckpt:
        run.monitor.load_state_dict(ckpt["monitor"])
    return changed


def resume(run: Run, force: bool) -> Path | None:
    """Restore the newest readable checkpoint (`latest.pt` first); a torn one, e.g. truncated by a machine crash,
    is skipped with a warning naming both. None for a new run."""
    latest = latest_checkpoint(run.run_dir)
    candidates = ([latest] if latest else []) + [p for _, p in reversed(list_checkpoints(run.run_dir)) if p != latest]
    for path in candidates:
        try:
            changed = restore(run, path, force)
        except CheckpointError:
            continue
        if path != candidates[0]:
            run.emit(Message(f"{candidates[0]} cannot be read (a torn file?); resumed from {path}", "warning"))
        if changed and run.posthoc is not None and run.accelerator.is_main_process:
            _supersede_profiles(run, changed)
        return path
    if candidates:
        raise CheckpointError(
            f"no checkpoint in {run.run_dir / 'checkpoints'} can be read ({len(candidates)} tried); "
            "move the folder aside to start over"
        )
    return None


def _supersede_profiles(run: Run, changed: list[str]) -> None:
    """A forced resume under other settings trains anew from the checkpoint: the post-hoc EMA snapshots stored after
    it belong to the old settings' training and are set aside (`*.superseded`), as a rollback sets its own aside."""
    moved = set_aside_profiles_after(run.run_dir, run.state.nimg, suffix=".superseded")
    if moved:
        run.emit(
            Message(
                f"{len(moved)} post-hoc EMA snapshots stored after {run.state.nimg / 1000:g} kimg were made before "
                f"the changed settings ({', '.join(changed)}); set aside as *.superseded",
                "warning",
            )
        )


def check_checkpoint_space(run: Run) -> None:
    """Before a new run's first checkpoint: room for two (raw + EMA weights, and Adam's state: two fp32 moments and
    a step count per parameter, not allocated before the first step)."""
    adam = [
        [torch.empty(p.numel(), device="meta")] * 2 + [torch.empty((), device="meta")]  # sizes only, no memory
        for p in run.net.parameters()
        if p.requires_grad
    ]
    check_free_space(run.run_dir, state_nbytes({**training_weights(run), "optimizer": adam}))


def training_weights(run: Run) -> dict:
    """The checkpoint's weights: raw, EMA and the post-hoc EMA profiles (when tracked)."""
    weights = {"model": run.net.state_dict(), "ema": run.ema.net.state_dict()}
    if run.posthoc is not None:
        weights["posthoc_ema"] = run.posthoc.state_dict()
    return weights


def on_spike(run: Run, spike: Spike) -> bool:
    """Warn about a loss spike (log.jsonl and a `spike` event) and apply `train.on_spike`; True when the loop must
    stop (stop) or continue from a rolled-back state (rollback), False to go on (warn)."""
    tc, acc = run.preset.train, run.accelerator
    good = last_checkpoint_before(run.run_dir, spike.start_nimg)
    action = tc.on_spike if (tc.on_spike != "rollback" or good is not None) else "stop"
    event = {
        "event": "spike",
        "kimg": spike.kimg,
        "first_kimg": spike.first_kimg,
        "loss": spike.loss,
        "median": spike.median,
        "ratio": spike.ratio,
        "checkpoint": None if good is None else str(good),
        "action": action,
    }
    if action == "rollback":  # set the newer (suspect) checkpoints aside, lower the good one's lr scale, load it
        acc.wait_for_everyone()
        if acc.is_main_process:
            set_aside_checkpoints_after(run.run_dir, good)
            ckpt = load_checkpoint(good)
            set_aside_profiles_after(run.run_dir, ckpt["nimg"])
            ckpt["lr_scale"] = ckpt.get("lr_scale", 1.0) * tc.spike_lr_factor
            ckpt["rollbacks"] = ckpt.get("rollbacks", 0) + 1
            save_checkpoint(run.run_dir, ckpt, ckpt["nimg"], tc.keep_checkpoints)
        acc.wait_for_everyone()
        restore(run, good, force=True)
        start_stream(run)
        event.update(lr_scale=run.state.lr_scale, rollback_kimg=run.state.nimg / 1000)
    elif action == "stop":
        run.state.stopped = f"loss spike at {spike.kimg:g} kimg ({spike.ratio:.1f}× the running median); " + (
            f"last good checkpoint: {good}" if good else "no checkpoint was saved before it"
        )
    log_record(run, event)
    run.emit(Message(spike_text(event), "warning", event))
    return action != "warn"


def spike_text(e: dict) -> str:
    """The one-paragraph warning for a spike event (what happened, the last good checkpoint, what was done)."""
    where = f"last good checkpoint: {e['checkpoint']}" if e["checkpoint"] else "no checkpoint was saved before it"
    head = (
        f"loss spike at {e['kimg']:g} kimg: {e['loss']:.4g} is {e['ratio']:.1f}× the running median "
        f"{e['median']:.4g} since {e['first_kimg']:g} kimg; {where}"
    )
    if e["action"] == "rollback":
        return head + f" — rolled back to it with the learning rate × {e['lr_scale']:g}"
    if e["action"] == "warn":
        return head + " — continuing (set train.on_spike=rollback or stop to act on spikes)"
    return head


def snapshot(run: Run, grid: bool = True, best: bool = False) -> None:
    """Checkpoint (weights, EMA, optimizer, counters, lr scale, monitor, best FID, preset; `best`: `best.pt` points
    at it) and a sample grid of the EMA, also sent to the trackers that take images."""
    acc, state, tc, preset = run.accelerator, run.state, run.preset.train, run.preset
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(
            run.run_dir,
            {
                **training_weights(run),
                "optimizer": run.opt.state_dict(),
                "nimg": state.nimg,
                "step": state.step,
                "skipped": state.skipped,
                "lr_scale": state.lr_scale,
                "rollbacks": state.rollbacks,
                "monitor": run.monitor.state_dict(),
                "best": state.best,
                "preset": dump_preset(preset),
            },
            state.nimg,
            tc.keep_checkpoints,
            best=best,
        )
        if grid and run.codec is not None:  # from shards there is no VAE loaded: `diffit sample` decodes those
            path = preview_grid(
                run.ema.net,
                run.diffusion,
                preset,
                run.codec.decode,
                run.run_dir / "samples" / f"grid-{state.nimg / 1000:012.3f}.png",
                acc.device,
                guide=run_guide(run),
            )
            log_image(acc, "samples", path, state.step)
            run.emit(
                Message(
                    f"snapshot at {state.nimg / 1000:.1f} kimg → {path}",
                    data={"event": "snapshot", "kimg": state.nimg / 1000, "grid": str(path)},
                )
            )
    acc.wait_for_everyone()
