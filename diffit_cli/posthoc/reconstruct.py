"""`diffit ema` as a function: the EMA of any σ_rel reconstructed from a run's post-hoc EMA snapshots (EDM2, Karras
et al. 2024, Sec. 3.1 and App. C.3) and written as an ordinary checkpoint.

The snapshots `posthoc-ema/pema-<σ_rel>-<kimg>.safetensors` hold power-function averages θ̂_i of profiles (t_i, γ_i),
t_i in optimizer steps. For a target σ_rel at time t (default: the latest snapshot's), `core.posthoc_ema.
solve_profiles` gives least-squares coefficients x (summing to 1), p_target ≈ Σ x_i p_i over the snapshots up to t,
and the reconstruction is Σ x_i θ̂_i: every snapshot is read once, all targets accumulated together in float64.
A snapshot's own profile comes back as itself (x = e_i). The fit's relative residual says how well the stored
profiles span the target; EDM2 stores two profiles (σ_rel 0.05 and 0.10) often enough to make it small.

Output: `ema-<σ_rel>-<kimg>.pt` in `RUN_DIR/ema-reconstructed/` (or `out_dir`), a `torch.save` dict that `diffit
sample --ckpt`, `eval-fid --ckpt` and `export` read like a training checkpoint holding only its EMA: {ema, preset,
nimg, step, reconstruction: {sigma_rel, gamma, residual, coefficients: {snapshot file: x_i}}} (not `posthoc_ema`,
which in a training checkpoint holds the profiles' states). Under several processes (`accelerate launch`, as a
multi-process `--sweep` runs) every process checks the input and solves the fit, the main one alone reads the
snapshots and writes the checkpoints, and every process returns the results once they exist.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from diffit_cli.checkpoint import state_nbytes
from diffit_cli.config import preset_from_yaml
from diffit_cli.core.posthoc_ema import SIGMA_REL_MAX, gamma_of_sigma_rel, solve_profiles
from diffit_cli.errors import DiffitError
from diffit_cli.events import Message, Progress, Start, Step, main_process_only
from diffit_cli.fileio import atomic_write, check_writable
from diffit_cli.posthoc.store import SNAPSHOT_DIR, StoredProfile, list_profiles, load_profile_state, snapshot_preset

OUT_DIR = "ema-reconstructed"
RESIDUAL_NOTE = 0.05  # a fit residual above this is said: the stored profiles span the target poorly


class EmaError(DiffitError):
    """Bad input to `diffit ema`: a σ_rel, a run without snapshots, an output in the way."""


@dataclass(frozen=True)
class Result:
    """One reconstruction: the target profile, how well the snapshots fit it, and the checkpoint written."""

    sigma_rel: float
    gamma: float
    residual: float
    path: Path
    nimg: int
    step: int
    coefficients: dict[str, float]
    sources: str  # the snapshot files' fingerprint (`snapshots_fingerprint`): rewritten snapshots change it


def parse_sigma_rels(text: str) -> list[float]:
    """'0.04,0.06,0.08' → [0.04, 0.06, 0.08], each checked by `check_sigma_rels`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise EmaError(f"--sigma-rel {text!r}: give numbers separated by commas, e.g. 0.05,0.075,0.10") from None
    return check_sigma_rels(values)


def check_sigma_rels(values: Sequence[float]) -> list[float]:
    """The σ_rel values, each in (0, 0.3) (EDM2 eq. 3: no power-function profile is wider than ≈ 0.3003), none
    twice (by the name its file gets)."""
    if not values:
        raise EmaError("--sigma-rel: give at least one σ_rel, e.g. 0.05,0.075,0.10")
    for s in values:
        if not (math.isfinite(s) and 0 < s < SIGMA_REL_MAX):
            raise EmaError(
                f"σ_rel {s:g} is outside (0, 0.3): a power-function EMA's relative width lies in that range "
                "(EDM2 eq. 3); e.g. 0.05"
            )
    names = [sigma_text(s) for s in values]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EmaError(f"--sigma-rel lists σ_rel {', '.join(twice)} twice")
    return [float(s) for s in values]


