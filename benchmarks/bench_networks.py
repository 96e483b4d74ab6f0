"""Train-step throughput of the DiffiT networks vs. this machine's own GEMM rate (never asserted in tests).

For each network: images/s of one AdamW train step (forward + backward + optimizer; fused AdamW as training uses),
analytic FLOPs per image (matmul + conv + attention, forward + backward = 3 × forward; the formula is in
benchmarks/flops.py), achieved TFLOP/s, MFU against the dense GEMM rate of the same dtype measured in the same run
(fp32 and bf16) and against the datasheet peak when the device is known, peak memory, and on CUDA the largest
per-GPU batch that fits (bf16, SDPA); for SDPA and for the plain reference attention path.

    python benchmarks/bench_networks.py [--quick] [--steps N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from flops import datasheet_peak, gemm_rate, largest_batch, sync, train_flops

from diffit_cli.build import count_parameters
from diffit_cli.core.attention import set_attention_kernel
from diffit_cli.models import LATENT_SIZES, ImageDiffiT, LatentDiffiT
from diffit_cli.training.setup import CPU_BF16_VARIABLE, native_cpu_bf16

CIFAR10 = dict(img_resolution=32, channels=(128, 256, 256), blocks=(2, 2, 2), window_size=4, head_dim=32, time_dim=512)
FFHQ64 = dict(
    img_resolution=64, channels=(128, 256, 256, 256), blocks=(1, 2, 2, 2), window_size=8, head_dim=32, time_dim=512
)


class PeakMemory:
    """Peak memory of a region: CUDA allocator peak, or the process's peak RSS (VmHWM, reset via clear_refs)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, float("nan")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError, StopIteration):
                self.peak = self._status("VmHWM:")


def make_case(name: str, device: torch.device, batch: int | None = None):
    """(model, batch builder) for a named case; inputs mimic training (noisy x, t, labels)."""
    torch.manual_seed(0)
    batch = batch or int(name.split()[-1])
    if name.startswith("latent"):
        size, res = name.split()[1], 32
        model = LatentDiffiT(input_size=res, **LATENT_SIZES[size])

        def inputs():
            return (
                torch.randn(batch, 4, res, res, device=device),
                torch.randint(0, 1000, (batch,), device=device),
                torch.randint(0, 1000, (batch,), device=device),
            )

        target_ch = 8
    else:
        cfg = FFHQ64 if "ffhq64" in name else CIFAR10
        res = cfg["img_resolution"]
        model = ImageDiffiT(**cfg, dropout=0.0)

        def inputs():
            return (torch.randn(batch, 3, res, res, device=device), torch.randn(batch, device=device))

        target_ch = 3
    last = model.final_layer.linear if isinstance(model, LatentDiffiT) else model.head[-1]
    torch.nn.init.normal_(last.weight, std=0.02)  # a realistic (non-zero) head
    model.to(device).train()
    target = torch.randn(batch, target_ch, res, res, device=device)
    return model, inputs, target, batch


