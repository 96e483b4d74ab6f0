"""TMSA attention kernels: SDPA with the relative position bias as attn_mask vs flex_attention with it as a score_mod
(and the plain reference maths), per shape of the paper's networks (never asserted in tests).

On CUDA each variant runs forward + backward (input and bias-table gradients) in bf16; on CPU forward only, in
fp32 (PyTorch has no CPU backward for flex_attention, and uncompiled flex on CPU is a reference loop, so the CPU
figures only show that the path runs). The faster kernel on the GPU should be the default (`model.attention_kernel`).

    python benchmarks/bench_attention.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from flops import sync

from diffit_cli.core.attention import TMSA

# (name, batch, tokens per side, width, heads, window) as the networks call TMSA
SHAPES = {
    "latent XL/2 (global 16x16)": (32, 16, 1152, 16, 16),
    "cifar10 stage 0 (32x32, w4)": (64, 32, 128, 4, 4),
    "ffhq64 stage 0 (64x64, w8)": (32, 64, 128, 4, 8),
}
QUICK = {
    "latent B/2-like (global 8x8)": (4, 8, 128, 4, 8),
    "image (16x16, w4)": (4, 16, 64, 2, 4),
}


def time_variant(attn: TMSA, x, x_t, hw, train: bool, dtype, steps: int) -> float:
    """Best wall time of one call (forward, + backward when `train`)."""
    best = float("inf")
    for i in range(steps + 1):  # call 0: warm-up (and compilation for flex on CUDA)
        xi = x.detach().requires_grad_(train)
        sync(x.device)
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(train):
            out = attn(xi, x_t, hw)
        if train:
            out.float().sum().backward()
        sync(x.device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few calls")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    train = device.type == "cuda"
    dtype = torch.bfloat16 if train else torch.float32
    steps = args.steps or (3 if args.quick else 10)
    shapes = QUICK if args.quick or device.type == "cpu" else SHAPES
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if train else 'CPU'}), torch {torch.__version__}; "
        f"{'forward + backward, bf16' if train else 'forward only, fp32'}; best of {steps} calls"
    )
    print(f"{'shape':32} {'sdpa ms':>9} {'flex ms':>9} {'plain ms':>9} {'flex/sdpa':>10}")
    for name, (batch, side, width, heads, window) in shapes.items():
        torch.manual_seed(0)
        attn = TMSA(width, heads, width, window).to(device)
        x, x_t = torch.randn(batch, side * side, width, device=device), torch.randn(batch, width, device=device)
        times = {}
        for label, kernel in (("sdpa", "sdpa"), ("flex", "flex"), ("plain", "reference")):
            attn.kernel = kernel
            times[label] = time_variant(attn, x, x_t, (side, side), train, dtype, steps)
        print(
            f"{name:32} {times['sdpa'] * 1e3:>9.2f} {times['flex'] * 1e3:>9.2f} {times['plain'] * 1e3:>9.2f} "
            f"{times['flex'] / times['sdpa']:>9.2f}x"
        )


if __name__ == "__main__":
    main()
