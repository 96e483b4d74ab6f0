"""`diffit export` as a function: a checkpoint → a self-describing model folder (safetensors weights, preset,
`config.json`, a sample grid, a model card), written into a temporary sibling folder and renamed into place, so the
folder appears whole or not at all. Optionally pushed to the Hub (`sharing.hub`)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save

from diffit_cli import __version__
from diffit_cli.build import count_parameters
from diffit_cli.checkpoint import load_checkpoint, read_snapshot, snapshot_network, strip_prefixes, trained_weights
from diffit_cli.config import Preset, dump_preset, preset_from_yaml, preset_to_dict, validate_preset
from diffit_cli.curves import LOG, read_log, taken_path
from diffit_cli.data import open_source
from diffit_cli.data.catalog import is_named
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress
from diffit_cli.fileio import atomic_write_bytes, write_json
from diffit_cli.sampling.run import parse_seeds, resolve_weights, run_sample
from diffit_cli.sharing.card import SAMPLE_SEEDS, CardFacts, render_card
from diffit_cli.sharing.folder import (
    CARD_FILE,
    CONFIG_FILE,
    DTYPES,
    FORMAT,
    MODEL_FILE,
    PRESET_FILE,
    SAMPLES_FILE,
)
from diffit_cli.sharing.hub import check_push, push_folder

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse, before any work, an OUT_DIR that is a file, or a folder holding anything unless `force`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffitError(f"{str(out_dir)!r} is a file; give a folder to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise DiffitError(
            f"{str(out_dir)!r} exists and is not empty; choose another folder or pass --force to replace it"
        )


def read_source(ckpt: str, preset: Preset | None, raw: bool) -> tuple[Path, dict, Preset, dict | None]:
    """(path, weights, preset, training state or None) of the checkpoint to export; a `.pt` is read once."""
    path = resolve_weights(ckpt)
    if path.is_file() and path.suffix != ".safetensors":
        state = load_checkpoint(path)
        preset = preset if preset is not None else preset_from_yaml(state["preset"], str(path))
        weights = strip_prefixes(state[trained_weights(state, path) if raw else "ema"])
        return path, weights, preset, {"kimg": state.get("nimg", 0) / 1000, "step": state.get("step", 0)}
    weights, preset = read_snapshot(path, preset=preset, ema=not raw)
    return path, weights, preset, None


def fid_points(path: Path, kimg: float | None) -> list[dict]:
    """The FID points of the run the checkpoint belongs to (`<run>/checkpoints/ckpt-*.pt` → `<run>/log.jsonl`),
    along the path the run took, up to the checkpoint's kimg."""
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if kimg is None or not (run_dir / LOG).is_file():
        return []
    points = taken_path([r for r in read_log(run_dir) if r.get("event") == "fid" and r.get("fid") is not None])
    return [r for r in points if r["kimg"] <= kimg + 1e-9]


def without_guide(preset: Preset, progress: Progress | None) -> Preset:
    """The preset to export: autoguidance's guide is another network, a path on this machine that the folder does
    not carry, so an autoguided preset is exported without guidance (and says so)."""
    guidance = preset.sample.guidance
    if guidance.mode != "auto":
        return preset
    raw = preset_to_dict(preset)
    raw["sample"]["guidance"].update(mode="cfg", scale=1.0, guide=None)
    if progress is not None:
        progress(
            Message(
                f"the preset autoguides with {guidance.guide!r}, which the folder does not carry: exported without "
                "guidance; sample it with --guidance auto --guide-ckpt GUIDE",
                "warning",
            )
        )
    return validate_preset(raw, "exported preset")


def data_facts(preset: Preset) -> dict:
    """The training data as the preset names it, with the source's fingerprint when it is at hand without a
    download (built-in shapes, a local folder, zip, `.npz` or latent shards)."""
    d = preset.data
    source = f"built-in synthetic shapes (style {d.synthetic})" if d.path is None else f"`{d.path}`"
    facts = {"source": source, "fingerprint": "not at hand at export (the data was not found here)", "images": None}
    if d.path is not None and is_named(d.path):
        facts["fingerprint"] = "not computed at export (a dataset by name is only opened by training)"
        return facts
    try:
        src = open_source(d)
    except (DiffitError, OSError):
        return facts
    facts.update(fingerprint=f"`{src.fingerprint()}`", images=len(src))
    return facts