def sigma_text(sigma_rel: float) -> str:
    """σ_rel in a file name: three decimals, more when the value needs them (0.050, 0.0405)."""
    short = f"{sigma_rel:.3f}"
    return short if float(short) == sigma_rel else f"{sigma_rel:.6f}".rstrip("0")


def output_name(sigma_rel: float, nimg: int) -> str:
    return f"ema-{sigma_text(sigma_rel)}-{nimg / 1000:012.3f}.pt"  # sortable by σ_rel, then time, like pema-*


def select_snapshots(run_dir: Path, at_kimg: float | None) -> tuple[list[StoredProfile], int, int]:
    """(the snapshots stored up to the target time, its image count, its optimizer step): the latest snapshot's
    time, or the one stored at `at_kimg`: snapshots are stored by the step that crosses the interval, so the time
    asked for matches the stored time within one batch after it (500 kimg at batch 512 is stored at 500.224)."""
    found = [s for s in list_profiles(run_dir) if s.step >= 1]
    if not found:
        raise EmaError(
            f"{str(Path(run_dir) / SNAPSHOT_DIR)!r} holds no post-hoc EMA snapshots (pema-*.safetensors): train "
            "with train.posthoc_ema listing profiles, e.g. --set 'train.posthoc_ema=[0.05, 0.10]' (EDM2's choice)"
        )
    times = sorted({s.nimg for s in found})
    nimg = times[-1]
    if at_kimg is not None:
        batch = {s.nimg: s.nimg / s.step for s in found}  # images per optimizer step
        match = [n for n in times if -0.5 < n - at_kimg * 1000 < batch[n]]
        if not match:
            shown = ", ".join(f"{n / 1000:.3f}" for n in (times if len(times) <= 8 else times[:3] + times[-3:]))
            raise EmaError(
                f"--at-kimg {at_kimg:g}: no snapshot was stored then; stored at kimg {shown}"
                + (f" ({len(times)} times)" if len(times) > 8 else "")
            )
        nimg = match[0]
    stored = [s for s in found if s.nimg <= nimg]
    return stored, nimg, max(s.step for s in stored if s.nimg == nimg)


def snapshots_fingerprint(stored: list[StoredProfile]) -> str:
    """A short hash of the snapshot files' names, sizes and modification times: the same on every process of a
    shared folder (and for a copy that keeps the times), new when a rollback or another run writes a snapshot under
    the same name."""
    stats = [(s.path.name, st.st_size, st.st_mtime_ns) for s in stored for st in [s.path.stat()]]
    return hashlib.sha256(json.dumps(sorted(stats)).encode()).hexdigest()[:16]


def _check_outputs(paths: list[Path], out_dir: Path, force: bool) -> None:
    """Before anything is read: the folder can be made, and no output exists (unless `force`)."""
    check_writable(out_dir, folder=True)
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise EmaError(f"{str(out_dir)!r} already holds {names}; pass --force to replace, or choose another --out")


