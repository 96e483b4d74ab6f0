"""Running a study: every variant trained, sampled and scored by the functions behind the commands, resumably
(`variants.VariantRunner` holds the per-kind steps)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from diffit_cli import training
from diffit_cli.ablation.budget import get_budget
from diffit_cli.ablation.plan import (
    default_runs_dir,
    guide_reference,
    resolve_guide_preset,
    resolve_preset,
    select_variants,
)
from diffit_cli.ablation.report import collect_rows, write_results
from diffit_cli.ablation.study import RESULT, SKIP_DIFF, Study, StudyError, Variant, load_study
from diffit_cli.ablation.variants import VariantRunner
from diffit_cli.config import Preset, diff_presets, preset_from_yaml, preset_to_dict
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress
from diffit_cli.fid.extractors import (
    INCEPTION,
    TEST_EXTRACTOR,
    check_weights_at_hand,
    inception_weights_cache_path,
    register_test_extractor,
)
from diffit_cli.fileio import read_json, write_json


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
        if requested == TEST_EXTRACTOR:
            register_test_extractor()
        return requested
    if get_budget(budget).offline_extractor and not have_weights and not inception_weights_cache_path().is_file():
        return register_test_extractor()
    return INCEPTION


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
    guide_checkpoint: str | None = None,
    feature_extractor: str | None = None,
    inception_weights: Path | str | None = None,
    trackers: training.TrackerSpec | None = None,
    progress: Progress | None = None,
) -> StudyResult:
    """Run (or resume) a study; returns its rows and writes results.{md,csv,json} and plots into the study dir.

    `only`: variant names to run (results still list every finished variant). `checkpoint`: for `sample`
    studies, a trained network to sample instead of training the base (a `.pt`, `.safetensors` or REPO:FILE).
    `guide_checkpoint`: the guiding network of the variants that autoguide (`sample.guidance.mode=auto`) instead of
    the one the study's `guide:` section trains in `<dir>/guide` (before the first such variant).
    `inception_weights`: a local Inception weights file (offline machines; also lifts the tiny budget's fallback to
    the offline extractor). `trackers`: log each trained variant as its own tracker run, grouped by the study
    (its `name` and `group` are set per variant). `progress` receives `diffit_cli.events`: Messages for each variant
    (start, skipped, done), stage and curve point (structured in `data`), and the training and sampling runs' own
    events."""
    study = load_study(study) if isinstance(study, (str, Path)) else study
    get_budget(budget)
    sdir = Path(runs_dir) if runs_dir is not None else default_runs_dir(study, budget)
    selected = select_variants(study, only)
    _check_sample_flags(study, checkpoint=checkpoint, guide_checkpoint=guide_checkpoint)
    guide = guide_reference(study, sdir, guide_checkpoint)
    presets = {v.name: resolve_preset(study, v, budget, overrides, guide) for v in study.variants}
    base = resolve_preset(study, None, budget, overrides, guide)
    weights = Path(inception_weights).expanduser() if inception_weights is not None else None
    extractor = _study_extractor(sdir, study, budget, feature_extractor, weights)
    if trackers is not None:
        training.tracking.resolve_trackers(trackers.log_with)  # a missing tracker package: say so before training
    runner = VariantRunner(study, budget, overrides, sdir, extractor, checkpoint, progress, weights, trackers)
    if runner.main:
        write_json(
            sdir / "study.json", {"study": study.name, "budget": budget, "extractor": extractor, "base": study.base}
        )
    result = StudyResult(study.name, budget, sdir, extractor, [])
    todo = _unfinished(runner, selected, presets, result)
    if study.metric == "fid" and todo and runner.main:
        runner.reference(base)  # before any training: a missing reference or extractor fails now, not in hours
    ckpt = weights_preset = None
    if study.kind == "sample" and todo:
        ckpt, weights_preset = runner.base_checkpoint(base)
        if guide_checkpoint is None and any(_trained_guide(presets[v.name], guide) for v in todo):
            runner.train_guide(resolve_guide_preset(study, budget, overrides), guide)
    for i, v in enumerate(todo):
        _run_variant(runner, v, f"{i + 1}/{len(todo)}", presets[v.name], ckpt, weights_preset, base)
        result.ran.append(v.name)
    runner.state.wait_for_everyone()
    result.rows = collect_rows(study, sdir)
    if runner.main:
        result.files = write_results(study, budget, sdir, result.rows, extractor)
    return result


def _run_variant(
    runner: VariantRunner,
    v: Variant,
    position: str,
    preset: Preset,
    ckpt: str | None,
    weights_preset: Preset | None,
    base: Preset,
) -> None:
    """One variant's steps, then its result.json; announced at the start and the end."""
    runner.emit(
        Message(f"variant {v.name} ({position})", data={"event": "variant", "variant": v.name, "status": "start"})
    )
    started = time.time()
    payload = runner.run_variant(v, preset, runner.dir / v.name, ckpt, weights_preset, base)
    value = runner.record(v, preset, payload, started).get("value")
    runner.emit(
        Message(
            f"variant {v.name}: done" + (f" ({value:.4g})" if isinstance(value, float) else ""),
            data={"event": "variant", "variant": v.name, "status": "done", "value": value},
        )
    )


def _check_sample_flags(study: Study, **given: str | None) -> None:
    """--checkpoint and --guide-checkpoint name networks to sample: only sample studies take them."""
    for name, value in given.items():
        if value is not None and study.kind != "sample":
            raise StudyError(
                f"--{name.replace('_', '-')} is for studies that only sample (cfg-scale, guidance); {study.name!r} "
                "trains its variants"
            )


def _trained_guide(preset: Preset, guide: str | None) -> bool:
    """Whether this variant autoguides with the guide the study trains (not one its own overrides name)."""
    g = preset.sample.guidance
    return g.mode == "auto" and guide is not None and g.guide == guide


def _study_extractor(sdir: Path, study: Study, budget: str, requested: str | None, weights: Path | None) -> str | None:
    """The feature extractor of an FID study (None for other metrics): the one study.json pinned, else the requested
    or budget's choice; checked to be usable before any work."""
    pinned = _check_dir(sdir, study, budget, requested)
    extractor = choose_extractor(budget, requested or pinned, weights is not None) if study.metric == "fid" else None
    check_weights_at_hand(extractor, weights)  # the file given exists; Inception offline is cached
    return extractor


def _unfinished(
    runner: VariantRunner, selected: list[Variant], presets: dict[str, Preset], result: StudyResult
) -> list[Variant]:
    """The selected variants without a result.json; the finished ones (checked against their preset) are skipped,
    listed in `result.skipped` and announced."""
    todo = []
    for v in selected:
        done = read_json(runner.dir / v.name / RESULT)
        if done is None:
            todo.append(v)
            continue
        _same_preset(done, presets[v.name], runner.dir / v.name)
        result.skipped.append(v.name)
        runner.emit(
            Message(
                f"variant {v.name}: finished before, skipped",
                data={"event": "variant", "variant": v.name, "status": "skipped", "value": done.get("value")},
            )
        )
    return todo


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
