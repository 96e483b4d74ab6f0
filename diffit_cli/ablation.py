"""Ablation studies (SPEC §8, issue #8): the paper's Tables 3–8 and Figs. 2, 7a, 7b, 8 as resumable experiments.

A study (YAML under `presets/ablations/`, validated by :class:`Study`) names a base preset, its variants (each a
list of `--set`-style overrides), the metric and the paper's value per variant. :func:`run_study` resolves every
variant at a budget (:data:`BUDGETS`), then trains it with `training.train`, samples it with `generate.run_sample`
and scores it with `metrics.compute_metrics` — the functions behind `diffit train`, `diffit sample` and
`diffit eval-fid` — each in its own run directory, and writes the results table, CSV, JSON and plots.

Study kinds: `train` (train, sample, score each variant), `curve` (score along training: FID after each of
`curve_points` equal shares of the training), `sample` (one trained network, or `checkpoint`; the variants change
only `sample.*` settings) and `attention` (train, then attention maps at several noise levels, Fig. 2).

Study directory (default `runs/ablations/<study>/<budget>`)::

    study.json                 budget and feature extractor of this directory (a rerun must match)
    reference-<...>.npz        FID reference statistics of the training data, same extractor as the samples
    <variant>/                 a `diffit train` run dir + samples.npz + result.json (written last, atomically)
    base/                      `sample` studies: the one trained network
    results.md results.csv results.json <study>.png   (attention studies: attention-change.png,
                               attention-maps-fixed.png, attention-maps-trajectory.png, <variant>/attention/*.png)

A variant with `result.json` is finished and skipped; an unfinished one resumes through `train`'s own resume and
the sample writer's own resume. Every resolved preset is recorded, and a finished variant whose preset no longer
matches (other `--set` values) is an error rather than a silently mixed table. Tables and plots: see
`diffit_cli.ablation_report`.
"""

from __future__ import annotations

import copy
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffit_cli.config import (Preset, apply_overrides, diff_presets, dump_preset, preset_dir, preset_from_yaml,
                               preset_to_dict, read_preset_file, validate_preset)
from diffit_cli.errors import DiffitError
from diffit_cli.fileio import offline, read_json, write_json

Progress = Callable[[dict], None]
SYNTHETIC_CLASSES = 8  # data.SYNTHETIC_CLASSES (not imported: this module stays light for `--list`)
SKIP_DIFF = ("name", "description")


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


class Sweep(_Strict):
    axis: str
    log: bool = False


