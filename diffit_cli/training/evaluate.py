"""FID along training (EDM's metric snapshots): every `eval.every_kimg` the EMA network samples `eval.num_samples`
images (seeds 0..N-1, the same at every point, labelled as `eval.classes` says, guided as `sample.guidance` says:
autoguidance's guide is read once per run) and is scored against
`eval.reference`, or the training data's statistics (FID, and the other `eval.metrics` beside it); the values go
into log.jsonl (with their extractor) and the trackers, and the lowest FID so far makes its snapshot
`checkpoints/best.pt`."""

from __future__ import annotations

import torch

from diffit_cli.events import Message
from diffit_cli.fid.metrics import VALUE_KEYS, with_fid
from diffit_cli.fid.reference import preset_reference
from diffit_cli.fid.score import sample_fid, scratch_sink
from diffit_cli.precision import sampling_precision
from diffit_cli.sampling.generate import make_decoder, needs_guide
from diffit_cli.sampling.run import parse_classes
from diffit_cli.sampling.weights import load_guide
from diffit_cli.training.recipe import kimg_images
from diffit_cli.training.run import Run, log_record

WORK_DIR = "fid-samples"  # the samples of one FID point while they are scored (removed after)


def fid_due(run: Run) -> bool:
    """Whether this step crossed an `eval.every_kimg` boundary (or ended the run) with FID along training on."""
    every, nimg, tc = kimg_images(run.preset.eval.every_kimg), run.state.nimg, run.preset.train
    return every > 0 and (nimg >= kimg_images(tc.total_kimg) or nimg // every > (nimg - tc.batch) // every)


def fid_reference(run: Run) -> tuple[str, str]:
    """(reference, description): `eval.reference`; for `train`, the training data's statistics (computed once,
    cached)."""
    ev = run.preset.eval
    if run.fid_reference is None:
        run.fid_reference = preset_reference(
            run.preset,
            feature_extractor=ev.feature_extractor,
            batch=ev.batch,
            inception_weights=run.inception_weights,
            progress=run.emit,
        )
    return run.fid_reference


def run_guide(run: Run) -> torch.nn.Module | None:
    """Autoguidance's guiding network for FID along training and the preview grid (`sample.guidance.mode` auto,
    scale ≠ 1), read once per run and kept on the run; None without autoguidance. `training.preflight` has checked
    it against the preset before the first step."""
    if not needs_guide(run.preset.sample):
        return None
    if run.guide is None:
        run.guide, _ = load_guide(run.preset.sample.guidance.guide, run.preset, run.accelerator.device)
    return run.guide


def fid_point(run: Run) -> bool:
    """Score the EMA network now; log the value; True (on the main process) when it is the lowest so far."""
    preset, acc, state = run.preset, run.accelerator, run.state
    ev = preset.eval
    reference, what = fid_reference(run) if acc.is_main_process else (None, None)
    precision = sampling_precision(preset, acc.device)
    decode = run.codec.decode if run.codec is not None else make_decoder(preset, None, acc.device, precision)[0]
    with scratch_sink(acc, run.run_dir / WORK_DIR) as sink:
        r = sample_fid(
            run.ema.net,
            run.diffusion,
            preset,
            decode,
            reference,
            list(range(ev.num_samples)),
            state=acc,
            sink=sink,
            feature_extractor=ev.feature_extractor,
            precision=precision,
            classes=parse_classes(ev.classes, preset.model.num_classes),
            inception_weights=run.inception_weights,
            progress=run.emit,
            metrics=with_fid(ev.metrics),
            guide=run_guide(run),
        )
    if r is None:
        return False
    kimg = round(state.nimg / 1000, 3)
    best = state.best is None or r["fid"] < state.best["fid"]
    if best:
        state.best = {"fid": r["fid"], "kimg": kimg, "extractor": r["extractor"]}
    rec = {
        "event": "fid",
        "kimg": kimg,
        "step": state.step,
        "fid": r["fid"],
        "extractor": r["extractor"],
        "num_samples": r["num_samples"],
        "classes": ev.classes,
        "reference": what,
        "best": best,
        **{k: r[k] for k in VALUE_KEYS if k in r and k != "fid"},  # the other `eval.metrics`
    }
    log_record(run, rec)
    run.emit(
        Message(
            f"FID {r['fid']:.4g} at {kimg:g} kimg ({r['extractor']}, {r['num_samples']} samples)"
            + (
                " — the best so far: checkpoints/best.pt"
                if best
                else f"; best {state.best['fid']:.4g} at {state.best['kimg']:g} kimg"
            ),
            data=rec,
        )
    )
    return best
