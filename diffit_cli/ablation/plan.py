"""Resolving a study into presets (base + variant overrides + budget) and the plan `--dry-run` shows."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffit_cli.ablation.budget import apply_budget, get_budget
from diffit_cli.ablation.study import RESULT, SKIP_DIFF, Study, StudyError, Variant, load_study
from diffit_cli.build import build_network, count_parameters
from diffit_cli.checkpoint import CHECKPOINT_DIR, LATEST
from diffit_cli.config import Preset, apply_overrides, diff_presets, preset_to_dict, read_preset_file, validate_preset


def resolve_preset(
    study: Study,
    variant: Variant | None,
    budget: str = "tiny",
    overrides: list[str] | None = None,
    guide: str | None = None,
) -> Preset:
    """The preset a variant trains with (variant None: the study's base) at `budget`, after user `--set` values.

    Order: base preset → `sections` → study overrides → variant overrides → budget shrink → the study's
    per-budget overrides → user overrides (so a user can pin anything, e.g. --set data.path=cifar10.zip). A variant
    that autoguides (`sample.guidance.mode=auto`) without naming its guide gets `guide` (`guide_reference`)."""
    vname = variant.name if variant is not None else "base"
    raw = _resolve_raw(study, variant.overrides if variant is not None else [], budget, overrides)
    guidance = raw.setdefault("sample", {}).setdefault("guidance", {})
    if guidance.get("mode") == "auto" and not guidance.get("guide"):
        if guide is None:
            raise StudyError(
                f"variant {vname!r} of study {study.name!r} autoguides (sample.guidance.mode=auto) but names no "
                "guiding network: give the study a guide: section or pass --guide-checkpoint"
            )
        guidance["guide"] = guide
    return _validate(study, raw, vname, budget)


def resolve_guide_preset(study: Study, budget: str = "tiny", overrides: list[str] | None = None) -> Preset:
    """The guiding network's preset: the base with the study's `guide.overrides` (before the budget shrink, so a
    narrower guide stays narrower by the same ratio, down to the budget's narrowest width, which both may reach),
    trained for `guide.fraction` of the resolved training length.
    The guide samples nothing itself: its own guidance is reset to none."""
    if study.guide is None:
        raise StudyError(f"study {study.name!r} has no guide: section")
    raw = _resolve_raw(study, study.guide.overrides, budget, overrides)
    train = raw.setdefault("train", {})
    train["total_kimg"] = float(train["total_kimg"]) * study.guide.fraction
    for key in ("report_kimg", "snapshot_kimg"):
        if train.get(key):
            train[key] = min(float(train[key]), train["total_kimg"])
    raw.setdefault("sample", {})["guidance"] = {}
    return _validate(study, raw, "guide", budget)


def guide_reference(study: Study, sdir: Path, guide_checkpoint: str | None = None) -> str | None:
    """What autoguiding variants sample with: `--guide-checkpoint`, else the latest checkpoint of the guide the
    study trains in `<dir>/guide` (None: neither)."""
    if guide_checkpoint is not None:
        return guide_checkpoint
    if study.guide is None:
        return None
    return str(sdir / "guide" / CHECKPOINT_DIR / LATEST)


def _resolve_raw(study: Study, variant_overrides: list[str], budget: str, overrides: list[str] | None) -> dict:
    b = get_budget(budget)
    raw, _ = read_preset_file(study.base)
    for section, value in study.sections.items():
        raw[section] = copy.deepcopy(value)
    raw = apply_overrides(raw, study.overrides)
    raw = apply_overrides(raw, variant_overrides)
    raw = apply_budget(raw, b)
    raw = apply_overrides(raw, study.budgets.get(budget, []))
    return apply_overrides(raw, overrides)


def _validate(study: Study, raw: dict, vname: str, budget: str) -> Preset:
    raw["name"] = f"{study.name}-{vname}"
    raw["description"] = f"ablation {study.name} ({study.source}), variant {vname}, budget {budget}"
    return validate_preset(raw, f"study {study.name}, variant {vname}, budget {budget}")


def _changes(base: Preset, other: Preset) -> dict[str, tuple[Any, Any]]:
    a, b = preset_to_dict(base), preset_to_dict(other)

    def get(d: dict, key: str) -> Any:
        for k in key.split("."):
            d = d.get(k) if isinstance(d, dict) else None
        return d

    return {k: (get(a, k), get(b, k)) for k in diff_presets(a, b) if k not in SKIP_DIFF}


@dataclass
class VariantPlan:
    name: str
    label: str
    overrides: list[str]
    changes: dict[str, tuple[Any, Any]]  # key → (base value, variant value), resolved
    parameters: int
    network: str
    diffusion: str
    module_types: dict[str, int]
    paper: float | None
    status: str  # done | partial | new


@dataclass
class StudyPlan:
    study: str
    title: str
    kind: str
    budget: str
    budget_summary: str
    study_dir: str
    base: str
    variants: list[VariantPlan]
    guide: str = ""  # autoguidance's guiding network, described (empty: none)

    def describe(self) -> str:
        """What `diffit ablate STUDY --dry-run` prints: each variant's overrides and their resolved changes."""

        def fmt(v: Any) -> str:
            return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else "–" if v is None else str(v)

        lines = [
            f"{self.title} ({self.study}, {self.kind} study)",
            f"budget {self.budget}: {self.budget_summary}",
            f"base preset {self.base}; runs in {self.study_dir}",
        ]
        if self.guide:
            lines.append(f"guide: {self.guide}")
        for v in self.variants:
            paper = "" if v.paper is None else f", paper {v.paper:g}"
            lines += [
                "",
                f"{v.name}"
                + (f" — {v.label}" if v.label else "")
                + f"  ({v.network} / {v.diffusion}, {v.parameters:,} parameters{paper}, {v.status})",
                f"  overrides: {' '.join(v.overrides) or '–'}",
            ]
            lines += [f"  {k}: {fmt(a)} → {fmt(b)}" for k, (a, b) in v.changes.items()] or [
                "  resolved: the base preset"
            ]
        return "\n".join(lines)


def default_runs_dir(study: Study, budget: str) -> Path:
    return Path("runs") / "ablations" / study.name / budget


def _network_summary(preset: Preset) -> tuple[int, str, dict[str, int]]:

    with torch.device("meta"):
        net = build_network(preset.model)
    types: dict[str, int] = {}
    for mod in net.modules():
        types[type(mod).__name__] = types.get(type(mod).__name__, 0) + 1
    return count_parameters(net), type(net).__name__, types


def select_variants(study: Study, only: list[str] | None) -> list[Variant]:
    if not only:
        return list(study.variants)
    return [study.variant(n) for n in dict.fromkeys(only)]


def plan_study(
    study: Study | str,
    budget: str = "tiny",
    overrides: list[str] | None = None,
    runs_dir: Path | str | None = None,
    only: list[str] | None = None,
    guide_checkpoint: str | None = None,
) -> StudyPlan:
    """What `--dry-run` shows: every variant's overrides, its resolved differences from the base, its network, and
    the guiding network of autoguiding variants."""
    study = load_study(study) if isinstance(study, (str, Path)) else study
    sdir = Path(runs_dir) if runs_dir is not None else default_runs_dir(study, budget)
    guide = guide_reference(study, sdir, guide_checkpoint)
    base = resolve_preset(study, None, budget, overrides, guide)
    plans = []
    for v in select_variants(study, only):
        p = resolve_preset(study, v, budget, overrides, guide)
        params, net, types = _network_summary(p)
        vdir = sdir / v.name
        status = "done" if (vdir / RESULT).is_file() else "partial" if vdir.exists() else "new"
        plans.append(
            VariantPlan(
                v.name,
                v.label,
                list(v.overrides),
                _changes(base, p),
                params,
                net,
                p.diffusion.kind,
                types,
                v.paper,
                status,
            )
        )
    return StudyPlan(
        study.name,
        study.title,
        study.kind,
        budget,
        get_budget(budget).summary,
        str(sdir),
        study.base,
        plans,
        _describe_guide(study, budget, overrides, guide_checkpoint, guide),
    )


def _describe_guide(
    study: Study, budget: str, overrides: list[str] | None, guide_checkpoint: str | None, guide: str | None
) -> str:
    if guide_checkpoint is not None:
        return f"{guide_checkpoint} (--guide-checkpoint)"
    if study.guide is None:
        return ""
    p = resolve_guide_preset(study, budget, overrides)
    params, _, _ = _network_summary(p)
    return (
        f"the base preset{' with ' + ' '.join(study.guide.overrides) if study.guide.overrides else ''} trained to "
        f"{p.train.total_kimg:g} kimg ({study.guide.fraction:g} of the training), {params:,} parameters, "
        f"in {Path(guide).parent.parent}"
    )
