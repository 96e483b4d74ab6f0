"""Sampler overhead: time per sample and the share of wall time spent outside network evaluations.

Every sampler runs at NFE 35 (heun 18 steps = 2·18 − 1; the others 35 steps) with a small conv net,
EDM samplers on an image-space EDM model, DDPM samplers (and the σ samplers through the ε adapter) on a
latent-space GaussianDiffusion model with learned σ, optionally with classifier-free guidance.
Target: outside-network share ≤ 3% for heun at NFE 35. Figures on shared CPUs are noisy.

Then the latent model's sampling throughput: DiffiT-XL/2 (random weights) with 250-step DDPM and
three-channel CFG in bf16 at batch 64/128/256 per GPU: img/s (a run without per-call syncs), the share of time
outside network calls (a second run that times each call), and the FID-50K wall time this img/s implies on one GPU
and on 8 (seeds split by process). On CPU (or with --quick) a tiny latent ViT at batch 2/4 and 10 steps stands in.

    python benchmarks/bench_samplers.py [--quick] [--device cuda] [--batch 16] [--resolution 32] [--xl-steps 250]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from diffit_cli.core.ddpm import GaussianDiffusion
from diffit_cli.core.edm import EDM
from diffit_cli.core.guidance import Guidance
from diffit_cli.core.samplers import nfe, sample
from diffit_cli.core.vit import LATENT_SIZES, LatentDiffiT

STEPS_AT_NFE35 = {"heun": 18, "euler": 35, "dpmpp-2m": 35, "ddpm": 35, "ddim": 35}


class SmallNet(nn.Module):
    """Conv net with a sinusoidal time embedding and an optional label table: net(x, t, y)."""

    def __init__(self, in_ch: int, out_ch: int, width: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        self.width = width
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, width, 3, padding=1)
        self.body = nn.Sequential(
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = self.time(torch.cat([torch.cos(args), torch.sin(args)], dim=1))  # (B, width)
        if self.label is not None and y is not None:
            emb = emb + self.label(y)
        h = self.conv_in(x) + emb[:, :, None, None]
        return self.conv_out(h + self.body(h))


class Timed:
    """Wraps a network and accumulates the wall time of its calls (synchronising on CUDA)."""

    def __init__(self, net: nn.Module, device: torch.device) -> None:
        self.net, self.cuda, self.seconds, self.calls = net, device.type == "cuda", 0.0, 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, *args, **kwargs):
        self._sync()
        t0 = time.perf_counter()
        out = self.net(*args, **kwargs)
        self._sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def bench(diffusion, net, sampler: str, shape, batch: int, device, repeats: int, guidance=None, y=None) -> dict:
    steps = STEPS_AT_NFE35[sampler]
    best = None
    for r in range(repeats + 1):  # the first run warms up
        gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
        timed = Timed(net, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample(diffusion, timed, noise, y=y, sampler=sampler, steps=steps, generators=gens, guidance=guidance)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        if r and (best is None or total < best["total"]):
            best = {"total": total, "net": timed.seconds, "calls": timed.calls}
    return {
        **best,
        "nfe": nfe(sampler, steps),
        "per_sample_ms": 1e3 * best["total"] / batch,
        "outside": (best["total"] - best["net"]) / best["total"],
    }


def latent_throughput(device: torch.device, tiny: bool, steps: int) -> None:
    """img/s and outside-network share of guided DDPM sampling with the latent DiffiT (see module doc)."""
    torch.manual_seed(0)
    if tiny:
        net, res, batches, steps = LatentDiffiT(input_size=8, hidden_size=64, depth=2, num_heads=2), 8, (2, 4), 10
    else:
        net, res, batches = LatentDiffiT(input_size=32, **LATENT_SIZES["XL/2"]), 32, (64, 128, 256)
    net = net.to(device).eval()
    guidance = Guidance(scale=4.0, channels=3)  # the release's three-channel CFG (constant: every call doubled)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    print(
        f"\nlatent DiffiT {'tiny (hidden 64, depth 2, 8×8)' if tiny else 'XL/2 (32×32 latents)'}, DDPM {steps} "
        f"steps, 3-channel CFG, {'bf16' if dtype else 'fp32'}"
    )
    print(f"{'batch':>6} {'img/s':>9} {'outside net':>12} {'FID-50K 1 GPU':>14} {'8 GPUs':>9}")
    for batch in batches:
        y = torch.arange(batch, device=device) % 1000
        gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        noise = torch.randn(batch, 4, res, res, device=device)

        def run(network, n, noise=noise, y=y, gens=gens):
            sample(
                GaussianDiffusion(),
                network,
                noise,
                y=y,
                sampler="ddpm",
                steps=n,
                generators=gens,
                guidance=guidance,
                autocast_dtype=dtype,
            )

        run(net, 2)  # warm-up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        run(net, steps)
        sync()
        total = time.perf_counter() - t0
        timed = Timed(net, device)
        t0 = time.perf_counter()
        run(timed, steps)
        sync()
        outside = 1 - timed.seconds / (time.perf_counter() - t0)
        img_s = batch / total
        print(
            f"{batch:>6} {img_s:>9.2f} {100 * outside:>11.2f}% {50_000 / img_s / 3600:>12.2f} h "
            f"{50_000 / 8 / img_s / 3600:>7.2f} h"
        )
    print("FID-50K columns: 50,000 images at the img/s above (sampling only: no VAE decode, no Inception)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, 16×16, one timed repeat")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--xl-steps", type=int, default=250, help="DDPM steps of the latent throughput runs")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.resolution, args.repeats = 4, 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    res = args.resolution
    image_net = SmallNet(3, 3).to(device).eval()
    latent_net = SmallNet(4, 8, num_classes=10).to(device).eval()
    y = torch.arange(args.batch, device=device) % 10
    runs = [("image EDM", EDM(), image_net, s, (3, res, res), None, None) for s in ("heun", "euler", "dpmpp-2m")]
    runs += [
        ("latent DDPM", GaussianDiffusion(), latent_net, s, (4, res, res), None, y)
        for s in ("ddpm", "ddim", "heun", "dpmpp-2m")
    ]
    runs += [
        (
            "latent DDPM + CFG 4.4 p-cos",
            GaussianDiffusion(),
            latent_net,
            s,
            (4, res, res),
            Guidance(scale=4.4, schedule="power-cosine", null_class=10),
            y,
        )
        for s in ("ddpm", "heun")
    ]
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"{res}×{res}, best of {args.repeats}"
    )
    print(
        f"{'model':<28} {'sampler':<9} {'NFE':>4} {'calls':>5} {'ms/sample':>10} {'net ms/call':>11} "
        f"{'outside net':>11}"
    )
    for label, diffusion, net, sampler, shape, guidance, labels in runs:
        r = bench(diffusion, net, sampler, shape, args.batch, device, args.repeats, guidance, labels)
        print(
            f"{label:<28} {sampler:<9} {r['nfe']:>4} {r['calls']:>5} {r['per_sample_ms']:>10.2f} "
            f"{1e3 * r['net'] / r['calls']:>11.2f} {100 * r['outside']:>10.2f}%"
        )
    latent_throughput(device, args.quick or device.type == "cpu", args.xl_steps)


if __name__ == "__main__":
    with torch.no_grad():
        main()
