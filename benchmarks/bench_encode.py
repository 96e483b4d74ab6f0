"""`diffit encode-latents` throughput against a bare `vae.encode` loop over the same batches.

Both sides encode every image and its mirror (the shard format stores both). The ratio
encode-latents / bare loop is the share of time not lost to decoding, I/O and bookkeeping
(target ≥ 0.9), taken in the steady state (from the first encoded batch to the last): a real run
encodes a million images, so its one-off start (loading and hashing the VAE, starting the loader
workers, fingerprinting the source) is printed apart, in seconds. Without a Hub VAE at hand the SD-VAE
(sd-vae-ft-ema config) is built with random weights: the encoder's cost does not depend on the weights.

    python benchmarks/bench_encode.py                 # 64 images at 64², batch 16
    python benchmarks/bench_encode.py --resolution 256 --images 256 --batch 32 --vae stabilityai/sd-vae-ft-ema
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffit_cli.codecs import VAECodec, load_vae, vae_config
from diffit_cli.encode_latents import encode_latents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vae", default=None, help="Hub id, folder or file; default: random-weight SD-VAE")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.vae is None:
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(vae_config())
    else:
        vae = load_vae(args.vae)
    codec = VAECodec(vae, device=device, precision=args.precision)

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "imgs"
        rng = np.random.default_rng(0)
        for c in range(4):  # an ImageNet-style class-folder dataset of JPEGs (decode cost included)
            (src / f"class{c}").mkdir(parents=True)
        for i in range(args.images):
            arr = rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8)
            Image.fromarray(arr).save(src / f"class{i % 4}" / f"{i:05d}.jpg", quality=95)
        batches = [
            torch.from_numpy(
                rng.integers(
                    0, 256, (min(args.batch, args.images - i), 3, args.resolution, args.resolution), dtype=np.uint8
                )
            )
            for i in range(0, args.images, args.batch)
        ]

        def bare() -> float:
            t = time.perf_counter()
            for x in batches:
                mean, std = codec.encode_stats(torch.cat([x, x.flip(3)]).to(device))
                mean.cpu(), std.cpu()
            return args.images / (time.perf_counter() - t)

        def bare_steady() -> float:  # same accounting as the tool's steady state: the first batch excluded
            t = None
            for x in batches:
                mean, std = codec.encode_stats(torch.cat([x, x.flip(3)]).to(device))
                mean.cpu(), std.cpu()
                t = time.perf_counter() if t is None else t
            return (args.images - batches[0].shape[0]) / (time.perf_counter() - t)

        def tool(i: int) -> tuple[float, float, float]:
            """(end-to-end img/s, start-up s until the first batch is encoded, steady img/s after it)"""
            marks = []
            t = time.perf_counter()
            encode_latents(
                src,
                Path(d) / f"out{i}",
                resolution=args.resolution,
                vae=vae,
                batch=args.batch,
                precision=args.precision,
                shard_size=max(args.batch * 4, 64),
                num_workers=args.workers,
                device=device,
                progress=lambda p: marks.append((time.perf_counter(), p.done)),
            )
            end = time.perf_counter()
            first_t, first_n = marks[0]
            return args.images / (end - t), first_t - t, (args.images - first_n) / (end - first_t)

        bare()  # warm-up
        r_bare = max(bare_steady() for _ in range(2))
        runs = [tool(i) for i in range(2)]
        e2e, startup, steady = max(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs)
    print(
        f"device {device}; {args.images} images at {args.resolution}² (+ mirrors), batch {args.batch}, "
        f"{args.precision}, {args.workers} loader workers"
    )
    print(f"bare vae.encode loop : {r_bare:8.2f} img/s (steady)")
    print(f"diffit encode-latents: {steady:8.2f} img/s (steady); {e2e:.2f} img/s end to end, {startup:.2f} s start-up")
    print(f"ratio                : {steady / r_bare:8.2f}  (target ≥ 0.90, steady state)")


if __name__ == "__main__":
    main()
