"""Ablation studies: the paper's Tables 3–8 and Figs. 2, 7a, 7b, 8 as resumable experiments (docs/paper.md,
'Ablations').

A study (YAML under `presets/ablations/`, validated by :class:`Study`) names a base preset, its variants (each a
list of `--set`-style overrides), the metric and the paper's value per variant. :func:`run_study` resolves every
variant at a budget (:data:`BUDGETS`), then trains it with `training.train`, samples and scores it with
`fid.score.score_samples` (the sampling loop of `diffit sample`, the scoring of `diffit eval-fid`) — the functions
behind the commands — each in its own run directory, and writes the results table, CSV, JSON and plots.

Study kinds: `train` (train, sample, score each variant), `curve` (score along training: FID after each of
`curve_points` equal shares of the training), `sample` (one trained network, or `checkpoint`; the variants change
only `sample.*` settings; its `guide:` section trains the guiding network of the variants that autoguide) and
`attention` (train, then attention maps at several noise levels, Fig. 2).

Study directory (default `runs/ablations/<study>/<budget>`)::

    study.json                 budget and feature extractor of this directory (a rerun must match)
    <variant>/                 a `diffit train` run dir + samples.npz + result.json (written last, atomically)
    base/                      `sample` studies: the one trained network
    guide/                     `sample` studies with `guide:`: autoguidance's guiding network (a `diffit train` run dir)
    results.md results.csv results.json <study>.png   (attention studies: attention-change.png,
                               attention-maps-fixed.png, attention-maps-trajectory.png, <variant>/attention/*.png)

A variant with `result.json` is finished and skipped; an unfinished one resumes through `train`'s own resume and
the sample writer's own resume. Every resolved preset is recorded, and a finished variant whose preset no longer
matches (other `--set` values) is an error rather than a silently mixed table. Tables and plots: see
`diffit_cli.ablation.report`. Modules: `study` (schema, loading), `budget`, `plan` (presets per variant,
`--dry-run`), `run` (`run_study`), `attention` (Fig. 2 maps), `report` (tables and plots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffit_cli.config import preset_dir
from diffit_cli.config.explain import explain, yaml_problem
from diffit_cli.errors import DiffitError

SYNTHETIC_CLASSES = 8  # data.SYNTHETIC_CLASSES (not imported: this module stays light for `--list`)
SKIP_DIFF = ("name", "description")
RESULT = "result.json"  # a variant's result, written last: its existence means finished
CHANGE_FLOOR = 1e-6  # colour scale floor of the attention-change maps: float round-off (~1e-8) stays dark


class StudyError(DiffitError):
    """An unknown or invalid study, variant or budget, or a study directory made with other settings."""


# ------------------------------------------------------------------------------------------------ schema
class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Variant(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    label: str = ""
    overrides: list[str] = []
    paper: float | None = None  # the paper's value in the study's paper_column
    paper_note: str = ""
    x: float | None = None  # position on the sweep axis
    group: str | None = None  # sweep series; a sweep variant without a group is a point of every series


class Guide(_Strict):
    """Autoguidance's guiding network of a sample study (Karras et al. 2024, Sec. 5: a smaller, shorter-trained
    version of the main network): the base preset with `overrides` (e.g. a narrower model), trained for `fraction`
    of the budget's training length in `<study dir>/guide`."""

    fraction: float = Field(0.25, gt=0, le=1)
    overrides: list[str] = []


class Sweep(_Strict):
    axis: str
    log: bool = False


class Study(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: str
    source: str  # where the paper values come from (the paper's table or figure)
    description: str = ""
    kind: Literal["train", "sample", "curve", "attention"] = "train"
    base: str  # preset name or path
    sections: dict[str, dict[str, Any]] = {}  # whole preset sections replaced before any override
    overrides: list[str] = []  # for every variant
    budgets: dict[Literal["test", "tiny", "small", "paper"], list[str]] = {}  # per-budget overrides
    metric: Literal["fid", "attention-change"] = "fid"
    paper_column: str = "CIFAR-10"
    sweep: Sweep | None = None
    guide: Guide | None = None  # sample studies: the guiding network of variants with sample.guidance.mode=auto
    curve_points: int | dict[str, int] = 4
    timesteps: list[float] = [0.02, 0.1, 0.5, 2.0, 10.0, 80.0]  # attention studies: EDM σ values
    attention_layer: int = 0  # index among the network's attention modules, in module order
    variants: list[Variant] = Field(min_length=1)

    @field_validator("sections")
    @classmethod
    def _known_sections(cls, v: dict) -> dict:
        bad = sorted(set(v) - {"model", "diffusion", "data", "train", "sample", "eval"})
        if bad:
            raise ValueError(f"sections can replace model, diffusion, data, train, sample or eval, not {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Study:
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {dup}")
        if self.kind == "sample":
            for v in self.variants:
                bad = [o for o in v.overrides if not o.startswith(("sample.", "eval."))]
                if bad:
                    raise ValueError(f"a sample study's variants may change only sample.*/eval.* ({v.name}: {bad[0]})")
        if self.guide is not None and self.kind != "sample":
            raise ValueError("only a sample study trains a guide (its variants share one trained network)")
        if (self.kind == "attention") != (self.metric == "attention-change"):
            raise ValueError("attention studies (and only they) use metric attention-change")
        if self.sweep is not None and any(v.x is None for v in self.variants):
            raise ValueError("a sweep study needs x (the sweep value) on every variant")
        if self.kind == "attention" and len(self.timesteps) < 2:
            raise ValueError("an attention study needs at least two timesteps")
        return self

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise StudyError(
            f"unknown variant {name!r} of study {self.name!r}; valid variants: "
            + ", ".join(v.name for v in self.variants)
        )

    def points(self, budget: str) -> int:
        n = self.curve_points if isinstance(self.curve_points, int) else self.curve_points.get(budget, 4)
        return max(1, int(n))


def study_dir_default() -> Path:
    return preset_dir() / "ablations"


def available_studies() -> list[str]:
    return sorted(p.stem for p in study_dir_default().glob("*.yaml"))


def load_study(name_or_path: str | Path) -> Study:
    """A shipped study by name (`window-size`) or a study YAML file, validated."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = study_dir_default() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise StudyError(
                f"unknown study {str(name_or_path)!r}; available studies: {', '.join(available_studies())} "
                "(or pass the path of a study .yaml file)"
            )
    try:
        raw = yaml.safe_load(path.read_text())
        return Study.model_validate(raw)
    except yaml.YAMLError as e:
        raise StudyError(f"study file {yaml_problem(e, str(path))}") from None
    except ValidationError as e:
        lines = explain(e, Study)
        raise StudyError(
            f"invalid study {str(path)!r}:" + ("\n  " if len(lines) > 1 else " ") + "\n  ".join(lines)
        ) from None
