"""One `train` call's state (`Run`) and what every part of the loop shares: the data stream and log.jsonl."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffit_cli.config import Preset
from diffit_cli.curves import LOG, draw_curves, is_report
from diffit_cli.data import make_loader
from diffit_cli.events import Progress
from diffit_cli.fid.metrics import VALUE_KEYS
from diffit_cli.training.monitor import SpikeDetector
from diffit_cli.training.posthoc import PowerEmaProfiles
from diffit_cli.training.recipe import Ema, TrainState
from diffit_cli.training.tracking import log_scalars


@dataclass
class Run:
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
    noise_gen: torch.Generator | None = None  # the diffusion noise of each step (re-seeded, keyed)
    probe: tuple | None = None  # a few samples of the last micro-batch: the report's attention-logit probe
    grad_norm_sum: torch.Tensor | None = None
    grad_norm_max: torch.Tensor | None = None
    fid_reference: tuple | None = None  # (reference, description) of FID along training, found at its first point
    inception_weights: str | None = None  # FID along training: a local Inception weights file (offline machines)
    curves_at: float = float("-inf")  # when curves.png was last drawn (perf_counter) and how long that took
    curves_s: float = 0.0
    skips: torch.Tensor | None = None  # (2,) on the device: steps skipped since the last report, skipped in a row
    posthoc: PowerEmaProfiles | None = None  # EDM2 power-function EMA profiles (train.posthoc_ema)
    guide: torch.nn.Module | None = None  # autoguidance's guiding network (evaluate.run_guide), read once

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def start_stream(run: Run) -> None:
    """(Re)open the data stream at the current image count (keyed order: the same batches after a resume)."""
    device = run.accelerator.device
    run.batches = iter(
        make_loader(
            run.dataset,
            run.batch_gpu * run.world,
            seed=run.preset.train.seed,
            rank=run.accelerator.process_index,
            world_size=run.world,
            num_workers=run.preset.data.num_workers,
            pin_memory=device.type == "cuda",
            start_index=run.state.nimg,
        )
    )
    run.grad_norm_sum, run.grad_norm_max, run.state.data_s = zero(run), zero(run), 0.0
    run.skips = torch.tensor([0.0, run.state.skipped_in_a_row], device=device)


def zero(run: Run) -> torch.Tensor:
    return torch.zeros((), device=run.accelerator.device)


def log_record(run: Run, rec: dict) -> None:
    """Append a record to log.jsonl (the source of truth), send its numbers to the trackers and, for a report or an
    FID value, redraw curves.png (main process only)."""
    if not run.accelerator.is_main_process:
        return
    with open(run.run_dir / LOG, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if is_report(rec):
        log_scalars(run.accelerator, "train", rec, rec["step"])
    elif rec.get("event") == "fid":
        log_scalars(run.accelerator, "eval", {k: rec[k] for k in VALUE_KEYS if k in rec}, rec["step"])
    if is_report(rec) or rec.get("event") == "fid":
        redraw_curves(run, force=rec.get("event") == "fid")


CURVES_SHARE = 0.02  # at most this share of the training time goes into redrawing curves.png


def redraw_curves(run: Run, force: bool = False) -> None:
    """Redraw curves.png from log.jsonl (main process): at every report unless the last drawing (about half a second
    on a busy CPU) was less than 1/CURVES_SHARE of its own duration ago; always when `force` (FID points, the end)."""
    start = time.perf_counter()
    due = force or start - run.curves_at >= run.curves_s / CURVES_SHARE
    if run.accelerator.is_main_process and due and (run.run_dir / LOG).is_file():
        draw_curves(run.run_dir)
        run.curves_at = time.perf_counter()
        run.curves_s = run.curves_at - start