def model_config(preset: Preset, weights: str, dtype: str, source: Path, training: dict | None) -> dict:
    """`config.json`: what the weights are, for a reader without diffit's code."""
    return {
        "format": FORMAT,
        "format_version": 1,
        "diffit_version": __version__,
        "preset": preset.name,
        "kind": preset.model.kind,
        "model": preset_to_dict(preset)["model"],
        "diffusion": preset.diffusion.kind,
        "space": preset.data.space,
        "resolution": preset.data.resolution,
        "num_classes": preset.model.num_classes,
        "vae": preset.data.vae if preset.data.space == "latent" else None,
        "weights": weights,
        "dtype": DTYPES[dtype],
        "source": {"file": source.resolve().name, **(training or {})},
    }


def export_model(
    ckpt: str,
    out_dir: Path | str,
    *,
    raw: bool = False,
    dtype: str = "fp32",
    preset: Preset | None = None,
    force: bool = False,
    license: str = "apache-2.0",
    push_to_hub: str | None = None,
    private: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Export `ckpt` (a training checkpoint, a `.safetensors` file, REPO:FILE, a folder) to `out_dir`: the EMA
    weights (`raw`: the trained ones) in `dtype`, `preset.yaml`, `config.json`, `samples.png` (seeds 0-15 with the
    preset's sampler, drawn from the exported weights) and `README.md`, the model card. `preset` is needed for
    weight files that carry none. With `push_to_hub` (OWNER/NAME) the folder is then uploaded. Returns {out,
    files, parameters, url}."""
    if dtype not in DTYPES:
        raise DiffitError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    if push_to_hub:
        check_push(push_to_hub)
    path, weights, preset, training = read_source(ckpt, preset, raw)
    preset = without_guide(preset, progress)
    net = snapshot_network(weights, preset, str(path))  # the weights fit the preset's network, checked key by key
    tensors = {k: (v.to(TORCH_DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    facts = CardFacts(
        name=push_to_hub.split("/")[-1] if push_to_hub else out_dir.absolute().name,
        preset=preset,
        parameters=count_parameters(net),
        weights="raw" if raw else "ema",
        dtype=dtype,
        source=path.resolve().name,
        training=training,
        data=data_facts(preset),
        fid=fid_points(path, training["kimg"] if training else None),
        license=license,
        ckpt_ref=push_to_hub or out_dir.absolute().name,
    )
    del net, weights
    _write_folder(out_dir, tensors, facts, model_config(preset, facts.weights, dtype, path, training), progress)
    result = {
        "out": str(out_dir),
        "files": sorted(p.name for p in out_dir.iterdir()),
        "parameters": facts.parameters,
        "url": None,
    }
    if push_to_hub:
        result["url"] = push_folder(out_dir, push_to_hub, private=private)
    return result


def _write_folder(out_dir: Path, tensors: dict, facts: CardFacts, config: dict, progress: Progress | None) -> None:
    """The folder's files, written into a temporary sibling that is renamed over `out_dir` once complete."""
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.export-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # (not mkdtemp: its 0700 would stay on the renamed folder)
    try:
        meta = {"format": "pt", "preset": dump_preset(facts.preset), "diffit_version": __version__}
        atomic_write_bytes(tmp / MODEL_FILE, save(tensors, metadata=meta))
        atomic_write_bytes(tmp / PRESET_FILE, dump_preset(facts.preset).encode())
        write_json(tmp / CONFIG_FILE, config)
        _sample_grid(tmp, progress)
        atomic_write_bytes(tmp / CARD_FILE, render_card(facts).encode())
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sample_grid(folder: Path, progress: Progress | None) -> None:
    """samples.png from the folder's own weights, exactly as the card's `diffit sample` command draws it."""
    with tempfile.TemporaryDirectory(prefix="diffit-export-samples-") as scratch:
        out = Path(scratch) / "samples"
        run_sample(str(folder), parse_seeds(SAMPLE_SEEDS), out, grid=folder / SAMPLES_FILE, progress=progress)


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an existing OUT_DIR (empty, or replaced with --force) goes only after."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
