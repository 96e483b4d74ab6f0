"""Running a study: every variant trained, sampled and scored by the functions behind the commands, resumably."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from diffit_cli import __version__, training
from diffit_cli import metrics as M  # through the module: tests and users may swap its functions
from diffit_cli.ablation.attention import attention_maps, save_map_pngs
from diffit_cli.ablation.budget import get_budget
from diffit_cli.ablation.plan import default_runs_dir, resolve_preset, select_variants
from diffit_cli.ablation.report import collect_rows, paper_difference, write_results
from diffit_cli.ablation.study import RESULT, SKIP_DIFF, Study, StudyError, Variant, load_study
from diffit_cli.build import build_diffusion, count_config_parameters
from diffit_cli.checkpoint import CheckpointError, latest_checkpoint, load_snapshot
from diffit_cli.config import (
    Preset,
    apply_overrides,
    diff_presets,
    dump_preset,
    preset_from_yaml,
    preset_to_dict,
    validate_preset,
)
from diffit_cli.downloads import offline
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress, main_process_only
from diffit_cli.fid.reference import preset_reference
from diffit_cli.fileio import atomic_write_bytes, read_json, write_json
from diffit_cli.precision import sampling_precision
from diffit_cli.preemption import Preempted
from diffit_cli.sampling.run import resolve_weights, run_sample


@dataclass
class StudyResult:
    study: str
    budget: str
    study_dir: Path
    extractor: str | None
    rows: list[dict]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def choose_extractor(budget: str, requested: str | None = None, have_weights: bool = False) -> str:
    """Inception (`inception-v3-compat`) when its weights are on this machine (cached or `have_weights`) or the
    budget is small/paper; at the tiny/test budgets without them, the offline stand-in `diffit-randconv-v1` (results
    say so)."""

    if requested:
        if requested == M.TEST_EXTRACTOR:
            M.register_test_extractor()
        return requested
    if get_budget(budget).offline_extractor and not have_weights and not M.inception_weights_cache_path().is_file():
        return M.register_test_extractor()
    return M.INCEPTION


class _Runner:
    """One `run_study` call: shared state (directory, extractor, reference, process role) and the per-kind steps."""

    def __init__(
        self,
        study: Study,
        budget: str,
        overrides: list[str] | None,
        sdir: Path,
        extractor: str | None,
        checkpoint: str | None,
        progress: Progress | None,
        inception_weights: Path | None = None,
        trackers: training.TrackerSpec | None = None,
    ):

        self.study, self.budget, self.overrides, self.dir = study, budget, list(overrides or []), sdir
        self.checkpoint = checkpoint
        self.trackers = trackers
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.main = self.state.is_main_process
        self.emit = main_process_only(progress, self.main)
        self.extractor, self.inception_weights = extractor, inception_weights
        self._reference: tuple[str, str] | None = None
        self.base_kimg: float | None = None  # sample studies: training of the sampled network (None: --checkpoint)

    def stage(self, stage: str, text: str, **data) -> None:
        self.emit(Message(f"  {text}", data={"event": "stage", "stage": stage, **data}))

    # ---------------------------------------------------------------- shared pieces
    def sample_and_score(
        self,
        ckpt: Path | str,
        out: Path,
        preset: Preset,
        sample_overrides: list[str],
        weights_preset: Preset | None = None,
    ) -> dict:
        """`run_sample` (resumable NPZ of eval.num_samples seeds) then `compute_metrics` FID against the reference."""

        n = preset.eval.num_samples
        precision = sampling_precision(preset, self.state.device)
        self.stage("sample", f"sample {n} images", images=n)
        run_sample(
            str(ckpt),
            list(range(n)),
            out,
            preset=weights_preset,
            overrides=sample_overrides,
            precision=precision,
            batch=preset.sample.batch,
            progress=self.emit,
            force=True,
        )  # the study owns these samples: a retrained network replaces them
        if not self.main:
            return {}
        ref, ref_desc = self.reference(preset)
        self.stage("metrics", f"metrics ({self.extractor})", extractor=self.extractor)
        r = M.compute_metrics(
            out,
            ref,
            metrics=("fid",),
            feature_extractor=self.extractor,
            batch=preset.eval.batch,
            inception_weights=self.inception_weights,
        )
        return {
            "value": r["fid"],
            "num_samples": r["num_samples"],
            "reference": ref_desc,
            "precision": precision,
            "notes": r["notes"],
        }

    def reference(self, preset: Preset) -> tuple[str, str]:
        """FID reference: `eval.reference`, or for `train` the cached statistics of the training data with this
        extractor (at most the budget's `reference_images` of them)."""
        if self._reference is None:
            self._reference = preset_reference(
                preset,
                feature_extractor=self.extractor,
                batch=preset.eval.batch,
                limit=get_budget(self.budget).reference_images,
                inception_weights=self.inception_weights,
                progress=self.emit,
            )
        return self._reference

    def record(self, variant: Variant, preset: Preset, payload: dict, started: float) -> dict:
        """Write the variant's result.json (atomically, last: its existence means finished)."""

        params = count_config_parameters(preset.model)
        value, paper = payload.get("value"), variant.paper
        res = {
            "study": self.study.name,
            "variant": variant.name,
            "label": variant.label,
            "group": variant.group,
            "x": variant.x,
            "metric": self.study.metric,
            "value": value,
            "paper": paper,
            "difference": paper_difference(value, paper, self.budget, self.extractor),
            "extractor": self.extractor if self.study.metric == "fid" else None,
            "budget": self.budget,
            "parameters": params,
            "seconds": round(time.time() - started, 1),
            "paper_note": variant.paper_note,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "diffit_version": __version__,
            "preset": dump_preset(preset),
            **{k: v for k, v in payload.items() if k != "value"},
        }
        if self.main:
            write_json(self.dir / variant.name / RESULT, res)
        return res

    # ---------------------------------------------------------------- kinds
    def train(self, preset: Preset, run_dir: Path, label: str):

        self.stage(
            "train", f"train to {preset.train.total_kimg:g} kimg", variant=label, total_kimg=preset.train.total_kimg
        )
        # each variant (its run folder) is its own tracker run, grouped by the study
        trackers = (
            dataclasses.replace(self.trackers, name=run_dir.name, group=self.study.name)
            if self.trackers and self.trackers.log_with
            else None
        )
        state = training.train(preset, run_dir, trackers=trackers, progress=self.emit)
        # a run cut short is not the variant's result: the study stops (the rerun resumes the training)
        if state.preempted:
            raise Preempted(state.preempted, f"checkpointing {label} at {state.nimg / 1000:g} kimg")
        if state.stopped:
            raise StudyError(
                f"{label}: training stopped at {state.nimg / 1000:g} kimg ({state.stopped}, "
                "train.on_spike=stop); no result is recorded for it"
            )
        return state

    def run_train(self, v: Variant, preset: Preset, vdir: Path) -> dict:

        state = self.train(preset, vdir, v.name)
        out = self.sample_and_score(latest_checkpoint(vdir), vdir / "samples.npz", preset, [])
        return {**out, "kimg": state.nimg / 1000}

    def run_curve(self, v: Variant, preset: Preset, vdir: Path) -> dict:
        """Train to each of `curve_points` equal shares of total_kimg and score there. `train` stops at the point
        and snapshots it, so `latest` is the point's checkpoint, also after an interruption (a point's JSON is
        written once scored; periodic snapshots in between keep long runs safe)."""

        total, n = preset.train.total_kimg, self.study.points(self.budget)
        points = []
        for i in range(1, n + 1):
            kimg = round(total * i / n, 6)
            pfile = vdir / "points" / f"kimg-{kimg:012.3f}.json"
            done = read_json(pfile)
            if done is None:
                p = validate_preset(apply_overrides(preset_to_dict(preset), [f"train.total_kimg={kimg}"]), preset.name)
                state = self.train(p, vdir, f"{v.name} to {kimg:g} kimg")
                out = self.sample_and_score(latest_checkpoint(vdir), vdir / f"samples-kimg{kimg:g}.npz", preset, [])
                done = {
                    "kimg": state.nimg / 1000,
                    "value": out.get("value"),
                    "reference": out.get("reference"),
                    "notes": out.get("notes", []),
                }
                if self.main:
                    write_json(pfile, done)
                self.emit(
                    Message(
                        f"  FID at {done['kimg']:g} kimg: {done['value']:.4g}"
                        if done["value"] is not None
                        else f"  FID at {done['kimg']:g} kimg: –",
                        data={"event": "point", "variant": v.name, **done},
                    )
                )
            points.append(done)
        last = points[-1]
        return {
            "value": last["value"],
            "kimg": last["kimg"],
            "reference": last.get("reference"),
            "num_samples": preset.eval.num_samples,
            "notes": last.get("notes", []),
            "points": [{"kimg": p["kimg"], "value": p["value"]} for p in points],
        }

    def base_checkpoint(self, base: Preset) -> tuple[str, Preset | None]:
        """The network a sample study samples: --checkpoint, or the base preset trained once in <dir>/base."""

        if self.checkpoint is not None:
            path = resolve_weights(self.checkpoint)
            try:
                load_snapshot(path)
                return str(path), None
            except CheckpointError as e:
                if "carries no preset" not in str(e):
                    raise
                return str(path), base  # a released weight file: architecture from the base preset
        state = self.train(base, self.dir / "base", "base")
        self.base_kimg = state.nimg / 1000
        return str(latest_checkpoint(self.dir / "base")), None

    def run_sample(
        self, v: Variant, preset: Preset, vdir: Path, ckpt: str, weights_preset: Preset | None, base: Preset
    ) -> dict:
        a, b = preset_to_dict(base), preset_to_dict(preset)
        keys = [k for k in diff_presets(a, b) if k.startswith(("sample.", "eval."))]
        sets = []
        for k in keys:
            node: Any = b
            for part in k.split("."):
                node = node[part]
            sets.append(f"{k}={json.dumps(node)}")
        out = self.sample_and_score(ckpt, vdir / "samples.npz", preset, sets, weights_preset)
        return {**out, "checkpoint": ckpt, "kimg": self.base_kimg}

    def run_attention(self, v: Variant, preset: Preset, vdir: Path) -> dict:

        state = self.train(preset, vdir, v.name)
        if not self.main:
            return {}
        self.stage("attention", "attention maps")
        net, _ = load_snapshot(latest_checkpoint(vdir), device="cpu")
        maps = attention_maps(
            net,
            build_diffusion(preset.diffusion, preset.model),
            preset,
            self.study.timesteps,
            self.study.attention_layer,
        )
        buf = io.BytesIO()
        np.savez(buf, **{k: v_ for k, v_ in maps.items() if isinstance(v_, np.ndarray)})

        atomic_write_bytes(vdir / "attention.npz", buf.getvalue())
        save_map_pngs(vdir / "attention", maps)
        return {
            "value": maps["change"],
            "kimg": state.nimg / 1000,
            "layer": maps["layer"],
            "timesteps": list(self.study.timesteps),
        }


def _check_extractor_available(extractor: str | None, inception_weights: Path | None) -> None:

    if inception_weights is not None:
        if not inception_weights.is_file():
            raise StudyError(f"--inception-weights {str(inception_weights)!r} is not a file")
        return

    if extractor == M.INCEPTION and offline() and not M.inception_weights_cache_path().is_file():
        raise StudyError(
            f"FID needs the Inception weights, which are not at {M.inception_weights_cache_path()} and "
            "downloads are off (HF_HUB_OFFLINE/DIFFIT_OFFLINE); copy them there (see `diffit eval-fid "
            f"--help`), or pass --feature-extractor {M.TEST_EXTRACTOR} for a smoke run"
        )


def _check_dir(sdir: Path, study: Study, budget: str, extractor: str | None) -> str | None:
    """study.json pins a directory to one budget and one feature extractor; returns the pinned extractor."""
    info = read_json(sdir / "study.json")
    if info is None:
        return None
    if info.get("budget") != budget:
        raise StudyError(
            f"{sdir} holds the {info.get('budget')!r} budget of study {study.name!r}, not {budget!r}; "
            "pass another --runs-dir"
        )
    pinned = info.get("extractor")
    if extractor and pinned and extractor != pinned:
        raise StudyError(
            f"{sdir} was scored with feature extractor {pinned}; mixing extractors makes FIDs "
            "incomparable (pass another --runs-dir or the same extractor)"
        )
    return pinned


def run_study(
    study: Study | str,
    budget: str = "tiny",
    *,
    overrides: list[str] | None = None,
    runs_dir: Path | str | None = None,
    only: list[str] | None = None,
    checkpoint: str | None = None,
    feature_extractor: str | None = None,
    inception_weights: Path | str | None = None,
    trackers: training.TrackerSpec | None = None,
    progress: Progress | None = None,
) -> StudyResult:
    """Run (or resume) a study; returns its rows and writes results.{md,csv,json} and plots into the study dir.

    `only`: variant names to run (results still list every finished variant). `checkpoint`: for `sample`
    studies, a trained network to sample instead of training the base (a `.pt`, `.safetensors` or REPO:FILE).
    `inception_weights`: a local Inception weights file (offline machines; also lifts the tiny budget's fallback to
    the offline extractor). `trackers`: log each trained variant as its own tracker run, grouped by the study
    (its `name` and `group` are set per variant). `progress` receives `diffit_cli.events`: Messages for each variant
    (start, skipped, done), stage and curve point (structured in `data`), and the training and sampling runs' own
    events."""
    study = load_study(study) if isinstance(study, (str, Path)) else study
    get_budget(budget)
    sdir = Path(runs_dir) if runs_dir is not None else default_runs_dir(study, budget)
    selected = select_variants(study, only)
    if checkpoint is not None and study.kind != "sample":
        raise StudyError(
            f"--checkpoint is for studies that only sample (cfg-scale); {study.name!r} trains its variants"
        )
    presets = {v.name: resolve_preset(study, v, budget, overrides) for v in study.variants}
    base = resolve_preset(study, None, budget, overrides)
    pinned = _check_dir(sdir, study, budget, feature_extractor)
    weights = Path(inception_weights).expanduser() if inception_weights is not None else None
    extractor = (
        choose_extractor(budget, feature_extractor or pinned, weights is not None) if study.metric == "fid" else None
    )
    _check_extractor_available(extractor, weights)
    if trackers is not None:
        training.tracking.resolve_trackers(trackers.log_with)  # a missing tracker package: say so before training
    runner = _Runner(study, budget, overrides, sdir, extractor, checkpoint, progress, weights, trackers)
    if runner.main:
        write_json(
            sdir / "study.json", {"study": study.name, "budget": budget, "extractor": extractor, "base": study.base}
        )
    result = StudyResult(study.name, budget, sdir, extractor, [])
    todo = []
    for v in selected:
        done = read_json(sdir / v.name / RESULT)
        if done is not None:
            _same_preset(done, presets[v.name], sdir / v.name)
            result.skipped.append(v.name)
            runner.emit(
                Message(
                    f"variant {v.name}: finished before, skipped",
                    data={"event": "variant", "variant": v.name, "status": "skipped", "value": done.get("value")},
                )
            )
        else:
            todo.append(v)
    if study.metric == "fid" and todo and runner.main:
        runner.reference(base)  # before any training: a missing reference or extractor fails now, not in hours
    ckpt = weights_preset = None
    if study.kind == "sample" and todo:
        ckpt, weights_preset = runner.base_checkpoint(base)
    for i, v in enumerate(todo):
        preset, vdir = presets[v.name], sdir / v.name
        runner.emit(
            Message(
                f"variant {v.name} ({i + 1}/{len(todo)})",
                data={"event": "variant", "variant": v.name, "status": "start"},
            )
        )
        started = time.time()
        if study.kind == "train":
            payload = runner.run_train(v, preset, vdir)
        elif study.kind == "curve":
            payload = runner.run_curve(v, preset, vdir)
        elif study.kind == "sample":
            payload = runner.run_sample(v, preset, vdir, ckpt, weights_preset, base)
        else:
            payload = runner.run_attention(v, preset, vdir)
        res = runner.record(v, preset, payload, started)
        result.ran.append(v.name)
        value = res.get("value")
        runner.emit(
            Message(
                f"variant {v.name}: done" + (f" ({value:.4g})" if isinstance(value, float) else ""),
                data={"event": "variant", "variant": v.name, "status": "done", "value": value},
            )
        )
    runner.state.wait_for_everyone()
    result.rows = collect_rows(study, sdir)
    if runner.main:
        result.files = write_results(study, budget, sdir, result.rows, extractor)
    return result


def _same_preset(done: dict, preset: Preset, vdir: Path) -> None:
    try:
        old = preset_to_dict(preset_from_yaml(done["preset"], str(vdir / RESULT)))
    except (KeyError, DiffitError):
        return
    changed = [k for k in diff_presets(old, preset_to_dict(preset)) if k not in SKIP_DIFF]
    if changed:
        raise StudyError(
            f"variant {vdir.name!r} in {vdir.parent} was finished with other settings (changed: "
            f"{', '.join(changed)}); rerun with the same --set values, pass another --runs-dir, or "
            f"delete {vdir} to redo it"
        )
