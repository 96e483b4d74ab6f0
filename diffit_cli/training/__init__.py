"""Training (docs/architecture.md, 'Data flow'): `loop` (the `train` loop), `run` (its state and log), `recovery`
(checkpoints, resume, free space, spike response), `tracking` (experiment trackers), `evaluate` (FID along
training), `recipe` (keyed randomness, lr ramp, EMA, batch split, resume rules), `monitor` (the loss-spike detector)
and `lock` (one training process per run folder)."""

from diffit_cli.training.loop import dry_run_summary, train
from diffit_cli.training.monitor import Spike, SpikeDetector
from diffit_cli.training.recipe import (
    RESUMABLE_KEYS,
    TrainError,
    TrainState,
    batch_to_x0,
    enable_activation_checkpointing,
    keyed_seed,
    learning_rate,
)
from diffit_cli.training.tracking import TRACKERS, TrackerSpec

__all__ = [
    "train",
    "dry_run_summary",
    "Spike",
    "SpikeDetector",
    "RESUMABLE_KEYS",
    "TrainError",
    "TrainState",
    "enable_activation_checkpointing",
    "keyed_seed",
    "learning_rate",
    "batch_to_x0",
    "TRACKERS",
    "TrackerSpec",
]
