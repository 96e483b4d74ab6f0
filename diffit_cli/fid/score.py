"""Scoring a network's own samples, EDM's protocol: seeds sampled with the preset's sampler and split across processes
by `sampling.run.write_images` (the loop behind `diffit sample`), scored by `fid.metrics.compute_metrics` (looked up
through its module, so a function swapped there is the one used). `sample_fid` is the one sample-then-score
function: FID along training, `diffit eval-fid --ckpt` (`score_checkpoint`: repeats over seed ranges) and `diffit
ablate` (`score_samples`: a kept, resumable output like `diffit sample`'s) all go through it."""

from __future__ import annotations

import shutil
import socket
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from diffit_cli.build import build_diffusion
from diffit_cli.checkpoint import read_snapshot, snapshot_network
from diffit_cli.config import Preset, preset_to_dict, set_values, validate_preset
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress, main_process_only
from diffit_cli.fid import metrics as fid_metrics
from diffit_cli.fid.extractors import check_extractor
from diffit_cli.fid.reference import preset_reference
from diffit_cli.precision import sampling_precision
from diffit_cli.sampling.generate import Decode, make_decoder, needs_guide
from diffit_cli.sampling.run import parse_classes, plan_sample, resolve_weights, sampling_network, write_images
from diffit_cli.sampling.sinks import NpzSink, PngSink
from diffit_cli.sampling.weights import GuideSnapshot, preset_guide


def sample_fid(
    net: torch.nn.Module,
    diffusion,
    preset: Preset,
    decode: Decode,
    reference,
    seeds: list[int],
    *,
    state,
    sink: PngSink | NpzSink,
    feature_extractor: str,
    batch: int | None = None,
    precision: str = "fp32",
    classes: list[int] | None = None,
    finish: Callable[[], Path] | None = None,
    inception_weights=None,
    progress: Progress | None = None,
    preemptible: bool = False,
    metrics: tuple[str, ...] = ("fid",),
    guide: torch.nn.Module | None = None,
) -> dict | None:
    """FID (and the other `metrics` of `compute_metrics`) of `net`'s samples for `seeds` against `reference` (a
    statistics file or images): every process of `state` (an Accelerator or PartialState) writes its share of the
    seeds that `sink` lacks (image i depends only on seed i; `batch` per forward, default `sample.batch`; `classes`:
    labels cycled over the seeds' positions, see `sampling.run.parse_classes`, None: drawn per seed; `guide`:
    autoguidance's guiding network); then the main process assembles them (`finish`, default `sink.finish`), scores
    them with `compute_metrics` and returns its result dict (plus `seeds`); the others return None. `preemptible`:
    see `write_images`."""
    write_images(
        net,
        diffusion,
        decode,
        preset,
        seeds,
        sink,
        state,
        batch=batch or preset.sample.batch,
        classes=classes,
        precision=precision,
        progress=progress,
        task="fid samples",
        purpose=f" (seeds {seeds[0]}-{seeds[-1]}) for FID ({feature_extractor})",
        preemptible=preemptible,
        guide=guide,
    )
    state.wait_for_everyone()
    result = None
    if state.is_main_process:
        result = fid_metrics.compute_metrics(
            finish() if finish is not None else sink.finish(seeds),
            reference,
            metrics=metrics,
            batch=preset.eval.batch,
            feature_extractor=feature_extractor,
            inception_weights=inception_weights,
            progress=progress,
        )
        result["seeds"] = f"{seeds[0]}-{seeds[-1]}"
    state.wait_for_everyone()
    return result


