"""`diffit sample` as a function: weights by path or Hub reference, the checkpoint's preset with the
sampling settings, seeds split across processes, resumable PNG/NPZ output and a recipe JSON beside it."""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from diffit_cli import __version__
from diffit_cli.build import build_diffusion, compile_blocks, want_compile
from diffit_cli.checkpoint import read_snapshot, snapshot_network
from diffit_cli.config import Preset, apply_overrides, preset_to_dict, set_values, validate_preset
from diffit_cli.core.samplers import nfe
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress, Start, Step, main_process_only
from diffit_cli.fileio import check_writable, new_output, write_json
from diffit_cli.precision import check_precision
from diffit_cli.preemption import Preempted, preemption_signals
from diffit_cli.sampling.generate import Decode, generate, make_decoder, needs_guide
from diffit_cli.sampling.recipe import check_recipe, compact_seeds, sample_recipe
from diffit_cli.sampling.sinks import NpzSink, PngSink, image_grid, save_png
from diffit_cli.sampling.weights import GuideSnapshot, preset_guide, resolve_weights


def parse_seeds(text: str) -> list[int]:
    """'0-49999', '1,5,7' or '0-9,100' → a list of seeds (EDM's --seeds syntax)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise DiffitError(f"bad seed list {text!r}: use ranges and lists such as 0-49999 or 1,5,7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise DiffitError(f"bad seed range {part!r}: the end is before the start")
        seeds.extend(range(lo, hi + 1))
    return seeds


BALANCED = "balanced"


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """'random' / None → drawn per seed (ADM's protocol); '207' or '1,2,3' → fixed labels, cycled over the seeds;
    'balanced' → every class, cycled: the seed at position j of the run's seed list gets class j mod num_classes
    (see `sampling.generate.seed_labels`), so N seeds hold N // num_classes images of each class and the first
    N mod num_classes classes one more."""
    if text is None or str(text).strip() in ("", "random"):
        return None
    if str(text).strip() == BALANCED:
        if num_classes == 0:
            raise DiffitError("--classes balanced: this model is unconditional (no classes); leave --classes out")
        return list(range(num_classes))
    try:
        classes = [int(c) for c in str(text).split(",")]
    except ValueError:
        raise DiffitError(f"bad --classes {text!r}: give 'random', a class index or a comma-separated list") from None
    if num_classes == 0:
        raise DiffitError(f"--classes {text}: this model is unconditional (no classes); leave --classes out")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DiffitError(f"--classes {bad} out of range: this model has classes 0..{num_classes - 1}")
    return classes


@dataclass
class SampleJob:
    """What `run_sample` settles before any network exists: the seeds, the output and its sink, the checkpoint's
    preset with the sampling values, and the recipe that decides every image besides its seed."""

    ckpt: str
    path: Path
    seeds: list[int]
    out: Path
    preset: Preset
    weights: dict | None
    sink: PngSink | NpzSink
    recipe: dict
    recipe_path: Path
    state: PartialState
    batch: int
    classes: list[int] | None
    precision: str
    vae: str | None
    guide: GuideSnapshot | None = None  # autoguidance's guiding network, read and checked (`sample.guidance.guide`)
    guide_net: torch.nn.Module | None = None  # ... and built, by `sampling_network`

    def loop_args(self) -> dict:
        """`write_images`'s batch, fixed classes, precision and guiding network for this job."""
        return {"batch": self.batch, "classes": self.classes, "precision": self.precision, "guide": self.guide_net}

    def complete(self) -> Path:
        """Main process, once every process has written its share: the final `.npz` (or the PNG folder) and the
        recipe marked complete."""
        self.sink.finish(self.seeds)
        cfg = self.preset.sample
        self.recipe.update(
            diffit_version=__version__,
            checkpoint=str(self.ckpt),
            guide=None if self.guide is None else self.guide.spec,
            nfe=nfe(cfg.sampler, cfg.steps),  # a guided step: one forward of the doubled batch
            seeds=compact_seeds(self.seeds),
            count=len(self.seeds),
            processes=self.state.num_processes,
            torch=torch.__version__,
            python=platform.python_version(),
            complete=True,
        )
        write_json(self.recipe_path, self.recipe)
        return self.out


def plan_sample(
    ckpt: str,
    seeds: list[int],
    out: Path | str,
    *,
    preset: Preset | None = None,
    overrides: list[str] | None = None,
    sample: dict | None = None,
    precision: str = "fp32",
    batch: int | None = None,
    classes: str | None = None,
    vae: str | None = None,
    raw: bool = False,
    grid: Path | str | None = None,
) -> SampleJob:
    """Check the request and read the weights and preset (no network yet); see `run_sample` for the arguments."""
    if not seeds:
        raise DiffitError("no seeds to sample: pass e.g. --seeds 0-63")
    if len(set(seeds)) != len(seeds):
        raise DiffitError("--seeds lists a seed twice; each seed is one image")
    out = check_writable(out, folder=Path(out).suffix != ".npz")  # the output paths before any work
    if grid is not None:
        check_writable(grid)
    state = PartialState(cpu=not torch.cuda.is_available())  # gloo processes on GPU-less machines
    path = resolve_weights(ckpt)
    bad = [o for o in overrides or [] if not o.startswith(("sample.", "eval."))]
    if bad:
        raise DiffitError(f"sampling can only change sample.* settings, not {bad[0]!r}")
    check_precision(precision)
    weights, preset = read_snapshot(path, preset=preset, ema=not raw)
    raw_preset = set_values(
        apply_overrides(preset_to_dict(preset), overrides), {f"sample.{k}": v for k, v in (sample or {}).items()}
    )
    preset = validate_preset(raw_preset, f"{ckpt} with sampling flags")
    guide = preset_guide(preset)  # checked before any output exists
    if not needs_guide(preset.sample):
        guide = None  # autoguidance at scale 1 is the main network: the guide is neither recorded nor kept
    class_list = parse_classes(classes, preset.model.num_classes)
    vae_id = (vae or preset.data.vae) if preset.data.space == "latent" else None
    npz = out.suffix == ".npz"
    return SampleJob(
        ckpt=ckpt,
        path=path,
        seeds=seeds,
        out=out,
        preset=preset,
        weights=weights,
        sink=NpzSink(out) if npz else PngSink(out),
        recipe=sample_recipe(path, preset, raw=raw, vae_id=vae_id, precision=precision, classes=classes, guide=guide),
        recipe_path=out.with_name(f"{out.stem}.sample.json") if npz else out / "sample.json",
        state=state,
        batch=batch or preset.sample.batch,
        classes=class_list,
        precision=precision,
        vae=vae,
        guide=guide,
    )


@contextmanager
def sampling_network(
    job: SampleJob, *, force: bool = False, compile: bool | str = "auto", progress: Progress | None = None
) -> Iterator[tuple[torch.nn.Module, object, Decode]]:
    """Around the sampling of `job`: output made with another recipe is refused (with `force`, cleared), this recipe
    is recorded, then the network, diffusion and decoder are built and yielded. A new output that fails before its
    first image (a bad network, a full disk) leaves nothing, not even the recipe."""
    state, npz = job.state, job.out.suffix == ".npz"
    with new_output(
        job.recipe_path if npz else job.out, keep=lambda: bool(job.sink.done(job.seeds)), owner=state.is_main_process
    ):
        check_recipe(job.recipe_path, job.recipe, job.out, force, job.sink, state.is_main_process)
        state.wait_for_everyone()
        net = snapshot_network(job.weights, job.preset, str(job.path), state.device)  # the checks above need none
        job.weights = None
        if job.guide is not None and needs_guide(job.preset.sample):
            job.guide_net = job.guide.network(state.device)
        if want_compile(compile, state.device):
            warn = main_process_only(progress, state.is_main_process)
            for module in (net, job.guide_net) if job.guide_net is not None else (net,):
                compile_blocks(module, lambda text: warn(Message(text, "warning")))
        diffusion = build_diffusion(job.preset.diffusion, job.preset.model)
        decode, _ = make_decoder(job.preset, job.vae, state.device, job.precision)
        yield net, diffusion, decode


def run_sample(
    ckpt: str,
    seeds: list[int],
    out: Path | str,
    *,
    preset: Preset | None = None,
    overrides: list[str] | None = None,
    sample: dict | None = None,
    precision: str = "fp32",
    batch: int | None = None,
    classes: str | None = None,
    vae: str | None = None,
    raw: bool = False,
    grid: Path | str | None = None,
    force: bool = False,
    compile: bool | str = "auto",
    progress: Progress | None = None,
) -> dict:
    """`diffit sample`: generate images for `seeds` into a PNG folder or an `.npz`, resumably, on every process.

    `preset` is needed only for weight files that carry none (the release); `overrides` are
    `sample.key=value` strings (`--set`) and `sample` typed values by dotted key within the section (the command's
    flags, e.g. {"guidance.scale": 4.6}), both applied to the checkpoint's preset and validated like any preset
    before a network is built. Output made with another recipe (checkpoint, sampler, steps, guidance, ...) is
    refused, naming what changed, unless `force` (then it is replaced); the same recipe resumes. `compile`:
    torch.compile each network block ("auto": on CUDA only; see `build.compile_blocks`).
    """
    job = plan_sample(
        ckpt,
        seeds,
        out,
        preset=preset,
        overrides=overrides,
        sample=sample,
        precision=precision,
        batch=batch,
        classes=classes,
        vae=vae,
        raw=raw,
        grid=grid,
    )
    state = job.state
    with sampling_network(job, force=force, compile=compile, progress=progress) as (net, diffusion, decode):
        write_images(net, diffusion, decode, job.preset, seeds, job.sink, state, **job.loop_args(), progress=progress)
    state.wait_for_everyone()
    result = {"out": str(job.out), "images": len(seeds)}
    if state.is_main_process:
        if grid is not None:
            save_png(grid, image_grid(job.sink.images(seeds[:64])))
        job.complete()
        result.update(recipe=str(job.recipe_path), nfe=job.recipe["nfe"])
    state.wait_for_everyone()
    return result


def write_images(
    net,
    diffusion,
    decode: Decode,
    preset: Preset,
    seeds: list[int],
    sink: PngSink | NpzSink,
    state,
    *,
    batch: int,
    classes: list[int] | None = None,
    precision: str = "fp32",
    progress: Progress | None = None,
    task: str = "sample",
    purpose: str = "",
    preemptible: bool = True,
    guide: torch.nn.Module | None = None,
) -> None:
    """The one seed → batch → file loop: this process's share of `seeds` (`state`: an Accelerator or PartialState)
    that `sink` does not hold yet, generated batch by batch into `sink`. `classes` are fixed labels cycled over
    `seeds` (None: drawn per seed). `task` names the progress events, `purpose` ends their first line. When
    `preemptible`, a preemption signal stops it after the batch in hand is written (`Preempted`); callers that
    handle the signals themselves (training) pass False. `guide`: autoguidance's guiding network."""
    device = state.device
    mine = seeds[state.process_index :: state.num_processes]
    have = sink.done(mine)
    todo = [s for s in mine if s not in have]
    emit = main_process_only(progress, state.is_main_process)
    total, start = len(seeds), len(seeds) - len(todo) * state.num_processes
    _announce(emit, sink, task, total, start, f"{device} × {state.num_processes}{purpose}")
    # labels are a function of the seed (or of its position in the fixed list), never of the process
    position = {s: i for i, s in enumerate(seeds)}
    done, t0 = start, time.perf_counter()
    # a signal (SLURM's warning, a preemption, Ctrl-C) stops this process after the batch in hand is written; no
    # barrier: a launcher ends the other processes when one exits, and the rerun samples what is missing
    signals = preemption_signals(lambda text: emit(Message(text, "warning"))) if preemptible else nullcontext([])
    with signals as caught:
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            fixed = None if classes is None else [classes[position[s] % len(classes)] for s in chunk]
            for s_chunk, labels, images in generate(
                net,
                diffusion,
                preset,
                chunk,
                decode,
                precision=precision,
                batch=batch,
                device=device,
                classes=fixed,
                guide=guide,
            ):
                sink.write(s_chunk, labels, images)
                done = min(done + len(s_chunk) * state.num_processes, total)
                rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
                emit(Step(task, done, total, {"img_per_s": rate}, f"{rate:.2f} img/s"))
            if caught:
                raise Preempted(
                    caught[0], f"writing {i + len(chunk)} of this process's {len(todo)} images to {sink.out}"
                )


def _announce(emit, sink, task: str, total: int, start: int, where: str) -> None:
    """The loop's first events: the files a crash tore (their seeds are sampled again), then its `Start`."""
    if sink.torn:
        emit(
            Message(
                f"{len(sink.torn)} unreadable output file(s) (torn by a crash?) removed and redone, first: "
                f"{sink.torn[0]}",
                "warning",
            )
        )
    emit(Start(task, total, start, "images", f"sampling {total - start} of {total} images on {where}"))
