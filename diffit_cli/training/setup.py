"""A training run's set-up: the precision it really trains in, the Accelerator, the data (checked against the
network: latent or pixel space, channels, classes), codec, diffusion, network, EMA (and post-hoc EMA profiles) and
optimizer, compiled where asked. Nothing is read from the run folder here; resuming is `recovery`'s."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration

from diffit_cli.augment import AugmentPipe
from diffit_cli.build import build_diffusion, build_network, build_optimizer, compile_blocks, want_compile
from diffit_cli.codecs import make_codec
from diffit_cli.config import Preset
from diffit_cli.data import open_source
from diffit_cli.events import Message, Progress, main_process_only
from diffit_cli.training.monitor import SpikeDetector
from diffit_cli.training.posthoc import make_profiles
from diffit_cli.training.recipe import Ema, TrainError, TrainState, enable_activation_checkpointing, split_batch
from diffit_cli.training.run import Run
from diffit_cli.training.tracking import LOG_DIR as TRACKER_DIR

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


def setup_run(
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
    accelerator = _accelerator(mp, run_dir, trackers)
    device = accelerator.device
    batch_gpu, accum = split_batch(tc.batch, batch_gpu or tc.batch_gpu, accelerator.num_processes)
    emit = main_process_only(progress, accelerator.is_main_process)
    with accelerator.main_process_first():  # a dataset by name downloads once, on the main process
        dataset = open_source(preset.data, skip_bad_images=skip_bad_images)
    check_data(preset, dataset)
    if mp != tc.mixed_precision:  # after the checks of the user's data: an error there comes alone
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
    net, ema, posthoc, opt = _network_and_optimizer(preset, device, lambda text: emit(Message(text, "warning")))
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
        posthoc=posthoc,
    )


def _accelerator(precision: str, run_dir: Path, trackers: list[str]) -> Accelerator:
    """A fresh Accelerator training in `precision`, logging to `trackers` under the run folder."""
    # Accelerate keeps its settings in a process-wide singleton: a second train() in one process (ablate, a
    # notebook) with another precision starts from a fresh one (the process group, if any, is kept)
    AcceleratorState._reset_state()
    # cpu=True on GPU-less machines lets torchrun / `accelerate launch` run several gloo processes
    return Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,
        cpu=not torch.cuda.is_available(),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TRACKER_DIR)),
    )


def _network_and_optimizer(preset: Preset, device: torch.device, warn) -> tuple:
    """The network (seeded), its EMA copy, the post-hoc EMA profiles and the optimizer, with activation
    checkpointing and compiled blocks as `train` asks; `warn` gets the note of a block that falls back to eager."""
    tc = preset.train
    torch.manual_seed(tc.seed)
    net = build_network(preset.model, device)
    ema = Ema(net)  # before activation checkpointing patches the blocks' forward
    posthoc = make_profiles(preset, net)
    if tc.grad_checkpointing:
        enable_activation_checkpointing(net)
    opt = build_optimizer(net.parameters(), tc)
    if want_compile(tc.compile, device):  # after checkpointing: the recomputed block is the compiled region
        compile_blocks(net, warn)
    return net, ema, posthoc, opt


def check_data(preset: Preset, dataset) -> None:
    """The data must suit the network: latents only for a latent preset, with the channels it expects, and labels
    that index its class table (`check_classes`)."""
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
    check_classes(preset, dataset)


def check_classes(preset: Preset, dataset) -> None:
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
