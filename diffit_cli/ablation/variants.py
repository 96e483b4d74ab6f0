"""The steps of a study's variants: train, score along training (curve), sample one network with other settings,
attention maps; each variant sampled and scored through `fid.score.score_samples` and recorded in its result.json.
`run.run_study` drives them."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from diffit_cli import __version__, training
from diffit_cli.ablation.attention import attention_maps, save_map_pngs
from diffit_cli.ablation.budget import get_budget
from diffit_cli.ablation.report import paper_difference
from diffit_cli.ablation.study import RESULT, Study, StudyError, Variant
from diffit_cli.build import build_diffusion, count_config_parameters
from diffit_cli.checkpoint import NoPresetError, latest_checkpoint, load_snapshot
from diffit_cli.config import Preset, apply_overrides, diff_presets, dump_preset, preset_to_dict, validate_preset
from diffit_cli.events import Message, Progress, main_process_only
from diffit_cli.fid.reference import preset_reference
from diffit_cli.fid.score import score_samples
from diffit_cli.fileio import atomic_write_bytes, read_json, write_json
from diffit_cli.precision import sampling_precision
from diffit_cli.preemption import Preempted
from diffit_cli.sampling.run import resolve_weights


class VariantRunner:
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
        self.trained_guide: str | None = None  # sample studies: the guide trained in <dir>/guide, and its training
        self.guide_kimg: float | None = None

    def run_variant(
        self, v: Variant, preset: Preset, vdir: Path, ckpt: str | None, weights_preset: Preset | None, base: Preset
    ) -> dict:
        """The variant's steps for the study's kind; returns the payload `record` writes."""
        kind = self.study.kind
        if kind == "train":
            return self.train_variant(v, preset, vdir)
        if kind == "curve":
            return self.curve_variant(v, preset, vdir)
        if kind == "sample":
            return self.sample_variant(v, preset, vdir, ckpt, weights_preset, base)
        return self.attention_variant(v, preset, vdir)

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
        """eval.num_samples seeds sampled into a resumable NPZ and their FID against the reference
        (`fid.score.score_samples`)."""
        n = preset.eval.num_samples
        precision = sampling_precision(preset, self.state.device)
        ref, ref_desc = self.reference(preset) if self.main else (None, None)
        self.stage("sample", f"sample {n} images, FID ({self.extractor})", images=n, extractor=self.extractor)
        r = score_samples(
            str(ckpt),
            list(range(n)),
            out,
            ref,
            feature_extractor=self.extractor,
            preset=weights_preset,
            overrides=sample_overrides,
            precision=precision,
            batch=preset.sample.batch,
            inception_weights=self.inception_weights,
            progress=self.emit,
        )  # the study owns these samples: a retrained network replaces them
        if not self.main:
            return {}
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

    def train_variant(self, v: Variant, preset: Preset, vdir: Path) -> dict:

        state = self.train(preset, vdir, v.name)
        out = self.sample_and_score(latest_checkpoint(vdir), vdir / "samples.npz", preset, [])
        return {**out, "kimg": state.nimg / 1000}

    def curve_variant(self, v: Variant, preset: Preset, vdir: Path) -> dict:
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
            except NoPresetError:
                return str(path), base  # a released weight file: architecture from the base preset
        state = self.train(base, self.dir / "base", "base")
        self.base_kimg = state.nimg / 1000
        return str(latest_checkpoint(self.dir / "base")), None

    def sample_variant(
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
        g = preset.sample.guidance
        if g.mode == "auto" and g.scale != 1:  # which guide: latest.pt is a pointer, the file it names is the guide
            guide = Path(g.guide).resolve() if Path(g.guide).exists() else g.guide
            out.update(guide=str(guide), guide_kimg=self.guide_kimg if g.guide == self.trained_guide else None)
        return {**out, "checkpoint": ckpt, "kimg": self.base_kimg}

    def train_guide(self, guide_preset: Preset, reference: str) -> None:
        """Autoguidance's guiding network trained in <dir>/guide (`reference`: its latest checkpoint's path)."""
        state = self.train(guide_preset, self.dir / "guide", "guide")
        self.trained_guide, self.guide_kimg = reference, state.nimg / 1000

    def attention_variant(self, v: Variant, preset: Preset, vdir: Path) -> dict:

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
