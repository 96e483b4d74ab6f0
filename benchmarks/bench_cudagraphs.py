"""CUDA graphs for the small image-space networks: which way of capturing works with DiffiT and
what it gains, measured before `train`/`sample` pick one (never asserted in tests).

Training step (EDM loss on fixed random data, fused Adam, bf16 autocast on CUDA; the `cifar10` network at per-GPU
batch 64 and the `ffhq64` network at 32, as the presets build them):
    eager           the network as built
    whole+graphs    torch.compile(network, mode="reduce-overhead"), cudagraph_mark_step_begin() per step
    regional+graphs compile_blocks(mode="reduce-overhead"), torch.compiler.cudagraph_mark_step_begin() per step
    regional        build.compile_blocks (what `train.compile` does on CUDA today)
    whole           torch.compile(network)
Per variant: the seconds of compiling and warm-up, img/s, TFLOP/s and MFU against the datasheet peak (analytic
FLOPs, benchmarks/flops.py), the speed-up over eager, and the loss of the last timed step against eager's (same
initial weights and draws: capturing must not change the maths beyond bf16 noise). A variant that fails prints its
error and the others go on.

Sampling: the `cifar10` network, EDM Heun 18 (NFE 35) at batch 256: img/s (a run without per-call syncs) and the
share of time outside network calls (a second run that times each call) for eager, whole+graphs and
regional+graphs (target ≤ 5 %).

    python benchmarks/bench_cudagraphs.py               # CUDA
    python benchmarks/bench_cudagraphs.py --quick       # tiny widths, few steps: checks that every path runs (CPU)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from bench_samplers import Timed
from flops import datasheet_peak, mfu_text, sync, train_flops

from diffit_cli.build import build_diffusion, build_network, compile_blocks
from diffit_cli.config import load_preset
from diffit_cli.core.samplers import nfe, sample

TINY = {
    "cifar10": ["model.channels=[32, 64, 64]", "model.time_dim=64"],
    "ffhq64": ["model.channels=[32, 64, 64, 64]", "model.time_dim=64"],
}
BATCH = {"cifar10": 64, "ffhq64": 32}
VARIANTS = ("eager", "whole+graphs", "regional+graphs", "regional", "whole")  # the most wanted first


def prepare(variant: str, net: torch.nn.Module, backend: str):
    """(callable network, whether steps must be marked) for a variant; compiles `net` in place for regional ones."""
    graphs = variant.endswith("+graphs")
    options = {"backend": backend, **({"mode": "reduce-overhead"} if graphs else {})}
    if variant.startswith("regional"):
        failed = []
        compile_blocks(net, failed.append, **options)
        return net, graphs, failed
    if variant.startswith("whole"):
        return torch.compile(net, dynamic=False, **options), graphs, []
    return net, False, []


def failed_line(variant: str, e: Exception) -> None:
    print(f"{variant:16} failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:140]}")


def train_case(name: str, args, device: torch.device, dtype: torch.dtype | None) -> None:
    preset = load_preset(name, (TINY[name] if args.quick else []) + ["model.dropout=0.0"])
    batch = 4 if args.quick else BATCH[name]
    diffusion = build_diffusion(preset.diffusion, preset.model)
    m = preset.model
    torch.manual_seed(0)
    initial = build_network(m, device)
    flops = train_flops(initial) * batch
    shape = (m.in_channels, m.img_resolution, m.img_resolution)
    x0 = torch.randn(batch, *shape, device=device)
    aug = x0.new_zeros(batch, m.augment_dim) if m.augment_dim else None
    peak = datasheet_peak(device, "bf16" if dtype else "fp32")
    print(
        f"\n{name} network, per-GPU batch {batch}, {'bf16' if dtype else 'fp32'}, "
        f"{flops / batch / 1e9:.2f} GFLOP per training image"
    )
    print(f"{'variant':16} {'warm-up s':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU peak':>9} {'× eager':>8} {'loss Δ':>8}")
    base = {}
    for variant in VARIANTS:
        net = copy.deepcopy(initial).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")
        gen = torch.Generator(device)
        try:
            call, graphs, failed = prepare(variant, net, args.backend)

            def step(i: int, call=call, graphs=graphs, gen=gen, opt=opt) -> torch.Tensor:
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                gen.manual_seed(i)  # the same σ and noise for every variant
                draws = diffusion.training_noise(batch, shape, gen)
                loss = diffusion.loss(call, x0, None, aug, autocast_dtype=dtype, **draws).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            t0 = time.perf_counter()
            for i in range(args.warmup):  # compiling, cudagraph warm-up and recording
                step(i)
            sync(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(args.warmup, args.warmup + args.steps):
                loss = step(i)
            sync(device)
            dt = (time.perf_counter() - t0) / args.steps
            if failed:
                raise RuntimeError(failed[0])
        except Exception as e:  # a path that does not work here: say so and go on with the others
            failed_line(variant, e)
            continue
        finally:
            del net, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base.setdefault("dt", dt)
        base.setdefault("loss", float(loss))
        achieved = flops / dt
        print(
            f"{variant:16} {warm:>9.1f} {batch / dt:>9.1f} {achieved / 1e12:>8.2f} {mfu_text(achieved, peak):>9} "
            f"{base['dt'] / dt:>7.2f}× {abs(float(loss) - base['loss']) / base['loss']:>7.1e}"
        )


def marked(net):
    """`net` with a new CUDA-graph iteration marked before each call (the sampler keeps no output across calls)."""

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return net(*args, **kwargs)

    return call


def sampling_case(args, device: torch.device, dtype: torch.dtype | None) -> None:
    preset = load_preset("cifar10", TINY["cifar10"] if args.quick else [])
    batch, steps = (4, 3) if args.quick else (args.sample_batch, 18)
    diffusion = build_diffusion(preset.diffusion, preset.model)
    torch.manual_seed(0)
    initial = build_network(preset.model, device).eval()
    noise = torch.randn(batch, 3, 32, 32, device=device)
    gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
    print(
        f"\ncifar10 network sampling: EDM Heun {steps} steps (NFE {nfe('heun', steps)}), batch {batch}, "
        f"{'bf16' if dtype else 'fp32'}"
    )
    print(f"{'variant':16} {'warm-up s':>9} {'img/s':>9} {'outside net':>12} {'max |Δx0|':>10}")
    reference = None
    for variant in ("eager", "whole+graphs", "regional+graphs"):
        net = copy.deepcopy(initial)
        try:
            call, graphs, failed = prepare(variant, net, args.backend)
            call = marked(call) if graphs else call

            def run(network):
                return sample(
                    diffusion, network, noise, sampler="heun", steps=steps, generators=gens, autocast_dtype=dtype
                )

            t0 = time.perf_counter()
            run(call)  # compiling, warm-up and recording
            sync(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            x0 = run(call)
            sync(device)
            total = time.perf_counter() - t0
            timed = Timed(call, device)
            t0 = time.perf_counter()
            run(timed)
            sync(device)
            outside = 1 - timed.seconds / (time.perf_counter() - t0)
            if failed:
                raise RuntimeError(failed[0])
        except Exception as e:
            failed_line(variant, e)
            continue
        finally:
            del net
        reference = x0 if reference is None else reference
        print(
            f"{variant:16} {warm:>9.1f} {batch / total:>9.1f} {outside:>11.1%} "
            f"{(x0 - reference).abs().max().item():>10.2e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny widths, batch 4, 2 timed steps")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per variant (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, graph recording)")
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick CPU check)")
    ap.add_argument("--cases", default="cifar10,ffhq64,sampling")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.quick else 20)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (CUDA graphs need CUDA: capture is skipped)"
    print(f"device: {name}; torch {torch.__version__}; backend {args.backend}")
    for case in args.cases.split(","):
        if case == "sampling":
            with torch.no_grad():
                sampling_case(args, device, dtype)
        else:
            train_case(case, args, device, dtype)


if __name__ == "__main__":
    main()