@contextmanager
def scratch_sink(state, work_dir: Path, keep: Path | None = None) -> Iterator[PngSink | NpzSink]:
    """Where an evaluation's samples go while they are scored: PNGs in `keep` (a new or empty folder, left for the
    user), else an `.npz` under `work_dir` (shared by the processes), removed afterwards by the main process."""
    main = state.is_main_process
    sink = PngSink(keep) if keep is not None else NpzSink(Path(work_dir) / "samples.npz")
    if main:
        if keep is not None and Path(keep).is_dir() and any(Path(keep).iterdir()):
            raise DiffitError(f"--keep {keep} is not empty; choose a new or empty folder for the sampled images")
        if keep is None:
            sink.clear()  # parts of an interrupted earlier evaluation
    state.wait_for_everyone()
    try:
        yield sink
    finally:
        if main and keep is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def score_samples(
    ckpt: str,
    seeds: list[int],
    out: Path | str,
    reference,
    *,
    feature_extractor: str,
    preset: Preset | None = None,
    overrides: list[str] | None = None,
    precision: str = "fp32",
    batch: int | None = None,
    inception_weights=None,
    progress: Progress | None = None,
) -> dict | None:
    """Sample `ckpt` into `out` as `diffit sample` does (recipe checked, output made with another recipe replaced,
    an interrupted run resumed, the final `.npz` and recipe kept) and score the samples with `sample_fid`. `preset`:
    the architecture of weight files that carry none; `overrides`: `sample.*`/`eval.*` settings. Returns the
    result dict on the main process, None elsewhere."""
    job = plan_sample(ckpt, seeds, out, preset=preset, overrides=overrides, precision=precision, batch=batch)
    with sampling_network(job, force=True, progress=progress) as (net, diffusion, decode):
        return sample_fid(
            net,
            diffusion,
            job.preset,
            decode,
            reference,
            seeds,
            state=job.state,
            sink=job.sink,
            feature_extractor=feature_extractor,
            batch=job.batch,
            precision=precision,
            finish=job.complete,
            inception_weights=inception_weights,
            progress=progress,
            preemptible=True,
            guide=job.guide_net,
        )


def check_shared_scratch(state, keep: Path | None) -> None:
    """Without `--keep`, the processes write their images into a temporary folder of the main process's machine
    and the main process scores them all: processes on other machines would write into their own /tmp, and the
    run would fail only after sampling. Said before any work, on every process alike."""
    if keep is None and state.num_processes > 1 and len(set(gather_object([socket.gethostname()]))) > 1:
        raise DiffitError(
            "eval-fid --ckpt on several machines needs --keep DIR on a file system they all see (the "
            "main process scores every process's images)"
        )


def score_checkpoint(
    ckpt: str,
    num: int | None = None,
    *,
    repeats: int = 1,
    reference=None,
    batch: int | None = None,
    feature_extractor: str | None = None,
    keep: Path | str | None = None,
    classes: str | None = None,
    inception_weights=None,
    progress: Progress | None = None,
    metrics: tuple[str, ...] | str = ("fid",),
    sample: dict | None = None,
) -> dict | None:
    """`diffit eval-fid --ckpt`: FID of a checkpoint's EMA network over `repeats` seed ranges of `num` images
    (repeat k: seeds k·num … (k+1)·num−1), as EDM reports (the minimum of three). Defaults: the checkpoint's
    `eval.num_samples`, `eval.reference` (or the training data's statistics), `eval.feature_extractor`, `eval.batch`
    (features), `eval.classes`. `metrics`: what `compute_metrics` computes besides FID (always computed), each
    repeat's values under `repeats`. `sample`: `sample` values by dotted key (the guidance flags, e.g.
    {"guidance.mode": "auto", "guidance.guide": "weak.pt"}). Returns {values, min, mean, std, ...} on the main
    process, else None."""
    metrics = fid_metrics.with_fid(metrics)
    if repeats < 1 or (num is not None and num < 2):
        raise DiffitError("--repeats must be at least 1 and --num at least 2 (FID needs two samples)")
    state = PartialState(cpu=not torch.cuda.is_available())
    path, weights, preset, guide = _read_checkpoint(ckpt, batch, classes, sample)
    num = num or preset.eval.num_samples
    class_list = parse_classes(preset.eval.classes, preset.model.num_classes)
    extractor = feature_extractor or preset.eval.feature_extractor
    check_extractor(extractor, inception_weights)
    keep = Path(keep) if keep is not None else None
    check_shared_scratch(state, keep)
    reference, ref_desc = _checkpoint_reference(
        state, preset, reference, extractor, metrics, inception_weights, progress
    )
    net = snapshot_network(weights, preset, str(path), state.device)
    del weights
    guide_net = guide.network(state.device) if guide is not None and needs_guide(preset.sample) else None
    precision = sampling_precision(preset, state.device)
    runs = _score_repeats(
        net,
        preset,
        reference,
        state,
        num=num,
        repeats=repeats,
        keep=keep,
        feature_extractor=extractor,
        precision=precision,
        classes=class_list,
        inception_weights=inception_weights,
        progress=progress,
        metrics=metrics,
        guide=guide_net,
    )
    if not state.is_main_process:
        return None
    return _summary(runs, str(ckpt), num, extractor, ref_desc or str(reference), precision, preset, guide)


