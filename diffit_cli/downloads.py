"""The switch that turns downloads off: Hub models (the SD-VAE), datasets by name (torchvision, Hugging Face) and
the Inception weights. Offline, each of them fails at once with a message saying where to put the files by hand,
instead of waiting on the network."""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "DIFFIT_OFFLINE")


def offline() -> bool:
    """Whether downloads are off: HF_HUB_OFFLINE or DIFFIT_OFFLINE set to 1/true/yes/on."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_VARIABLES)
