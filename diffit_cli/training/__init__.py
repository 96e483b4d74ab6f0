"""Training (docs/architecture.md, 'Data flow'): `loop` (the `train` loop), `setup` (the Accelerator, data, network
and optimizer of a run), `step` (one optimizer step, no host sync), `run` (its state and log), `recovery`
(checkpoints, resume, free space, spike response), `tracking` (experiment trackers), `evaluate` (FID along
training), `recipe` (keyed randomness, lr ramp, EMA, batch split, resume rules), `monitor` (the loss-spike detector),
`lock` (one training process per run folder) and `preflight` (the checks before the first step, which
`diffit train --dry-run` makes too)."""

from diffit_cli.training.loop import dry_run_summary, train
from diffit_cli.training.monitor import Spike, SpikeDetector
from diffit_cli.training.preflight import Checked, preflight
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
    "preflight",
    "Checked",
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