def reconstruct(
    run_dir: Path | str,
    sigma_rels: Sequence[float],
    out_dir: Path | str | None = None,
    at_kimg: float | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> list[Result]:
    """Reconstruct the EMA of each σ_rel in `sigma_rels` at the latest snapshot time (or `at_kimg`, a stored
    time) from `run_dir`'s snapshots and write each as a checkpoint in `out_dir` (default `RUN_DIR/ema-
    reconstructed/`); existing outputs are replaced only with `force`. Everything is checked before anything is
    written. Returns one `Result` per σ_rel, in the order given."""
    state = PartialState()
    progress = main_process_only(progress, state.is_main_process)
    sigma_rels = check_sigma_rels(list(sigma_rels))
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / OUT_DIR
    stored, nimg, step = select_snapshots(run_dir, at_kimg)
    paths = [out_dir / output_name(s, nimg) for s in sigma_rels]
    _check_outputs(paths, out_dir, force)
    latest = max(stored, key=lambda s: (s.nimg, s.sigma_rel))
    preset_yaml = snapshot_preset(latest.path)
    preset_from_yaml(preset_yaml, str(latest.path))  # a preset that no longer validates fails here, not at sampling
    gammas = [gamma_of_sigma_rel(s) for s in sigma_rels]
    x, residual = solve_profiles([(s.step, s.gamma) for s in stored], [(step, g) for g in gammas])
    coefficients = [{s.path.name: float(x[i, j]) for i, s in enumerate(stored)} for j in range(len(sigma_rels))]
    sources = snapshots_fingerprint(stored)
    results = [
        Result(sigma, gamma, float(residual[j]), path, nimg, step, coefficients[j], sources)
        for j, (sigma, gamma, path) in enumerate(zip(sigma_rels, gammas, paths))
    ]
    state.wait_for_everyone()  # every process has checked the outputs before the main one writes them
    if state.is_main_process:
        for result, ema in zip(results, combine(stored, x, latest, progress)):
            _write(result, ema, preset_yaml)
    for result in results:
        if result.residual > RESIDUAL_NOTE:
            progress(
                Message(
                    f"σ_rel {result.sigma_rel:g}: the stored profiles fit it with residual {result.residual:.3f}; "
                    "store profiles closer to it (train.posthoc_ema) or more often (train.posthoc_ema_kimg)",
                    level="warning",
                )
            )
    state.wait_for_everyone()  # the checkpoints exist before any process samples them (--sweep)
    return results


def combine(
    stored: list[StoredProfile], x: torch.Tensor, latest: StoredProfile, progress: Progress
) -> list[dict[str, torch.Tensor]]:
    """Σ_i x_ij θ̂_i for every target j, reading each snapshot once: float64 accumulators (n_targets, *shape) per
    tensor, cast to float32; tensors that are not floating point (index buffers) are copied from `latest`. Memory:
    8 bytes per parameter and target for the accumulators, plus one snapshot."""
    reference = load_profile_state(latest.path)
    acc = {
        k: torch.zeros((x.shape[1], *v.shape), dtype=torch.float64)
        for k, v in reference.items()
        if v.is_floating_point()
    }
    progress(Start("posthoc-ema", total=len(stored), unit="snapshots", text=f"combining {len(stored)} snapshots"))
    for i, snap in enumerate(stored):
        state = reference if snap.path == latest.path else load_profile_state(snap.path)
        if state.keys() != reference.keys() or any(state[k].shape != reference[k].shape for k in acc):
            raise EmaError(
                f"{snap.path.name} holds other tensors than {latest.path.name} (was the network changed during "
                "the run?); move the snapshots that do not belong aside"
            )
        for k, total in acc.items():
            total.add_(x[i].view(-1, *[1] * state[k].dim()) * state[k].to(torch.float64))
        progress(Step("posthoc-ema", done=i + 1, total=len(stored), status=snap.path.name))
    return [
        {k: acc[k][j].to(torch.float32) if k in acc else v.clone() for k, v in reference.items()}
        for j in range(x.shape[1])
    ]


def _write(result: Result, ema: dict[str, torch.Tensor], preset_yaml: str) -> Path:
    """The reconstruction as a checkpoint holding only the EMA (read like a training checkpoint), atomically."""
    state = {
        "ema": ema,
        "preset": preset_yaml,
        "nimg": result.nimg,
        "step": result.step,
        "reconstruction": {
            "sigma_rel": result.sigma_rel,
            "gamma": result.gamma,
            "residual": result.residual,
            "coefficients": result.coefficients,
        },
    }
    return atomic_write(result.path, lambda f: torch.save(state, f), size=state_nbytes(state))
