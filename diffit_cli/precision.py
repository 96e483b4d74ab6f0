"""Which precision sampling (and the VAE) runs in: the choices, the check every entry point shares, and the default
a preset implies on a device."""

from __future__ import annotations

import torch

from diffit_cli.config import Preset
from diffit_cli.errors import DiffitError

PRECISIONS = ("fp32", "bf16")  # the network (and VAE) under bf16 autocast, or plain fp32


def check_precision(precision: str, what: str = "precision", error: type[DiffitError] = DiffitError) -> str:
    """`precision` if it is one of `PRECISIONS`; otherwise `error` naming `what` (the flag or setting) and the
    choices."""
    if precision not in PRECISIONS:
        raise error(f"{what} {precision!r}: choose {' or '.join(PRECISIONS)}")
    return precision


def sampling_precision(preset: Preset, device: torch.device | str) -> str:
    """bf16 sampling where training ran bf16 on a GPU; fp32 on the CPU (where bf16 is emulated on most CPUs: ~10×
    slower than fp32)."""
    return "bf16" if preset.train.mixed_precision == "bf16" and torch.device(device).type == "cuda" else "fp32"
