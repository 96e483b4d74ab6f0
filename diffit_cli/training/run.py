"""One `train` call's state (`Run`) and what every part of the loop shares: the data stream and log.jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffit_cli.config import Preset
from diffit_cli.data import make_loader
from diffit_cli.events import Progress
from diffit_cli.training.monitor import SpikeDetector
from diffit_cli.training.recipe import Ema, TrainState


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
    skips: torch.Tensor | None = None  # (2,) on the device: steps skipped since the last report, skipped in a row

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def start_stream(run: Run) -> None:
    """(Re)open the data stream at the current image count (keyed order: the same batches after a resume)."""
    device = run.accelerator.device
    run.batches = iter(make_loader(run.dataset, run.batch_gpu * run.world, seed=run.preset.train.seed,
                                   rank=run.accelerator.process_index, world_size=run.world,
                                   num_workers=run.preset.data.num_workers, pin_memory=device.type == "cuda",
                                   start_index=run.state.nimg))
    run.grad_norm_sum, run.grad_norm_max, run.state.data_s = zero(run), zero(run), 0.0
    run.skips = torch.tensor([0.0, run.state.skipped_in_a_row], device=device)


def zero(run: Run) -> torch.Tensor:
    return torch.zeros((), device=run.accelerator.device)


def log_record(run: Run, rec: dict, writer=None) -> None:
    if run.accelerator.is_main_process:
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if writer is not None and "loss" in rec:
            for k in ("loss", "lr", "img_per_s", "grad_norm", "attn_logit_max"):
                if rec.get(k) is not None:
                    writer.add_scalar(f"train/{k}", rec[k], rec["step"])
