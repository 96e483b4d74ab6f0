"""Analytic FLOPs of the DiffiT networks, the device's ceilings and model FLOP utilisation (MFU), shared by
bench_networks.py and bench_train.py (never asserted against a speed in tests).

FLOPs per image (one multiply-add = 2 FLOPs; T = tokens of the layer's feature map, C = its width):
    Linear over T tokens                 2·T·in·out
    Conv2d k×k, H×W output               2·H·W·k²·(in/groups)·out
    attention (one TMSA)                 2·2·T·N_kv·C        q·kᵀ and softmax·v; N_kv = window tokens (w², the whole
                                                             grid for the latent model), +1 with time_mode=separate
    per-sample linears                   2·in·out once       time MLP, x_t·W_t of TMSA, adaLN, time-bias maps
    train step = forward + backward = 3 × forward            (backward: input and weight gradients, each ≈ forward)
Not counted: norms, activations, softmax, residual adds, embedding lookups (O(T·C), small next to the GEMMs).
XL/2 at 256: 28·(24·T·D² + 4·T²·D) + embed/head ≈ 237.2 GFLOP forward (DiT's 118.6 G multiply-adds), 712 GFLOP a
training image. `tests/test_flops.py` checks the count against torch.utils.flop_counter on tiny networks.

MFU = achieved FLOP/s ÷ ceiling, against two ceilings: the dense GEMM rate of the same dtype measured on this device
in the same run, and the datasheet dense peak when the device is in PEAK_TFLOPS.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn

from diffit_cli.core.layers import DiffiTBlock
from diffit_cli.core.unet import ImageDiffiT, ResBlock
from diffit_cli.core.vit import LatentDiffiT

# Datasheet dense (no sparsity) tensor-core peaks in TFLOP/s: bf16/fp16, and fp32 without TF32 (the benchmarks
# turn TF32 off so fp32 means fp32). Matched against torch.cuda.get_device_name(), first match wins.
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H200",), {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    (("H100", "PCIe"), {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    (("H100",), {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _linear(m: nn.Linear, tokens: int) -> int:
    return 2 * tokens * m.in_features * m.out_features


def _conv(m: nn.Conv2d, h: int, w: int) -> int:
    """FLOPs of a conv whose output is h×w."""
    kh, kw = m.kernel_size
    return 2 * h * w * kh * kw * (m.in_channels // m.groups) * m.out_channels


def _per_sample(module: nn.Module) -> int:
    """Every Linear of `module` applied once per image (time-token paths)."""
    return sum(_linear(m, 1) for m in module.modules() if isinstance(m, nn.Linear))


def block_flops(block: DiffiTBlock, tokens: int) -> int:
    """One DiffiT block over `tokens` tokens: token-wise qkv/proj/MLP, the attention matmuls, per-sample terms."""
    attn, mlp = block.attn, block.mlp
    tokenwise = (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
    flops = sum(_linear(m, tokens) for m in tokenwise)
    flops += sum(_linear(m, 1) for m in block.modules() if isinstance(m, nn.Linear) and m not in tokenwise)
    kv = attn.window_size**2 + (attn.time_mode == "separate")
    return flops + 4 * tokens * kv * attn.num_heads * attn.head_dim


def _stage_flops(stage: nn.Module, res: int) -> int:
    """One U-Net stage at output resolution `res`: down/up conv, width conv, its ResBlocks."""
    flops = sum(_conv(getattr(stage, k).conv, res, res) for k in ("down", "up") if hasattr(stage, k))
    if isinstance(stage.proj, nn.Conv2d):
        flops += _conv(stage.proj, res, res)
    for b in stage.blocks:
        assert isinstance(b, ResBlock)
        flops += _conv(b.conv, res, res) + block_flops(b.block, res * res)
    return flops


def forward_flops(net: nn.Module) -> int | None:
    """Analytic forward FLOPs per image (formula in the module doc); None for networks it does not know."""
    if isinstance(net, LatentDiffiT):
        g = net.grid
        flops = _conv(net.x_embedder.proj, g, g) + _per_sample(net.t_embedder)
        flops += sum(block_flops(b, g * g) for b in net.blocks)
        fl = net.final_layer
        flops += _linear(fl.linear, g * g) + (_per_sample(fl.adaLN_modulation) if fl.adaLN_modulation else 0)
        return flops
    if isinstance(net, ImageDiffiT):
        r = net.img_resolution
        n = len(net.enc)
        flops = _conv(net.tokenizer, r, r) + _conv(net.head[-1], r, r) + _per_sample(net.t_embedder)
        flops += sum(_stage_flops(s, r >> i) for i, s in enumerate(net.enc))
        flops += sum(_stage_flops(s, r >> i) for s, i in zip(net.dec, reversed(range(n - 1))))
        return flops
    return None


def train_flops(net: nn.Module) -> int | None:
    """FLOPs of one training image: forward + backward = 3 × forward."""
    f = forward_flops(net)
    return None if f is None else 3 * f


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Dense square matmul FLOP/s (best single product), the machine's practical ceiling for this dtype."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def datasheet_peak(device: torch.device, dtype: str) -> float | None:
    """Datasheet dense peak FLOP/s of this device for `dtype` ("bf16", "fp16", "fp32"), None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for keys, peaks in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return peaks[dtype] * 1e12
    return None


def mfu_text(achieved: float, ceiling: float | None) -> str:
    return "n/a" if ceiling is None else f"{achieved / ceiling:.1%}"


def largest_batch(step_at: Callable[[int], None], start: int, limit: int = 4096) -> int | None:
    """Largest per-GPU batch for which `step_at(batch)` (one full train step) runs without CUDA OOM: doubling from
    `start`, then bisection. None on CPU (no allocator limit to probe) — print n/a."""
    if not torch.cuda.is_available():
        return None

    def fits(b: int) -> bool:
        try:
            step_at(b)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    if not fits(start):
        lo, hi = 0, start
    else:
        lo = start
        while lo * 2 <= limit and fits(lo * 2):
            lo *= 2
        hi = min(lo * 2, limit + 1)
    while hi - lo > max(1, lo // 16):  # to within ~6 %
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo or None
