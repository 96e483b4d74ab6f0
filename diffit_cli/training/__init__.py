"""Training (DESIGN §5): `loop` (the `train` loop and its helpers), `recipe` (keyed randomness, lr ramp, EMA,
batch split, resume rules) and `monitor` (the loss-spike detector)."""

from diffit_cli.training.loop import PREEMPTED_EXIT, dry_run_summary, train
from diffit_cli.training.monitor import Spike, SpikeDetector
from diffit_cli.training.recipe import (
                                        RESUMABLE_KEYS,
                                        TrainError,
                                        TrainState,
                                        enable_activation_checkpointing,
                                        keyed_seed,
                                        learning_rate,
                                        to_model_space,
)

__all__ = ["PREEMPTED_EXIT", "train", "dry_run_summary", "Spike", "SpikeDetector", "RESUMABLE_KEYS", "TrainError", "TrainState",
           "enable_activation_checkpointing", "keyed_seed", "learning_rate", "to_model_space"]
