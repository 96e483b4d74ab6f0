"""Training throughput per preset: images/s, MFU, peak memory, the largest per-GPU batch and the data loader's share.

Runs the real `diffit_cli.training.train` loop (no copy of it) for a few reports per preset. MFU = analytic FLOPs
per training image (matmul + conv + attention, forward + backward = 3 × forward; formula in benchmarks/flops.py)
× img/s, against the dense GEMM rate of the preset's precision measured here and the datasheet peak when the
device is known. The largest batch (CUDA only) is probed with a bare train step of the same network. On CPU the
presets are shrunk to tiny widths (the figures measure the loop, not the paper's networks); with
`--full` on a GPU they run at paper size with a per-device batch that fits.

    python benchmarks/bench_train.py            # CPU: tiny widths
    python benchmarks/bench_train.py --quick    # fewer steps
    python benchmarks/bench_train.py --full --presets imagenet256,cifar10    # GPU: paper sizes, these first
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch
from flops import DTYPES, datasheet_peak, gemm_rate, largest_batch, mfu_text, train_flops

from diffit_cli.build import build_network, build_optimizer
from diffit_cli.config import load_preset
from diffit_cli.events import Step
from diffit_cli.training import train
from diffit_cli.training.recipe import enable_activation_checkpointing
from diffit_cli.training.setup import training_precision

SHAPES = ["data.path=null", "data.synthetic=varied"]  # throughput on the built-in shapes: no dataset to fetch
TINY = {
    "demo": [],
    "cifar10": ["model.channels=[32, 64, 64]", "model.time_dim=64", "train.batch=32"],
    "ffhq64": ["model.channels=[32, 64, 64, 64]", "model.time_dim=64", "train.batch=16"],
}


def _latent_shards(root: Path, size: int) -> Path:
    """Random latent stats in the encode-latents shard format (no VAE needed to benchmark the loop)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import fake_latent_shards

    return fake_latent_shards(root, n=256, size=size, classes=1000)


def bare_step(preset, device: torch.device):
    """step_at(batch): one forward + backward + optimizer step of the preset's network at that batch."""
    m, tc = preset.model, preset.train

    def step_at(batch: int) -> None:
        net = build_network(m, device)
        if tc.grad_checkpointing:
            enable_activation_checkpointing(net)
        opt = build_optimizer(net.parameters(), tc)
        x = torch.randn(batch, m.in_channels, m.spatial_size, m.spatial_size, device=device)
        y = torch.randint(0, m.num_classes, (batch,), device=device) if m.num_classes else None
        with torch.autocast(device.type, DTYPES.get(tc.mixed_precision), enabled=tc.mixed_precision != "fp32"):
            out = net(x, torch.rand(batch, device=device), y)
        out.float().square().mean().backward()
        opt.step()
        torch.cuda.synchronize(device)

    return step_at


def run(name: str, overrides: list[str], steps: int, workers: int) -> dict:
    preset = load_preset(name, overrides)
    batch = preset.train.batch
    total = steps * batch / 1000
    preset = load_preset(
        name,
        overrides
        + [
            f"train.total_kimg={total}",
            f"train.report_kimg={batch / 1000}",
            f"train.snapshot_kimg={total * 10}",
            f"data.num_workers={workers}",
        ],
    )
    reports = []
    with tempfile.TemporaryDirectory() as d:
        state = train(preset, d, progress=lambda e: reports.append(e.figures) if isinstance(e, Step) else None)
    if state.preempted:  # training collects SIGTERM/SIGUSR1 to checkpoint: here it means stop the benchmark
        raise SystemExit(f"stopped by {state.preempted}")
    steady = reports[1:] or reports  # the first step pays for warm-up
    img_s = sum(r["img_per_s"] for r in steady) / len(steady)
    data = sum(r["data_share"] for r in steady) / len(steady)
    mem = (
        torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    with torch.device("meta"):
        flops = train_flops(build_network(preset.model))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    per_gpu = preset.train.batch_gpu or batch
    return {
        "preset": name,
        "batch": batch,
        "img_per_s": img_s,
        "data_share": data,
        "peak_gib": mem,
        "precision": training_precision(preset.train.mixed_precision),
        "flops": flops,
        "max_batch": largest_batch(bare_step(preset, device), per_gpu) if device.type == "cuda" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 steps per preset")
    ap.add_argument("--full", action="store_true", help="paper-sized networks (GPU)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--presets", default="demo,cifar10,ffhq64,imagenet256", help="which presets, in this order")
    args = ap.parse_args()
    steps = 3 if args.quick else 8
    cases = {k: ([] if args.full else v) + SHAPES for k, v in TINY.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    if device.type == "cuda":  # fp32 means fp32 in the probe as in the step (train() leaves TF32 at its default)
        torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as d:
        lat = (
            [
                "model.input_size=8",
                "data.resolution=64",
                "model.hidden_size=128",
                "model.depth=4",
                "model.num_heads=4",
                "train.batch=32",
            ]
            if not args.full
            else ["train.batch_gpu=32"]
        )
        size = 8 if not args.full else 32
        lat.append(f"data.path={_latent_shards(Path(d) / 'lat', size)}")
        if not torch.cuda.is_available():
            lat.append("train.mixed_precision=bf16")
        cases["imagenet256"] = lat
        unknown = [k for k in args.presets.split(",") if k not in cases]
        if unknown:
            ap.error(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(cases)}")
        cases = {k: cases[k] for k in args.presets.split(",")}
        # the precision training really runs (a bf16 GEMM probe on a CPU without native bf16 takes minutes)
        precisions = {training_precision(load_preset(k, v).train.mixed_precision) for k, v in cases.items()}
        rates = {p: gemm_rate(device, DTYPES[p], 1.0 if args.quick else 2.0) for p in precisions}
        print(
            f"device: {dev}; torch {torch.__version__}; {'paper-sized' if args.full else 'tiny widths'}; "
            f"{steps} steps per preset (first one excluded); measured GEMM rate: "
            + ", ".join(f"{p} {v / 1e12:.3f} TFLOP/s" for p, v in rates.items()),
            flush=True,
        )
        print(
            f"{'preset':12} {'batch':>6} {'prec':>5} {'img/s':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU GEMM':>9} "
            f"{'MFU peak':>9} {'data share':>11} {'peak GiB':>9} {'max batch':>10}",
            flush=True,
        )
        for name, ov in cases.items():  # each row as soon as its case has run
            r = run(name, ov, steps, args.workers)
            achieved = r["flops"] * r["img_per_s"]
            print(
                f"{r['preset']:12} {r['batch']:>6} {r['precision']:>5} {r['img_per_s']:>9.1f} "
                f"{r['flops'] / 1e9:>10.3f} {achieved / 1e12:>8.3f} {mfu_text(achieved, rates[r['precision']]):>9} "
                f"{mfu_text(achieved, datasheet_peak(device, r['precision'])):>9} {r['data_share']:>10.1%} "
                f"{r['peak_gib']:>9.2f} {r['max_batch'] or 'n/a':>10}",
                flush=True,
            )
    print(
        "peak memory: CUDA max allocated on GPU, process max RSS on CPU (cumulative over the presets); max batch: "
        "largest per-GPU batch of a bare train step that fits (CUDA only); MFU uses the whole loop's img/s "
        "(data loading, EMA, reports included)"
    )


if __name__ == "__main__":
    main()
