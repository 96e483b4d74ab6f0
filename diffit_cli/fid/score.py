"""FID of a network's own samples, EDM's protocol: seeds sampled with the preset's sampler and split across processes
as `diffit sample` does (`generate`), scored by `compute_metrics` as `diffit eval-fid` does. `sample_fid` is the one
function behind FID along training and `diffit eval-fid --ckpt` (`score_checkpoint`: repeats over seed ranges)."""

from __future__ import annotations

import shutil
import socket
import statistics
import tempfile
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from diffit_cli.build import build_diffusion
from diffit_cli.checkpoint import read_snapshot, snapshot_network
from diffit_cli.config import Preset
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress, Start, Step, main_process_only
from diffit_cli.fid.extractors import TEST_EXTRACTOR, extractor_class, make_extractor
from diffit_cli.fid.metrics import compute_metrics
from diffit_cli.fid.reference import preset_reference
from diffit_cli.precision import sampling_precision
from diffit_cli.sampling.generate import Decode, generate
from diffit_cli.sampling.run import make_decoder, resolve_weights
from diffit_cli.sampling.sinks import NpzSink, PngSink


def check_extractor(name: str, inception_weights=None) -> None:
    """Fail now, before any sampling, when the extractor is unknown or its weights are missing offline."""
    layer = extractor_class(name).get_default_feature_layer_for_metric("fid")
    if name != TEST_EXTRACTOR:  # building Inception checks (or fetches) its weights; the stand-in needs none
        make_extractor(name, [layer], torch.device("cpu"), inception_weights)


def sample_fid(
    net: torch.nn.Module,
    diffusion,
    preset: Preset,
    decode: Decode,
    reference,
    seeds: list[int],
    *,
    state,
    feature_extractor: str,
    work_dir: Path,
    keep: Path | None = None,
    precision: str = "fp32",
    inception_weights=None,
    progress: Progress | None = None,
) -> dict | None:
    """FID of `net`'s samples for `seeds` against `reference` (a statistics file or images).

    Every process of `state` (an Accelerator or PartialState) samples its share of the seeds (image i depends only
    on seed i); the images go to `keep` as PNGs, or to a temporary `.npz` under `work_dir` (shared by the
    processes) that is removed afterwards. The main process scores them with `compute_metrics` and returns its
    result dict (plus `seeds`); the other processes return None."""
    main = state.is_main_process
    emit = main_process_only(progress, main)
    sink = PngSink(keep) if keep is not None else NpzSink(Path(work_dir) / "samples.npz")
    if main:
        if keep is not None and Path(keep).is_dir() and any(Path(keep).iterdir()):
            raise DiffitError(f"--keep {keep} is not empty; choose a new or empty folder for the sampled images")
        if keep is None:
            sink.clear()  # parts of an interrupted earlier evaluation
    state.wait_for_everyone()
    mine = seeds[state.process_index :: state.num_processes]
    emit(
        Start(
            "fid samples",
            len(seeds),
            0,
            "images",
            f"sampling {len(seeds)} images (seeds {seeds[0]}-{seeds[-1]}) on {state.device} × "
            f"{state.num_processes} for FID ({feature_extractor})",
        )
    )
    done = 0
    for chunk, labels, images in generate(
        net, diffusion, preset, mine, decode, precision=precision, batch=preset.sample.batch, device=state.device
    ):
        sink.write(chunk, labels, images)
        done = min(done + len(chunk) * state.num_processes, len(seeds))
        emit(Step("fid samples", done, len(seeds)))
    state.wait_for_everyone()
    result = None
    if main:
        samples = sink.finish(seeds)
        try:
            result = compute_metrics(
                samples,
                reference,
                metrics=("fid",),
                batch=preset.eval.batch,
                feature_extractor=feature_extractor,
                inception_weights=inception_weights,
                progress=progress,
            )
        finally:
            if keep is None:
                shutil.rmtree(work_dir, ignore_errors=True)
        result["seeds"] = f"{seeds[0]}-{seeds[-1]}"
    state.wait_for_everyone()
    return result


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
    inception_weights=None,
    progress: Progress | None = None,
) -> dict | None:
    """`diffit eval-fid --ckpt`: FID of a checkpoint's EMA network over `repeats` seed ranges of `num` images
    (repeat k: seeds k·num … (k+1)·num−1), as EDM reports (the minimum of three). Defaults come from the
    checkpoint's preset (`eval.num_samples`, `eval.reference` or the training data's statistics,
    `eval.feature_extractor`, `eval.batch` for feature extraction). Returns {values, min, mean, std, ...} on the
    main process, None elsewhere."""
    if repeats < 1 or (num is not None and num < 2):
        raise DiffitError("--repeats must be at least 1 and --num at least 2 (FID needs two samples)")
    state = PartialState(cpu=not torch.cuda.is_available())
    path = resolve_weights(ckpt)
    weights, preset = read_snapshot(path)
    if batch is not None:
        preset = preset.model_copy(update={"eval": preset.eval.model_copy(update={"batch": batch})})
    num = num or preset.eval.num_samples
    extractor = feature_extractor or preset.eval.feature_extractor
    check_extractor(extractor, inception_weights)
    keep = Path(keep) if keep is not None else None
    check_shared_scratch(state, keep)
    emit = main_process_only(progress, state.is_main_process)
    ref_desc = None
    work = [None]
    if state.is_main_process:
        if not reference:  # the preset's eval.reference; for `train`, the training data's statistics (cached)
            reference, ref_desc = preset_reference(
                preset,
                feature_extractor=extractor,
                batch=preset.eval.batch,
                inception_weights=inception_weights,
                progress=progress,
            )
        work = [tempfile.mkdtemp(prefix="diffit-fid-")]
    broadcast_object_list(work)  # one scratch folder for every process (one machine: see check_shared_scratch)
    net = snapshot_network(weights, preset, str(path), state.device)
    del weights
    diffusion = build_diffusion(preset.diffusion, preset.model)
    precision = sampling_precision(preset, state.device)
    decode, _ = make_decoder(preset, None, state.device, precision)
    runs = []
    try:
        for k in range(repeats):
            seeds = list(range(k * num, (k + 1) * num))
            r = sample_fid(
                net,
                diffusion,
                preset,
                decode,
                reference,
                seeds,
                state=state,
                feature_extractor=extractor,
                work_dir=Path(work[0]) / f"repeat-{k}",
                precision=precision,
                keep=None if keep is None else (keep if repeats == 1 else keep / f"repeat-{k}"),
                inception_weights=inception_weights,
                progress=progress,
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
    if not state.is_main_process:
        return None
    values = [r["fid"] for r in runs]
    return {
        "checkpoint": str(ckpt),
        "num": num,
        "repeats": [{"seeds": r["seeds"], "fid": r["fid"]} for r in runs],
        "values": values,
        "min": min(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "extractor": extractor,
        "reference": ref_desc or str(reference),
        "precision": precision,
        "sampler": preset.sample.sampler,
        "steps": preset.sample.steps,
        "notes": runs[0]["notes"],
    }