class Study(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    title: str
    source: str  # where the paper values come from (SPEC section, table or figure)
    description: str = ""
    kind: Literal["train", "sample", "curve", "attention"] = "train"
    base: str  # preset name or path
    sections: dict[str, dict[str, Any]] = {}  # whole preset sections replaced before any override
    overrides: list[str] = []  # for every variant
    budgets: dict[Literal["test", "tiny", "small", "paper"], list[str]] = {}  # per-budget overrides
    metric: Literal["fid", "attention-change"] = "fid"
    paper_column: str = "CIFAR-10"
    sweep: Sweep | None = None
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
    def _consistent(self) -> "Study":
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {dup}")
        if self.kind == "sample":
            for v in self.variants:
                bad = [o for o in v.overrides if not o.startswith(("sample.", "eval."))]
                if bad:
                    raise ValueError(f"a sample study's variants may change only sample.*/eval.* ({v.name}: {bad[0]})")
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
        raise StudyError(f"unknown variant {name!r} of study {self.name!r}; valid variants: "
                         + ", ".join(v.name for v in self.variants))

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
            raise StudyError(f"unknown study {str(name_or_path)!r}; available studies: {', '.join(available_studies())} "
                             "(or pass the path of a study .yaml file)")
    try:
        raw = yaml.safe_load(path.read_text())
        return Study.model_validate(raw)
    except yaml.YAMLError as e:
        raise StudyError(f"study file {str(path)!r} is not valid YAML: {e}") from None
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise StudyError(f"invalid study {str(path)!r}:\n  " + "\n  ".join(lines)) from None


# ----------------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    """How a study is shrunk. `paper` changes nothing; the others rescale the resolved preset (see apply_budget)."""

    name: str
    summary: str
    width_div: int = 1  # network widths ÷ this (ratios between variants survive)
    head_dim: int | None = None
    resolution: int | None = None  # pixel resolution (latent presets become a pixel-space stand-in)
    max_stages: int | None = None
    max_blocks: int | None = None
    vit: dict | None = None  # isotropic ViT sizes
    encdec_vit: dict | None = None  # Table 4 ViT encoder / SETR-MLA sizes
    kimg: float | None = None  # total_kimg (else the preset's × kimg_scale)
    kimg_scale: float = 1.0
    batch: int | None = None
    samples: int | None = None  # generated images per FID
    reference_images: int | None = None  # training images behind the FID reference (None: all)
    steps: dict | None = None  # sampler name → steps
    synthetic: bool = False  # the built-in synthetic shapes
    ema_halflife_kimg: float | None = None
    fast: bool = False  # fp32, no dropout / augmentation / warm-up
    offline_extractor: bool = False  # fall back to the offline test extractor without Inception weights


_FEW_STEPS = {"heun": 8, "euler": 8, "dpmpp-2m": 8, "ddpm": 25, "ddim": 25}
BUDGETS: dict[str, Budget] = {
    "test": Budget("test", "CI smoke test: seconds per study", width_div=16, head_dim=8, resolution=16, max_stages=2,
                   max_blocks=1, vit=dict(hidden_size=32, depth=2, num_heads=2, patch_size=2),
                   encdec_vit=dict(vit_width=32, vit_depth=2, vit_heads=2, mla_channels=16), kimg=0.048, batch=16,
                   samples=24, reference_images=64, steps={"heun": 3, "euler": 3, "dpmpp-2m": 3, "ddpm": 4, "ddim": 4},
                   synthetic=True, ema_halflife_kimg=0.01, fast=True, offline_extractor=True),
    "tiny": Budget("tiny", "2 CPU cores, minutes per study: widths ÷ 8, 16×16 built-in shapes, 20 kimg, FID of 512 "
                   "samples", width_div=8, head_dim=8, resolution=16, max_stages=2, max_blocks=1,
                   vit=dict(hidden_size=64, depth=4, num_heads=4, patch_size=2),
                   encdec_vit=dict(vit_width=64, vit_depth=4, vit_heads=4, mla_channels=32), kimg=20.0, batch=32,
                   samples=512, reference_images=2048, steps=_FEW_STEPS, synthetic=True, ema_halflife_kimg=0.5,
                   fast=True, offline_extractor=True),
    "small": Budget("small", "one GPU, hours per variant: widths ÷ 2, 10 % of the preset's training, FID-10K",
                    width_div=2, kimg_scale=0.1, samples=10_000),
    "paper": Budget("paper", "the paper's setting: the preset's widths, training and FID-50K"),
}
PUBLIC_BUDGETS = ("tiny", "small", "paper")


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise StudyError(f"unknown budget {name!r}; choose one of {', '.join(PUBLIC_BUDGETS)}")
    return BUDGETS[name]


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def apply_budget(raw: dict, b: Budget) -> dict:
    """Shrink a raw preset dict to budget `b` (after the variant's overrides, so variant ratios survive)."""
    raw = copy.deepcopy(raw)
    m, data, tr, sm, ev = (raw.setdefault(k, {}) for k in ("model", "data", "train", "sample", "eval"))
    kind = m.get("kind")
    if b.synthetic:
        data.update(path=None, num_workers=0)
        if data.get("space") == "latent":  # pixel-space stand-in for the latent model
            data.update(space="pixel", vae=None, channels=3, xflip=False)
            m["in_channels"] = 3
            ev["reference"] = None
        if m.get("num_classes", 0):
            m["num_classes"] = SYNTHETIC_CLASSES
            data["use_labels"] = True
    old_res = m.get("img_resolution", m.get("input_size"))
    if b.resolution:
        data["resolution"] = b.resolution
        m["input_size" if kind == "vit" else "img_resolution"] = b.resolution
    d = b.width_div
    if kind in ("unet", "encdec"):
        stages = len(m["channels"]) if b.max_stages is None else min(len(m["channels"]), b.max_stages)
        for key in ("channels", "blocks", "window_size"):
            m[key] = list(m[key])[:stages]
        hd = b.head_dim or m.get("head_dim", 32)
        m["head_dim"] = hd
        m["channels"] = [_round_to(c / d, hd) for c in m["channels"]]
        m["time_dim"] = max(16, int(m.get("time_dim", 512)) // d)
        if b.max_blocks is not None:
            m["blocks"] = [min(int(x), b.max_blocks) for x in m["blocks"]]
        res = int(m["img_resolution"])
        m["window_size"] = [min(int(w), res >> i) for i, w in enumerate(m["window_size"])]
        if kind == "encdec":
            if b.encdec_vit:
                m.update(b.encdec_vit)
            elif d > 1:
                m["vit_width"] = _round_to(m.get("vit_width", 768) / d, m.get("vit_heads", 12))
                m["mla_channels"] = max(8, int(m.get("mla_channels", 256)) // d)
    elif kind == "ddpmpp":
        m["model_channels"] = max(8, int(m.get("model_channels", 128)) // d)
        if b.max_blocks is not None:
            m["num_blocks"] = min(int(m.get("num_blocks", 4)), b.max_blocks)
        if b.resolution and old_res:
            m["attn_resolutions"] = [max(1, int(r) * b.resolution // int(old_res)) for r in m.get("attn_resolutions", [16])]
    elif kind == "vit":
        if b.vit:
            m.update(b.vit)
        elif d > 1:
            m["hidden_size"] = _round_to(m.get("hidden_size", 1152) / d, m.get("num_heads", 16))
            m["depth"] = max(1, int(m.get("depth", 28)) // d)
    if b.fast:
        if "dropout" in m:
            m["dropout"] = 0.0
        tr.update(mixed_precision="fp32", augment_p=0.0, lr_rampup_kimg=0.0)
    kimg = b.kimg if b.kimg is not None else float(tr["total_kimg"]) * b.kimg_scale
    tr["total_kimg"] = kimg
    if b.kimg is None and b.kimg_scale != 1.0:
        for key in ("lr_rampup_kimg", "ema_halflife_kimg"):
            if tr.get(key):
                tr[key] = float(tr[key]) * b.kimg_scale
        for key in ("report_kimg", "snapshot_kimg"):
            if tr.get(key):
                tr[key] = min(float(tr[key]), kimg)
    if b.kimg is not None:
        tr.update(report_kimg=kimg / 4, snapshot_kimg=kimg)
    if b.batch:
        tr.update(batch=b.batch, batch_gpu=None)
    if b.ema_halflife_kimg is not None:
        tr.update(ema_halflife_kimg=b.ema_halflife_kimg, ema_rampup_ratio=0.05, ema_decay=None)
    if b.samples:
        ev["num_samples"] = sm["num_images"] = b.samples
        sm["batch"] = min(int(sm.get("batch", 64)), b.samples)
    if b.steps:
        sm["steps"] = b.steps.get(sm.get("sampler", "heun"), sm.get("steps", 18))
    return raw


# ------------------------------------------------------------------------------------------ resolution
def resolve_preset(study: Study, variant: Variant | None, budget: str = "tiny",
                   overrides: list[str] | None = None) -> Preset:
    """The preset a variant trains with (variant None: the study's base) at `budget`, after user `--set` values.

    Order: base preset → `sections` → study overrides → variant overrides → budget shrink → the study's
    per-budget overrides → user overrides (so a user can pin anything, e.g. --set data.path=cifar10.zip)."""
    b = get_budget(budget)
    raw, _ = read_preset_file(study.base)
    for section, value in study.sections.items():
        raw[section] = copy.deepcopy(value)
    raw = apply_overrides(raw, study.overrides)
    if variant is not None:
        raw = apply_overrides(raw, variant.overrides)
    raw = apply_budget(raw, b)
    raw = apply_overrides(raw, study.budgets.get(budget, []))
    raw = apply_overrides(raw, overrides)
    vname = variant.name if variant is not None else "base"
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


def default_runs_dir(study: Study, budget: str) -> Path:
    return Path("runs") / "ablations" / study.name / budget


def _network_summary(preset: Preset) -> tuple[int, str, dict[str, int]]:
    import torch

    from diffit_cli.build import build_network, count_parameters

    with torch.device("meta"):
        net = build_network(preset.model)
    types: dict[str, int] = {}
    for mod in net.modules():
        types[type(mod).__name__] = types.get(type(mod).__name__, 0) + 1
    return count_parameters(net), type(net).__name__, types


def _select(study: Study, only: list[str] | None) -> list[Variant]:
    if not only:
        return list(study.variants)
    return [study.variant(n) for n in dict.fromkeys(only)]


def plan_study(study: Study | str, budget: str = "tiny", overrides: list[str] | None = None,
               runs_dir: Path | str | None = None, only: list[str] | None = None) -> StudyPlan:
    """What `--dry-run` shows: every variant's overrides, its resolved differences from the base, its network."""
    study = load_study(study) if isinstance(study, (str, Path)) else study
    sdir = Path(runs_dir) if runs_dir is not None else default_runs_dir(study, budget)
    base = resolve_preset(study, None, budget, overrides)
    plans = []
    for v in _select(study, only):
        p = resolve_preset(study, v, budget, overrides)
        params, net, types = _network_summary(p)
        vdir = sdir / v.name
        status = "done" if (vdir / RESULT).is_file() else "partial" if vdir.exists() else "new"
        plans.append(VariantPlan(v.name, v.label, list(v.overrides), _changes(base, p), params, net, p.diffusion.kind,
                                 types, v.paper, status))
    return StudyPlan(study.name, study.title, study.kind, budget, get_budget(budget).summary, str(sdir), study.base, plans)


# ------------------------------------------------------------------------------------------------ running
RESULT = "result.json"



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
    """Inception (`inception-v3-compat`) when its weights are on this machine (cached or `have_weights`) or the budget
    is small/paper; at the tiny/test budgets without them, the offline stand-in `diffit-randconv-v1` (results say so)."""
    from diffit_cli import metrics as M

    if requested:
        if requested == M.TEST_EXTRACTOR:
            M.register_test_extractor()
        return requested
    if get_budget(budget).offline_extractor and not have_weights and not M.inception_weights_cache_path().is_file():
        return M.register_test_extractor()
    return M.INCEPTION


class _Runner:
    """One `run_study` call: shared state (directory, extractor, reference, process role) and the per-kind steps."""

    def __init__(self, study: Study, budget: str, overrides: list[str] | None, sdir: Path, extractor: str | None,
                 checkpoint: str | None, progress: Progress | None, inception_weights: Path | None = None):
        import torch
        from accelerate import PartialState

        self.study, self.budget, self.overrides, self.dir = study, budget, list(overrides or []), sdir
        self.checkpoint = checkpoint
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.main = self.state.is_main_process
        self.emit = progress if (progress is not None and self.main) else (lambda e: None)
        self.extractor, self.inception_weights = extractor, inception_weights
        self._reference: tuple[str, str] | None = None
        self.base_kimg: float | None = None  # sample studies: training of the sampled network (None: --checkpoint)

    # ---------------------------------------------------------------- shared pieces
    def sample_and_score(self, ckpt: Path | str, out: Path, preset: Preset, sample_overrides: list[str],
                         weights_preset: Preset | None = None) -> dict:
        """`run_sample` (resumable NPZ of eval.num_samples seeds) then `compute_metrics` FID against the reference."""
        import torch

        from diffit_cli.generate import run_sample
        from diffit_cli.metrics import compute_metrics

        n = preset.eval.num_samples
        precision = "bf16" if (preset.train.mixed_precision == "bf16" and torch.cuda.is_available()) else "fp32"
        self.emit({"event": "stage", "stage": "sample", "images": n})
        run_sample(str(ckpt), list(range(n)), out, preset=weights_preset, overrides=sample_overrides,
                   precision=precision, batch=preset.sample.batch,
                   progress=lambda e: self.emit({**e, "event": f"sample-{e['event']}"}))
        if not self.main:
            return {}
        ref, ref_desc = self.reference(preset)
        self.emit({"event": "stage", "stage": "metrics", "extractor": self.extractor})
        r = compute_metrics(out, ref, metrics=("fid",), feature_extractor=self.extractor, batch=preset.eval.batch,
                            inception_weights=self.inception_weights)
        return {"value": r["fid"], "num_samples": r["num_samples"], "reference": ref_desc, "precision": precision,
                "notes": r["notes"]}

    def reference(self, preset: Preset) -> tuple[str, str]:
        """FID reference: `eval.reference` if set, else statistics of the training data with this extractor."""
        if preset.eval.reference:
            return preset.eval.reference, preset.eval.reference
        if self._reference is None:
            self._reference = self._training_reference(preset)
        return self._reference

    def _training_reference(self, preset: Preset) -> tuple[str, str]:
        import hashlib

        import numpy as np

        from diffit_cli.data import open_source
        from diffit_cli.metrics import save_reference

        if preset.data.space == "latent":
            raise StudyError("FID of a latent model needs a reference: --set eval.reference=VIRTUAL_imagenet256_"
                             "labeled.npz (ADM's reference batch) or another statistics file")
        limit = get_budget(self.budget).reference_images
        src = open_source(preset.data)
        n = len(src) if limit is None else min(limit, len(src))
        what = f"{n} training images ({src.name}, {preset.data.resolution}px)"
        key = hashlib.sha256(f"{src.fingerprint()}|{preset.data.resolution}|{n}".encode()).hexdigest()[:10]
        path = self.dir / f"reference-{self.extractor}-{key}.npz"
        if not path.is_file():
            self.emit({"event": "stage", "stage": "reference", "images": n})
            if preset.data.path is not None and limit is None:
                dataset = preset.data.path  # folder, zip or npz: streamed
            else:
                dataset = np.stack([src[i][0].numpy().transpose(1, 2, 0) for i in range(n)])  # uint8 NHWC
            save_reference(dataset, path, feature_extractor=self.extractor, batch=preset.eval.batch,
                           inception_weights=self.inception_weights)
        return str(path), what

    def record(self, variant: Variant, preset: Preset, payload: dict, started: float) -> dict:
        """Write the variant's result.json (atomically, last: its existence means finished)."""
        from diffit_cli import __version__
        from diffit_cli.build import parameter_count

        params = parameter_count(preset.model)
        value, paper = payload.get("value"), variant.paper
        res = {
            "study": self.study.name, "variant": variant.name, "label": variant.label, "group": variant.group,
            "x": variant.x, "metric": self.study.metric, "value": value, "paper": paper,
            "difference": None if value is None or paper is None else value - paper,
            "extractor": self.extractor if self.study.metric == "fid" else None, "budget": self.budget,
            "parameters": params, "seconds": round(time.time() - started, 1), "paper_note": variant.paper_note,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "diffit_version": __version__,
            "preset": dump_preset(preset), **{k: v for k, v in payload.items() if k != "value"},
        }
        if self.main:
            write_json(self.dir / variant.name / RESULT, res)
        return res

    # ---------------------------------------------------------------- kinds
    def train(self, preset: Preset, run_dir: Path, label: str):
        from diffit_cli import training

        self.emit({"event": "stage", "stage": "train", "variant": label, "total_kimg": preset.train.total_kimg})
        return training.train(preset, run_dir, progress=lambda e: self.emit({**e, "event": f"train-{e['event']}"}))

    def run_train(self, v: Variant, preset: Preset, vdir: Path) -> dict:
        from diffit_cli.checkpoint import latest_checkpoint

        state = self.train(preset, vdir, v.name)
        out = self.sample_and_score(latest_checkpoint(vdir), vdir / "samples.npz", preset, [])
        return {**out, "kimg": state.nimg / 1000}

    def run_curve(self, v: Variant, preset: Preset, vdir: Path) -> dict:
        """Train to each of `curve_points` equal shares of total_kimg and score there. `train` stops at the point
        and snapshots it, so `latest` is the point's checkpoint, also after an interruption (a point's JSON is
        written once scored; periodic snapshots in between keep long runs safe)."""
        from diffit_cli.checkpoint import latest_checkpoint

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
                done = {"kimg": state.nimg / 1000, "value": out.get("value"), "reference": out.get("reference"),
                        "notes": out.get("notes", [])}
                if self.main:
                    write_json(pfile, done)
                self.emit({"event": "point", "variant": v.name, **done})
            points.append(done)
        last = points[-1]
        return {"value": last["value"], "kimg": last["kimg"], "reference": last.get("reference"),
                "num_samples": preset.eval.num_samples, "notes": last.get("notes", []),
                "points": [{"kimg": p["kimg"], "value": p["value"]} for p in points]}

    def base_checkpoint(self, base: Preset) -> tuple[str, Preset | None]:
        """The network a sample study samples: --checkpoint, or the base preset trained once in <dir>/base."""
        from diffit_cli.checkpoint import CheckpointError, latest_checkpoint, load_snapshot

        if self.checkpoint is not None:
            from diffit_cli.generate import resolve_weights

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

    def run_sample(self, v: Variant, preset: Preset, vdir: Path, ckpt: str, weights_preset: Preset | None,
                   base: Preset) -> dict:
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
        import numpy as np

        from diffit_cli.checkpoint import latest_checkpoint, load_snapshot
        from diffit_cli.build import build_diffusion

        state = self.train(preset, vdir, v.name)
        if not self.main:
            return {}
        self.emit({"event": "stage", "stage": "attention"})
        net, _ = load_snapshot(latest_checkpoint(vdir), device="cpu")
        maps = attention_maps(net, build_diffusion(preset.diffusion, preset.model), preset, self.study.timesteps,
                              self.study.attention_layer)
        buf = io.BytesIO()
        np.savez(buf, **{k: v_ for k, v_ in maps.items() if isinstance(v_, np.ndarray)})
        from diffit_cli.fileio import atomic_write_bytes

        atomic_write_bytes(vdir / "attention.npz", buf.getvalue())
        _save_map_pngs(vdir / "attention", maps)
        return {"value": maps["change"], "kimg": state.nimg / 1000, "layer": maps["layer"],
                "timesteps": list(self.study.timesteps)}


def _check_extractor_available(extractor: str | None, inception_weights: Path | None) -> None:
    from diffit_cli import metrics as M

    if inception_weights is not None:
        if not inception_weights.is_file():
            raise StudyError(f"--inception-weights {str(inception_weights)!r} is not a file")
        return

    if extractor == M.INCEPTION and offline() and not M.inception_weights_cache_path().is_file():
        raise StudyError(f"FID needs the Inception weights, which are not at {M.inception_weights_cache_path()} and "
                         "downloads are off (HF_HUB_OFFLINE/DIFFIT_OFFLINE); copy them there (see `diffit eval-fid "
                         f"--help`), or pass --feature-extractor {M.TEST_EXTRACTOR} for a smoke run")


def _check_dir(sdir: Path, study: Study, budget: str, extractor: str | None) -> str | None:
    """study.json pins a directory to one budget and one feature extractor; returns the pinned extractor."""
    info = read_json(sdir / "study.json")
    if info is None:
        return None
    if info.get("budget") != budget:
        raise StudyError(f"{sdir} holds the {info.get('budget')!r} budget of study {study.name!r}, not {budget!r}; "
                         "pass another --runs-dir")
    pinned = info.get("extractor")
    if extractor and pinned and extractor != pinned:
        raise StudyError(f"{sdir} was scored with feature extractor {pinned}; mixing extractors makes FIDs "
                         "incomparable (pass another --runs-dir or the same extractor)")
    return pinned


def run_study(study: Study | str, budget: str = "tiny", *, overrides: list[str] | None = None,
              runs_dir: Path | str | None = None, only: list[str] | None = None, checkpoint: str | None = None,
              feature_extractor: str | None = None, inception_weights: Path | str | None = None,
              progress: Progress | None = None) -> StudyResult:
    """Run (or resume) a study; returns its rows and writes results.{md,csv,json} and plots into the study dir.

    `only`: variant names to run (results still list every finished variant). `checkpoint`: for `sample`
    studies, a trained network to sample instead of training the base (a `.pt`, `.safetensors` or REPO:FILE).
    `inception_weights`: a local Inception weights file (offline machines; also lifts the tiny budget's fallback to
    the offline extractor). `progress(event)` receives dict events: variant (status start|skipped|done), stage,
    train-*, sample-*, point."""
    study = load_study(study) if isinstance(study, (str, Path)) else study
    get_budget(budget)
    sdir = Path(runs_dir) if runs_dir is not None else default_runs_dir(study, budget)
    selected = _select(study, only)
    if checkpoint is not None and study.kind != "sample":
        raise StudyError(f"--checkpoint is for studies that only sample (cfg-scale); {study.name!r} trains its variants")
    presets = {v.name: resolve_preset(study, v, budget, overrides) for v in study.variants}
    base = resolve_preset(study, None, budget, overrides)
    pinned = _check_dir(sdir, study, budget, feature_extractor)
    weights = Path(inception_weights).expanduser() if inception_weights is not None else None
    extractor = choose_extractor(budget, feature_extractor or pinned, weights is not None) \
        if study.metric == "fid" else None
    _check_extractor_available(extractor, weights)
    runner = _Runner(study, budget, overrides, sdir, extractor, checkpoint, progress, weights)
    if runner.main:
        write_json(sdir / "study.json", {"study": study.name, "budget": budget, "extractor": extractor,
                                         "base": study.base})
    result = StudyResult(study.name, budget, sdir, extractor, [])
    todo = []
    for v in selected:
        done = read_json(sdir / v.name / RESULT)
        if done is not None:
            _same_preset(done, presets[v.name], sdir / v.name)
            result.skipped.append(v.name)
            runner.emit({"event": "variant", "variant": v.name, "status": "skipped", "value": done.get("value")})
        else:
            todo.append(v)
    if study.metric == "fid" and todo and runner.main:
        runner.reference(base)  # before any training: a missing reference or extractor fails now, not in hours
    ckpt = weights_preset = None
    if study.kind == "sample" and todo:
        ckpt, weights_preset = runner.base_checkpoint(base)
    for i, v in enumerate(todo):
        preset, vdir = presets[v.name], sdir / v.name
        runner.emit({"event": "variant", "variant": v.name, "status": "start", "index": i + 1, "total": len(todo)})
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
        runner.emit({"event": "variant", "variant": v.name, "status": "done", "value": res.get("value")})
    runner.state.wait_for_everyone()
    from diffit_cli.ablation_report import collect_rows, write_results

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
        raise StudyError(f"variant {vdir.name!r} in {vdir.parent} was finished with other settings (changed: "
                         f"{', '.join(changed)}); rerun with the same --set values, pass another --runs-dir, or "
                         f"delete {vdir} to redo it")


# ------------------------------------------------------------------------------------------ attention maps
def attention_maps(net, diffusion, preset: Preset, sigmas: list[float], layer: int = 0, seed: int = 0) -> dict:
    """Fig. 2 maps from one attention layer of an EDM-family image network (module docstring of the study).

    Returns `fixed` and `trajectory` maps (T, H, W) — per window, the centre query's attention averaged over
    heads — the uint8 inputs, and `change`: the mean total-variation distance between the fixed-input attention
    distributions at consecutive noise levels."""
    import numpy as np
    import torch

    from diffit_cli.core.edm import EDM
    from diffit_cli.core.layers import TMSA
    from diffit_cli.data import open_source, to_model_space

    if not isinstance(diffusion, EDM):
        raise StudyError("attention maps are drawn for image-space (EDM-family) networks")
    mods = [m for m in net.modules() if isinstance(m, TMSA)]
    if not mods:
        raise StudyError(f"{type(net).__name__} has no TMSA-style attention layer to draw")
    attn = mods[min(layer, len(mods) - 1)]
    hw: dict = {}
    hook = attn.register_forward_pre_hook(lambda mod, args: hw.update(hw=args[2] if len(args) > 2 else None))
    src = open_source(preset.data)
    x0 = to_model_space(src[seed][0][None])  # (1, C, H, W)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = sorted(float(s) for s in sigmas)
    ref = sigmas[(len(sigmas) - 1) // 2]

    def run(x: torch.Tensor, sigma_in: float, sigma_t: float) -> torch.Tensor:
        s_in, s_t = torch.tensor([sigma_in]), torch.tensor([sigma_t])
        with torch.no_grad():
            net(diffusion.c_in(s_in).view(-1, 1, 1, 1) * x, diffusion.c_noise(s_t))
        return attn.last_attn.float()  # (nW, heads, n, n[+1])

    def to_map(a: torch.Tensor) -> np.ndarray:
        w = attn.window_size
        H, W = hw.get("hw") or (x0.shape[-2], x0.shape[-1])
        centre = (w // 2) * w + w // 2
        m = a[:, :, centre, : w * w].mean(1)  # (nW, w²)
        m = m.view(H // w, W // w, w, w).permute(0, 2, 1, 3).reshape(H, W)
        return m.numpy()

    attn.store_attn = True
    try:
        fixed_x = x0 + ref * noise
        fixed = [run(fixed_x, ref, s) for s in sigmas]
        traj = [run(x0 + s * noise, s, s) for s in sigmas]
    finally:
        attn.store_attn, attn.last_attn = False, None
        hook.remove()
    tv = [0.5 * (a - b).abs().sum(-1).mean().item() for a, b in zip(fixed[:-1], fixed[1:])]

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        return ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()

    fixed_maps = np.stack([to_map(a) for a in fixed])
    return {
        "sigmas": np.asarray(sigmas, dtype=np.float32),
        "fixed": fixed_maps, "trajectory": np.stack([to_map(a) for a in traj]),
        "fixed_change": np.abs(fixed_maps - fixed_maps.mean(0, keepdims=True)),
        "fixed_input": to_uint8(fixed_x), "trajectory_inputs": np.stack([to_uint8(x0 + s * noise) for s in sigmas]),
        "change": float(np.mean(tv)), "layer": f"{mods.index(attn)} of {len(mods)} ({type(attn).__name__}, window "
                                              f"{attn.window_size})",
    }


CHANGE_FLOOR = 1e-6  # colour scale floor of the change maps: float round-off (~1e-8) stays dark


def _save_map_pngs(folder: Path, maps: dict) -> None:
    """One colour-mapped PNG per noise level and protocol (one colour scale per protocol); `fixed-change`: the
    distance of each fixed-input map from their mean over t, scaled to its own maximum (all dark: no t effect)."""
    from diffit_cli.generate import save_png
    from diffit_cli.plots import colormap

    for proto in ("fixed", "trajectory", "fixed_change"):
        arr = maps[proto]
        for s, m in zip(maps["sigmas"], arr):
            name = proto.replace("_", "-")
            save_png(folder / f"{name}-sigma{float(s):g}.png", colormap(m, 0.0, max(float(arr.max()), CHANGE_FLOOR)))


__all__ = ["Study", "Variant", "Budget", "BUDGETS", "PUBLIC_BUDGETS", "StudyError", "StudyPlan", "VariantPlan",
           "StudyResult", "load_study", "available_studies", "resolve_preset", "apply_budget", "plan_study",
           "run_study", "attention_maps", "choose_extractor", "default_runs_dir"]