def _read_checkpoint(ckpt: str, batch: int | None, classes: str | None, sample: dict | None):
    """(path, weights, preset, guide) of `eval-fid --ckpt`: the checkpoint's preset with the command's `sample`
    values, `eval.batch` and `eval.classes`, and autoguidance's guiding network read and checked (`mode` auto), all
    before any sampling or scoring."""
    path = resolve_weights(ckpt)
    weights, preset = read_snapshot(path)
    if sample:
        raw = set_values(preset_to_dict(preset), {f"sample.{k}": v for k, v in sample.items()})
        preset = validate_preset(raw, f"{ckpt} with sampling flags")
    given = {k: v for k, v in (("batch", batch), ("classes", classes)) if v is not None}
    preset = preset.model_copy(update={"eval": preset.eval.model_copy(update=given)})
    return path, weights, preset, preset_guide(preset)


def _checkpoint_reference(state, preset: Preset, reference, extractor: str, metrics, inception_weights, progress):
    """(reference, its description or None) on the main process: `reference`, or the preset's `eval.reference` (for
    `train`, the training data's cached statistics); checked, before sampling, for what metrics other than FID
    need of it (sFID's spatial statistics, KID's and precision/recall's features)."""
    ref_desc = None
    if state.is_main_process and not reference:
        reference, ref_desc = preset_reference(
            preset,
            feature_extractor=extractor,
            batch=preset.eval.batch,
            inception_weights=inception_weights,
            progress=progress,
        )
    if state.is_main_process and len(metrics) > 1:
        fid_metrics.check_reference(reference, metrics, extractor)
    return reference, ref_desc


def _summary(
    runs: list[dict],
    ckpt: str,
    num: int,
    extractor: str,
    reference: str,
    precision: str,
    preset: Preset,
    guide: GuideSnapshot | None = None,
) -> dict:
    """`score_checkpoint`'s result: each repeat's FID, their min / mean / std, and what they were measured with
    (the guidance, and autoguidance's guide by reference and hash)."""
    values = [r["fid"] for r in runs]
    g = preset.sample.guidance
    return {
        "checkpoint": ckpt,
        "num": num,
        "repeats": [{"seeds": r["seeds"], **{k: r[k] for k in fid_metrics.VALUE_KEYS if k in r}} for r in runs],
        "values": values,
        "min": min(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "extractor": extractor,
        "reference": reference,
        "precision": precision,
        "sampler": preset.sample.sampler,
        "steps": preset.sample.steps,
        "classes": preset.eval.classes,
        "notes": runs[0]["notes"],
        "guidance": {"mode": g.mode, "scale": g.scale, "schedule": g.schedule},
        "guide": None if guide is None else guide.spec,
        "guide_sha256": None if guide is None else guide.sha256,
    }


def _score_repeats(
    net,
    preset: Preset,
    reference,
    state,
    *,
    num: int,
    repeats: int,
    keep: Path | None,
    feature_extractor: str,
    precision: str,
    classes: list[int] | None,
    inception_weights,
    progress: Progress | None,
    metrics: tuple[str, ...] = ("fid",),
    guide: torch.nn.Module | None = None,
) -> list[dict]:
    """`sample_fid` on seeds k·num … (k+1)·num−1 for each repeat k, in one scratch folder of the main process (or
    `keep`, one subfolder per repeat when there are several); the main process's results, one line per repeat."""
    emit = main_process_only(progress, state.is_main_process)
    diffusion = build_diffusion(preset.diffusion, preset.model)
    decode, _ = make_decoder(preset, None, state.device, precision)
    work = [tempfile.mkdtemp(prefix="diffit-fid-") if state.is_main_process else None]
    broadcast_object_list(work)  # one scratch folder for every process (one machine: see check_shared_scratch)
    runs = []
    try:
        for k in range(repeats):
            seeds = list(range(k * num, (k + 1) * num))
            kept = None if keep is None else (keep if repeats == 1 else keep / f"repeat-{k}")
            with scratch_sink(state, Path(work[0]) / f"repeat-{k}", kept) as sink:
                r = sample_fid(
                    net,
                    diffusion,
                    preset,
                    decode,
                    reference,
                    seeds,
                    state=state,
                    sink=sink,
                    feature_extractor=feature_extractor,
                    precision=precision,
                    classes=classes,
                    inception_weights=inception_weights,
                    progress=progress,
                    metrics=metrics,
                    guide=guide,
                )
            if r is not None:
                runs.append(r)
                emit(
                    Message(
                        f"repeat {k}: seeds {r['seeds']}: FID {r['fid']:.4f}",
                        data={"event": "fid", "repeat": k, "seeds": r["seeds"], "fid": r["fid"]},
                    )
                )
    finally:
        if state.is_main_process:
            shutil.rmtree(work[0], ignore_errors=True)
    return runs
