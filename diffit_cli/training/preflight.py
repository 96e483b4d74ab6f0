"""Everything a training run checks before its first step that needs no data read and no download, in one function
that the run and `diffit train --dry-run` both call, so that a dry run refuses what the run would refuse.

A dry run judges the preset and the flags wherever it runs: what depends only on the machine it runs on (no GPU
for fp16 or flex attention, Inception weights not downloaded on an offline login node) is a note there instead of
an error, and a preset that names no data (a template waiting for `--data`) is a note too."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffit_cli.config import Preset
from diffit_cli.data import check_source, require_data
from diffit_cli.data.catalog import README_SECTION, has_data
from diffit_cli.errors import DiffitError
from diffit_cli.fid.extractors import check_extractor, check_weights_at_hand, extractor_class
from diffit_cli.fid.reference import LATENT_NEEDS_FILE, TRAIN
from diffit_cli.fileio import check_writable
from diffit_cli.sampling.generate import needs_guide
from diffit_cli.sampling.weights import read_guide
from diffit_cli.training.recipe import TrainError, split_batch
from diffit_cli.training.tracking import TrackerSpec, resolve_trackers


@dataclass
class Checked:
    """What the checks found: the experiment trackers to start, and (dry run) the notes about this machine."""

    trackers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def preflight(
    preset: Preset,
    *,
    run_dir: Path | str | None = None,
    batch_gpu: int | None = None,
    trackers: TrackerSpec | None = None,
    inception_weights: str | Path | None = None,
    dry_run: bool = False,
) -> Checked:
    """Raise the first problem a run of `preset` would meet before its first step (a `DiffitError`, or the
    `OSError` of a file in the way of `run_dir`); with `dry_run`, problems of this machine alone are returned as
    notes instead, and nothing is downloaded or built."""
    checked = Checked()

    def on_this_machine(check) -> None:
        try:
            check()
        except DiffitError as e:
            if not dry_run:
                raise
            checked.notes.append(str(e))

    if dry_run and not has_data(preset.data):
        checked.notes.append(
            f"preset {preset.name!r} names no training data (data.path is empty): a run needs --data "
            f"(see {README_SECTION})"
        )
    else:
        require_data(preset)
    check_source(preset.data)  # a malformed dataset name, a missing path: before anything is built or read
    checked.trackers = resolve_trackers((trackers or TrackerSpec()).log_with)
    ev = preset.eval
    extractor_class(ev.feature_extractor, "eval.feature_extractor =")  # whether or not FID along training is on
    if ev.every_kimg > 0:
        if dry_run:
            on_this_machine(lambda: check_weights_at_hand(ev.feature_extractor, inception_weights))
        else:  # builds the extractor: reads (or downloads) its weights now, not at the first FID point
            check_extractor(ev.feature_extractor, inception_weights)
        _check_reference(preset)
    if needs_guide(preset.sample):  # FID along training and the preview grids sample with it
        read_guide(preset.sample.guidance.guide, preset)
    on_this_machine(lambda: _check_device(preset))
    split_batch(preset.train.batch, batch_gpu or preset.train.batch_gpu, int(os.environ.get("WORLD_SIZE", "1")))
    if run_dir is not None:
        check_writable(run_dir, folder=True)  # a file in the way: said now, not after the network is built
    return checked


def _check_reference(preset: Preset) -> None:
    """FID along training's reference, now rather than at the first FID point: a latent model has no training-set
    images to take statistics of, and a reference file or folder must exist."""
    ref = preset.eval.reference
    if ref == TRAIN and preset.data.space == "latent":
        raise DiffitError(LATENT_NEEDS_FILE)
    if ref != TRAIN and not Path(ref).expanduser().exists():
        raise DiffitError(
            f"eval.reference = {ref!r}: no such file or folder; give a statistics .npz, an image folder or a "
            "dataset file, or train (the training set's statistics, image-space presets)"
        )


def _check_device(preset: Preset) -> None:
    """What the preset asks of the device that this machine cannot give."""
    if preset.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainError(
            "fp16 mixed precision does not run on the CPU (Accelerate silently stays fp32); "
            "use --set train.mixed_precision=bf16 (or fp32)"
        )
    if getattr(preset.model, "attention_kernel", "sdpa") == "flex" and not torch.cuda.is_available():
        raise TrainError(
            "model.attention_kernel=flex trains on a GPU only (PyTorch's flex_attention has no CPU "
            "backward); use --set model.attention_kernel=sdpa"
        )
