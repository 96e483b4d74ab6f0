"""Experiment trackers through Accelerate's tracker API (`Accelerator(log_with=...)`, `init_trackers`, `log`):
TensorBoard, Weights & Biases, MLflow, Aim, Comet. `log.jsonl` stays the source of truth; the trackers get the same
scalars and the preview grids. Each tracker's run id is kept in `<run>/trackers.json`, so a resumed run continues
the same tracker run (TensorBoard: the same folder, `<run>/trackers/<project>/`). A tracker that cannot start (Comet
online without an API key, an MLflow store it refuses) stops the run before training with one line."""

from __future__ import annotations

import importlib.util
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffit_cli.errors import DiffitError
from diffit_cli.fileio import read_json, write_json

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml")
_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "aim": ("aim",),
    "comet_ml": ("comet_ml",),
}
IDS_FILE = "trackers.json"  # {tracker: run id} of this run folder
LOG_DIR = "trackers"  # Accelerate's logging_dir: TensorBoard event files, Aim's repository


@dataclass(frozen=True)
class TrackerSpec:
    """Which trackers a training run logs to, and how its tracker run is named and grouped."""

    log_with: tuple[str, ...] = ()  # names from TRACKERS, or "all" (every installed one)
    project: str = "diffit"  # W&B / Comet project, MLflow experiment, TensorBoard sub-folder
    name: str | None = None  # the tracker run's name (default: the run folder's name)
    group: str | None = None  # a study: its variants' runs are grouped under it (W&B group, MLflow tag, Aim experiment)


def installed(name: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in _MODULES[name])


def resolve_trackers(log_with) -> list[str]:
    """`--log-with` values (repeatable or comma-separated; `all` = every installed tracker) → tracker names;
    an unknown name or a missing package is a one-line error naming the extra to install."""
    names: list[str] = []
    for value in log_with or ():
        for n in (p.strip().lower() for p in str(value).split(",") if p.strip()):
            if n == "all":
                found = [t for t in TRACKERS if installed(t)]
                if not found:
                    raise DiffitError(
                        "--log-with all found no tracker package; install one, e.g. "
                        "pip install 'diffit-cli[tensorboard]' (or [wandb], [mlflow], [aim], [comet_ml])"
                    )
                names += found
            elif n not in TRACKERS:
                raise DiffitError(f"unknown tracker {n!r} for --log-with; choose from {', '.join(TRACKERS)} or all")
            elif not installed(n):
                raise DiffitError(f"--log-with {n} needs the {n} package: pip install 'diffit-cli[{n}]'")
            else:
                names.append(n)
    return list(dict.fromkeys(names))


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested preset dict → {"model.channels": "[32, 64]", ...}: scalars only (TensorBoard's hparams need them)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def start_trackers(accelerator, run_dir: Path, spec: TrackerSpec, config: dict) -> None:
    """`init_trackers` with each tracker's stored run id (a resume continues that run), then record the ids."""
    if not accelerator.log_with:
        return
    ids = read_json(run_dir / IDS_FILE) or {}
    name = spec.name or run_dir.name
    init = {
        "wandb": {
            "id": ids.get("wandb") or secrets.token_hex(4),
            "resume": "allow",
            "name": name,
            "group": spec.group,
            "dir": str(run_dir),
        },
        "mlflow": {
            "run_id": ids.get("mlflow"),
            "run_name": name,
            "tags": {"study": spec.group} if spec.group else None,
        },
        "aim": {"run_hash": ids.get("aim"), "experiment": spec.group or spec.project},
        "comet_ml": {"experiment_key": ids.get("comet_ml")},
    }
    init = {t: {k: v for k, v in kw.items() if v is not None} for t, kw in init.items()}
    try:
        accelerator.init_trackers(spec.project, init_kwargs=init)
        for t in accelerator.trackers:
            _store_config(t, name, config)
    except Exception as e:  # the tracker's own reason (no API key, no usable store), not a traceback
        raise DiffitError(f"--log-with: a tracker did not start: {type(e).__name__}: {e}") from e
    if accelerator.is_main_process:
        found = {t.name: _run_id(t) for t in accelerator.trackers}
        write_json(run_dir / IDS_FILE, {**ids, **{k: v for k, v in found.items() if v is not None}})


def _store_config(tracker, name: str, config: dict) -> None:
    """The run config (what `init_trackers(config=...)` does), and the run name where Accelerate sets another."""
    if tracker.name == "mlflow":
        import mlflow  # an optional package (the [mlflow] extra), present when this tracker runs

        # MLflow params are write-once: a resume with more kimg raised "Changing param values is not allowed".
        # A resumed run keeps its first values as params; new keys become params, changed values tags
        old = tracker.active_run.data.params
        changed = {k: str(v) for k, v in config.items() if k in old and old[k] != str(v)}
        if changed:
            mlflow.set_tags(changed)
        config = {k: v for k, v in config.items() if k not in old}
    elif tracker.name == "aim":
        tracker.writer.name = name  # Accelerate names the Aim run after the project
    elif tracker.name == "comet_ml":
        tracker.writer.set_name(name)  # Accelerate names none (offline, Comet makes one up at upload)
    tracker.store_init_configuration(config)


def _run_id(tracker) -> str | None:
    """The id that resumes this tracker's run (None for TensorBoard: its folder is the id)."""
    if tracker.name == "wandb":
        return tracker.run.id
    if tracker.name == "mlflow":
        return tracker.active_run.info.run_id
    if tracker.name == "aim":
        return tracker.writer.hash
    if tracker.name == "comet_ml":
        return tracker.writer.get_key()
    return None


def log_scalars(accelerator, group: str, rec: dict, step: int) -> None:
    """The numbers of a log.jsonl record as `<group>/<key>` scalars at `step` (main process; no-op without trackers)."""
    if accelerator.trackers:
        accelerator.log(
            {
                f"{group}/{k}": v
                for k, v in rec.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            },
            step=step,
        )


def log_image(accelerator, name: str, png: Path, step: int) -> None:
    """A sample grid (PNG file) to the trackers (all five take images)."""
    if not accelerator.trackers:
        return
    image = np.asarray(Image.open(png).convert("RGB"))  # (H, W, 3) uint8
    for t in accelerator.trackers:
        if t.name == "tensorboard":
            t.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif t.name == "wandb":
            t.log_images({name: image[None]}, step=step)
        elif t.name == "aim":
            t.log_images({name: image}, step=step)
        elif t.name == "mlflow":  # Accelerate's MLflowTracker has no log_images: MLflow's step-keyed images (>= 2.12)
            import mlflow  # (same reason)

            mlflow.log_image(image, key=name, step=step)
        else:  # nor has its CometMLTracker
            t.writer.log_image(str(png), name=name, step=step)