def step_fn(model, opt, inputs, target, bf16: bool, device: torch.device):
    def step():
        args = inputs()
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            loss = F.mse_loss(model(*args).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_case(name, device, steps, rates):
    """Time every (dtype, attention path) variant round-robin, so load from other processes hits all alike;
    report each variant's best step (the least disturbed one) and its peak memory."""
    model, inputs, target, batch = make_case(name, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    flops = train_flops(model) * batch
    variants = [
        (bf16, sdpa) for bf16 in (False, True) if ("bf16" if bf16 else "fp32") in rates for sdpa in (True, False)
    ]
    steps_of = {v: step_fn(model, opt, inputs, target, v[0], device) for v in variants}
    best = {v: float("inf") for v in variants}
    peak = {v: 0.0 for v in variants}
    for i in range(steps + 1):  # round 0 is warm-up
        for v in variants:
            set_attention_kernel(model, "sdpa" if v[1] else "reference")
            sync(device)
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                steps_of[v]()
                sync(device)
                dt = time.perf_counter() - start
            if i:
                best[v], peak[v] = min(best[v], dt), max(peak[v], mem.peak)
    rows = []
    for (bf16, sdpa), dt in best.items():
        dtype = "bf16" if bf16 else "fp32"
        peak_flops = datasheet_peak(device, dtype)
        rows.append(
            dict(
                case=name,
                dtype=dtype,
                attn="sdpa" if sdpa else "plain",
                img_s=batch / dt,
                step_ms=dt * 1e3,
                tflops=flops / dt / 1e12,
                of_gemm=flops / dt / rates[dtype],
                of_peak=None if peak_flops is None else flops / dt / peak_flops,
                peak_gib=peak[(bf16, sdpa)] / 2**30,
            )
        )
    del model, opt
    return rows, flops // batch


def max_batch(name: str, device: torch.device) -> int | None:
    """Largest per-GPU batch of the bf16 SDPA train step that fits in CUDA memory (None on CPU)."""

    def step_at(batch: int) -> None:
        model, inputs, target, _ = make_case(name, device, batch)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step_fn(model, opt, inputs, target, True, device)()
        sync(device)

    return largest_batch(step_at, int(name.split()[-1])) if device.type == "cuda" else None


def parameter_counts() -> list[tuple[str, int]]:
    with torch.device("meta"):
        nets = [
            ("ImageDiffiT cifar10 (128/256/256, 2-2-2, w4, t512, hd32)", ImageDiffiT(**CIFAR10)),
            ("ImageDiffiT ffhq64 (128/256/256/256, 1-2-2-2, w8, t512)", ImageDiffiT(**FFHQ64)),
            ("LatentDiffiT XL/2 input 32 (ImageNet-256)", LatentDiffiT(input_size=32)),
            ("LatentDiffiT XL/2 input 64 (ImageNet-512)", LatentDiffiT(input_size=64)),
        ]
        return [(n, count_parameters(m)) for n, m in nets]


def print_table(title, header, rows):
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in ("case", "network") else "right")
        for r in rows:
            table.add_row(*[str(c) for c in r])
        Console(width=160).print(table)
    except ImportError:
        print(f"\n{title}")
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for r in [header, *rows]:
            print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def measure_case(case: str, args) -> dict:
    """One case in this process: GEMM probes before and after (best kept), then the round-robin train steps."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both the probe and the step
        torch.backends.cudnn.allow_tf32 = False
    probe = 1.0 if args.quick else 2.0
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cpu" and not native_cpu_bf16():  # emulated bf16: ~10× slower, its probe alone takes minutes
        del dtypes["bf16"]
    rates = {k: gemm_rate(device, dt, probe) for k, dt in dtypes.items()}
    rows, flops = run_case(case, device, args.steps or (2 if args.quick else 5), rates)
    biggest = max_batch(case, device)
    after = {k: gemm_rate(device, dt, probe) for k, dt in dtypes.items()}
    if any(after[k] > rates[k] for k in rates):  # a probe disturbed by other load: rescale to the better one
        for r in rows:
            r["of_gemm"] *= rates[r["dtype"]] / max(rates[r["dtype"]], after[r["dtype"]])
        rates = {k: max(rates[k], after[k]) for k in rates}
    return dict(
        case=case,
        rows=rows,
        flops=flops,
        rates=rates,
        threads=torch.get_num_threads(),
        max_batch=biggest,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    )


def report(results: list[dict], args) -> None:
    device = args.device
    steps = args.steps or (2 if args.quick else 5)
    print(
        f"device {device} ({results[0]['device_name']}), {results[0]['threads']} threads, torch {torch.__version__}; "
        "GEMM rate per case "
        "(2048² CPU / 8192² CUDA matmul, best of a probe before and after the case):"
    )
    for res in results:
        rates = res["rates"]
        print(f"  {res['case']}: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in rates.items()))
    if "bf16" not in results[0]["rates"]:
        print(
            "  bf16 not measured: this CPU has no native bf16 (AVX512-BF16 or AMX), where training runs fp32; "
            f"{CPU_BF16_VARIABLE}=1 measures emulated bf16 anyway"
        )
    rows = [r for res in results for r in res["rows"]]
    header = [
        "case",
        "dtype",
        "attn",
        "img/s",
        "ms/step",
        "TFLOP/s",
        "MFU (GEMM)",
        "MFU (peak)",
        "peak GiB" + (" (RSS)" if device == "cpu" else ""),
    ]
    print_table(
        f"DiffiT train step (fused AdamW), best of {steps}; analytic FLOPs (matmul+conv+attention, 3 × fwd); "
        "MFU vs the measured GEMM rate of the same dtype and vs the datasheet peak",
        header,
        [
            [
                r["case"],
                r["dtype"],
                r["attn"],
                f"{r['img_s']:.1f}",
                f"{r['step_ms']:.0f}",
                f"{r['tflops']:.3f}",
                f"{r['of_gemm']:.1%}",
                "n/a" if r["of_peak"] is None else f"{r['of_peak']:.1%}",
                f"{r['peak_gib']:.2f}",
            ]
            for r in rows
        ],
    )
    print(
        "FLOPs per training image (analytic, 3 × forward): "
        + ", ".join(f"{res['case']}: {res['flops'] / 1e9:.2f} GFLOP" for res in results)
    )
    print(
        "largest per-GPU batch that fits (bf16, SDPA train step): "
        + ", ".join(f"{res['case']}: {res['max_batch'] or 'n/a'}" for res in results)
    )
    print(
        "Ratios (targets: latent fp32 step >= 80% of fp32 GEMM; bf16 step >= 2.5x fp32 step; "
        "SDPA >= plain on CPU; image fp32 step >= 40% of fp32 GEMM):"
    )
    for res in results:
        get = {(r["dtype"], r["attn"]): r for r in res["rows"]}
        fp32, bf16, rates = get[("fp32", "sdpa")], get.get(("bf16", "sdpa")), res["rates"]
        print(
            f"  {res['case']}: fp32 step {fp32['of_gemm']:.0%} of fp32 GEMM; "
            + (
                f"bf16/fp32 step speed {bf16['img_s'] / fp32['img_s']:.2f}x (bf16/fp32 GEMM "
                f"{rates['bf16'] / rates['fp32']:.2f}x); "
                if bf16
                else ""
            )
            + f"SDPA/plain fp32 {fp32['img_s'] / get[('fp32', 'plain')]['img_s']:.2f}x"
            + (f", bf16 {bf16['img_s'] / get[('bf16', 'plain')]['img_s']:.2f}x" if bf16 else "")
        )
    print_table(
        "Parameter counts (all parameters(), frozen pos_embed included)",
        ["network", "parameters"],
        [[n, f"{c:,}"] for n, c in parameter_counts()],
    )
    if device == "cpu":
        print(f"note: CPU figures come from a machine shared with other jobs ({os.cpu_count()} cores); they are noisy.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and a shorter GEMM probe")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds per case (default 5, quick 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(measure_case(args.case, args)))
        return
    cases = ["latent B/2 batch 8", "image cifar10 batch 16"]
    if args.device.startswith("cuda"):
        cases += ["latent XL/2 batch 32", "image cifar10 batch 128", "image ffhq64 batch 64"]
    passthrough = [a for a in sys.argv[1:]]
    results = []
    for case in cases:  # one process per case: clean peak memory, no allocator state carried over
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--case", case], capture_output=True, text=True, check=False
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"case {case!r} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
    report(results, args)


if __name__ == "__main__":
    main()
