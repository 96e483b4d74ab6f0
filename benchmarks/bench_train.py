"""Training throughput per preset: images/s, peak memory and the data loader's share of step time.

Runs the real `diffit_cli.training.train` loop (no copy of it) for a few reports per preset. On CPU the
presets are shrunk to tiny widths (the figures measure the loop, not the paper's networks); with
`--full` on a GPU they run at paper size with a per-device batch that fits.

    python benchmarks/bench_train.py            # CPU: tiny widths
    python benchmarks/bench_train.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

from diffit_cli.config import load_preset
from diffit_cli.events import Step
from diffit_cli.training import train

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


def run(name: str, overrides: list[str], steps: int, workers: int) -> dict:
    preset = load_preset(name, overrides)
    batch = preset.train.batch
    total = steps * batch / 1000
    preset = load_preset(name, overrides + [f"train.total_kimg={total}", f"train.report_kimg={batch / 1000}",
                                            f"train.snapshot_kimg={total * 10}", f"data.num_workers={workers}"])
    reports = []
    with tempfile.TemporaryDirectory() as d:
        train(preset, d, progress=lambda e: reports.append(e.figures) if isinstance(e, Step) else None)
    steady = reports[1:] or reports  # the first step pays for warm-up
    img_s = sum(r["img_per_s"] for r in steady) / len(steady)
    data = sum(r["data_share"] for r in steady) / len(steady)
    mem = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"preset": name, "batch": batch, "img_per_s": img_s, "data_share": data, "peak_gib": mem,
            "precision": preset.train.mixed_precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 steps per preset")
    ap.add_argument("--full", action="store_true", help="paper-sized networks (GPU)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    steps = 3 if args.quick else 8
    cases = {k: ([] if args.full else v) + SHAPES for k, v in TINY.items()}
    with tempfile.TemporaryDirectory() as d:
        lat = ["model.input_size=8", "data.resolution=64", "model.hidden_size=128", "model.depth=4",
               "model.num_heads=4", "train.batch=32"] if not args.full else ["train.batch_gpu=32"]
        size = 8 if not args.full else 32
        lat.append(f"data.path={_latent_shards(Path(d) / 'lat', size)}")
        if not torch.cuda.is_available():
            lat.append("train.mixed_precision=bf16")
        cases["imagenet256"] = lat
        rows = [run(name, ov, steps, args.workers) for name, ov in cases.items()]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev}; torch {torch.__version__}; {'paper-sized' if args.full else 'tiny widths'}; "
          f"{steps} steps per preset (first one excluded)")
    print(f"{'preset':12} {'batch':>6} {'prec':>5} {'img/s':>9} {'data share':>11} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['preset']:12} {r['batch']:>6} {r['precision']:>5} {r['img_per_s']:>9.1f} "
              f"{r['data_share']:>10.1%} {r['peak_gib']:>9.2f}")
    print("peak memory: CUDA max allocated on GPU, process max RSS on CPU (cumulative over the presets)")


if __name__ == "__main__":
    main()
