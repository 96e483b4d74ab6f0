"""CUDA paths, run by `make test-cuda` (skipped without a GPU or without DIFFIT_TEST_CUDA=1; CI has none): fused
attention (SDPA and flex_attention) with a bias gradient, bf16/fp16 training, a training step without host syncs,
regional compilation with inductor, checkpoints that load on a CPU, seed-only sampling and pinned-memory loading on
the GPU."""

import math

import pytest
import torch
from helpers import fake_latent_shards, tiny_unet, tiny_vit

from diffit_cli.build import build_diffusion, build_network, compile_blocks
from diffit_cli.checkpoint import latest_checkpoint, load_checkpoint
from diffit_cli.config import SampleConfig
from diffit_cli.core.attention import TMSA
from diffit_cli.events import Step
from diffit_cli.sampling.generate import sample_batch
from diffit_cli.training import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and DIFFIT_TEST_CUDA=1")
CUDA = torch.device("cuda")


def _tmsa_out_and_grads(attn: TMSA, x, x_t, hw, kernel: str, dtype):
    attn.kernel = kernel
    attn.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = attn(x, x_t, hw)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)).sum().backward()
    return out.float(), x.grad.float(), attn.relative_position_bias_table.grad.float().clone()


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window,grid", [(4, 8), (8, 8)], ids=["windowed", "global"])
def test_fused_attention_matches_the_reference_with_bias_gradient(dtype, window, grid, kernel):
    torch.manual_seed(0)
    attn = TMSA(64, 4, 32, window).to(CUDA)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
    x, x_t = torch.randn(3, grid * grid, 64, device=CUDA), torch.randn(3, 32, device=CUDA)
    ref = _tmsa_out_and_grads(attn, x, x_t, (grid, grid), "reference", torch.float32)
    got = _tmsa_out_and_grads(attn, x, x_t, (grid, grid), kernel, dtype)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for a, b, name in zip(got, ref, ("output", "input grad", "bias-table grad")):
        err = ((a - b).norm() / b.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e} ({dtype})"


@pytest.mark.parametrize("kind", ["unet", "vit"])
def test_inductor_compiled_blocks_equal_eager(kind):
    p = (tiny_unet if kind == "unet" else tiny_vit)()
    torch.manual_seed(0)
    eager = build_network(p.model, CUDA).eval()  # eval: no dropout, no label dropout; gradients still flow
    for prm in eager.parameters():
        prm.data.normal_(0, 0.05)
    compiled = build_network(p.model, CUDA).eval()
    compiled.load_state_dict(eager.state_dict())
    notes = []
    compile_blocks(compiled, notes.append)  # inductor
    res, ch = p.model.spatial_size, p.model.in_channels
    x, t = torch.randn(4, ch, res, res, device=CUDA), torch.rand(4, device=CUDA) * 10
    y = torch.arange(4, device=CUDA) % 4 if p.model.num_classes else None
    outs = []
    for net in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, t, y).float()
        out.square().mean().backward()
        outs.append((out, torch.cat([q.grad.flatten() for q in net.parameters() if q.grad is not None])))
    assert notes == []  # inductor compiled: no fallback
    for a, b in zip(*outs):
        assert ((a - b).norm() / b.norm()).item() < 3e-2


def test_the_training_step_never_waits_for_the_gpu(tmp_path):
    """Steady-state optimizer steps (bf16, clipping, EMA, non-finite check) under CUDA's sync debug mode 'error'."""
    from diffit_cli.training.run import start_stream
    from diffit_cli.training.setup import setup_run
    from diffit_cli.training.step import train_step

    p = tiny_unet("train.mixed_precision=bf16", "train.grad_clip=1.0", "train.compile=false")
    run = setup_run(p, tmp_path, None, False, None, None)
    start_stream(run)
    run.model.train()
    for _ in range(2):  # warm-up: optimizer state, cuBLAS workspaces
        train_step(run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(run)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert run.skips.tolist() == [0.0, 0.0]


def test_latent_vit_bf16_is_close_to_fp32():
    p = tiny_vit("model.hidden_size=64", "model.num_heads=4")
    torch.manual_seed(0)
    net = build_network(p.model, CUDA)
    for prm in net.parameters():  # leave the zero-initialised output path: random weights everywhere
        prm.data.normal_(0, 0.05)
    x, t, y = (
        torch.randn(4, 4, 8, 8, device=CUDA),
        torch.tensor([1.0, 100, 500, 999], device=CUDA),
        torch.arange(4, device=CUDA),
    )
    with torch.no_grad():
        ref = net(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = net(x, t, y).float()
    assert ((got - ref).norm() / ref.norm()).item() < 3e-2


def _reports(preset, run_dir):
    reports = []
    state = train(preset, run_dir, progress=lambda e: reports.append(e.figures) if isinstance(e, Step) else None)
    return state, reports


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_image_training_on_cuda_and_checkpoint_loads_on_cpu(tmp_path, precision):
    p = tiny_unet(
        f"train.mixed_precision={precision}",
        "train.total_kimg=0.08",
        "train.snapshot_kimg=0.08",
        "train.augment_p=0.3",
        "data.num_workers=2",
    )
    state, reports = _reports(p, tmp_path)
    assert state.step == 10 and all(math.isfinite(r["loss"]) for r in reports)
    assert reports[-1]["mem_gb"] > 0
    assert state.skipped < state.step  # fp16: the grad scaler may skip the first steps, never all of them
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    net = build_network(p.model)
    net.load_state_dict(ckpt["ema"])  # a GPU run's weights load on a CPU-only machine
    assert (tmp_path / "samples" / "grid-latest.png").is_file()


def test_latent_training_on_cuda(tmp_path):
    shards = fake_latent_shards(tmp_path / "lat", n=16)
    p = tiny_vit("train.mixed_precision=bf16", f"data.path={shards}")
    state, reports = _reports(p, tmp_path / "run")
    assert state.step == 2 and all(math.isfinite(r["loss"]) for r in reports)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_image_depends_only_on_its_seed_on_cuda(precision):
    p = tiny_unet("model.num_classes=4")
    torch.manual_seed(0)
    net = build_network(p.model, CUDA).eval()
    for prm in net.parameters():
        prm.data.normal_(0, 0.05)
    diffusion = build_diffusion(p.diffusion, p.model)
    sample = SampleConfig(steps=4)
    seeds, labels = [5, 6, 7, 8], torch.tensor([0, 1, 2, 3])
    whole = sample_batch(net, diffusion, (3, 16, 16), seeds, labels, sample, CUDA, 4, precision)
    parts = torch.cat(
        [
            sample_batch(net, diffusion, (3, 16, 16), seeds[:1], labels[:1], sample, CUDA, 4, precision),
            sample_batch(net, diffusion, (3, 16, 16), seeds[1:], labels[1:], sample, CUDA, 4, precision),
        ]
    )
    # kernels may differ with the batch size: equal up to float rounding, far from another seed's image
    tol = 1e-4 if precision == "fp32" else 3e-2
    assert (whole - parts).abs().max().item() < tol
    assert (whole[0] - whole[1]).abs().max().item() > 0.5


def test_loader_pins_memory_on_cuda():
    from diffit_cli.data import SyntheticShapes, make_loader

    loader = make_loader(SyntheticShapes(16, size=64), 8, num_workers=2)
    images, labels = next(iter(loader))
    assert images.is_pinned() and images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(8))
