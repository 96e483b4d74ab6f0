"""An exported model folder: its layout and reading it back. Weights are safetensors, the preset YAML, the network's
description JSON: nothing in the folder needs unpickling, so tools without diffit's code can read every file."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from diffit_cli.config import Preset, preset_from_yaml
from diffit_cli.errors import DiffitError

MODEL_FILE = "model.safetensors"
PRESET_FILE = "preset.yaml"
CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.png"
CARD_FILE = "README.md"
FOLDER_FILES = (MODEL_FILE, PRESET_FILE, CONFIG_FILE, SAMPLES_FILE, CARD_FILE)
FORMAT = "diffit-model"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ModelFolderError(DiffitError):
    """A folder that is not a complete exported model."""


def is_model_folder(path: Path | str) -> bool:
    """Whether `path` is a folder holding exported weights (`model.safetensors`)."""
    return (Path(path) / MODEL_FILE).is_file()


def read_config(folder: Path | str) -> dict:
    """The folder's `config.json` (what network, preset, dtype and VAE the weights are)."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(
            f"{str(path)!r} is missing or unreadable ({type(e).__name__}); export the model again"
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(f'{str(path)!r} does not describe a diffit model (no "format": "{FORMAT}")')
    return config


def read_model_folder(folder: Path | str, preset: Preset | None = None) -> tuple[dict, Preset, dict]:
    """(weights, preset, config) of an exported folder. The weights keep the dtype they were exported in (loading
    them into a network casts them); `preset` replaces the folder's `preset.yaml` when given."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise ModelFolderError(
            f"{str(folder)!r} is a folder without {MODEL_FILE}: give an exported model folder (diffit export), "
            "a .pt/.safetensors file, REPO:FILE or a Hub repository OWNER/NAME"
        )
    config = read_config(folder)
    if preset is None:
        try:
            preset = preset_from_yaml((folder / PRESET_FILE).read_text(), str(folder / PRESET_FILE))
        except OSError:
            raise ModelFolderError(f"{str(folder / PRESET_FILE)!r} is missing; export the model again") from None
    try:
        weights = load_file(str(folder / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{str(folder / MODEL_FILE)!r} is not a readable safetensors file ({e})") from None
    return weights, preset, config
