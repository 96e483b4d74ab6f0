"""Training: the loss decreases, exact resume after a kill, one process = two processes, precision, locks, the
`train` command's errors, and the step's parts (the fused optimizer's device-side skip of a non-finite step, the EMA
as one lerp, the skipped count read at report time)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import TINY_UNET, assert_same_state, fake_latent_shards, final_checkpoint, invoke, tiny_unet, tiny_vit
from PIL import Image

from diffit_cli.build import build_diffusion, build_network, build_optimizer
from diffit_cli.checkpoint import latest_checkpoint
from diffit_cli.config import dump_preset, load_preset
from diffit_cli.events import Step
from diffit_cli.posthoc.store import list_profiles, load_profile_state
from diffit_cli.training import train
from diffit_cli.training.recipe import Ema, step_unless

POSTHOC = ("train.posthoc_ema=[0.05, 0.1]", "train.posthoc_ema_kimg=0.008")


def _fit_fixed_batch(preset, x0, y=None, steps=25):
    """Adam on one fixed batch with fixed diffusion noise: the loss must fall."""
    torch.manual_seed(0)
    net = build_network(preset.model)
    diffusion = build_diffusion(preset.diffusion, preset.model)
    draws = diffusion.training_noise(x0.shape[0], tuple(x0.shape[1:]), torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = diffusion.loss(net, x0, y, **draws).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    return losses


def test_demo_preset_learns_a_fixed_batch():
    from diffit_cli.data import SyntheticShapes, normalize_pixels

    p = load_preset("demo")
    assert p.model.num_classes == 8 and p.data.synthetic == "simple"
    src = SyntheticShapes(p.data.resolution, style=p.data.synthetic)
    x0 = normalize_pixels(torch.stack([src[i][0] for i in range(8)]))
    _fit_fixed_batch(p, x0, y=torch.stack([src[i][1] for i in range(8)]))


def test_ffhq64_shaped_unet_learns_a_fixed_batch():
    p = load_preset(
        "ffhq64", ["model.channels=[16, 32, 32, 32]", "model.head_dim=16", "model.time_dim=32", "model.dropout=0"]
    )
    assert p.model.blocks == (1, 2, 2, 2) and p.model.window_size == (8, 8, 8, 8)
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    _fit_fixed_batch(p, x0, steps=15)


def test_tiny_latent_vit_learns_fake_latents():
    p = tiny_vit()
    x0 = torch.randn(8, 4, 8, 8) * 0.8
    _fit_fixed_batch(p, x0, y=torch.arange(8) % 4)


@pytest.mark.e2e
def test_exact_resume_after_a_kill(tmp_path):
    """Killed between checkpoints and rerun: bit-identical to a straight run, post-hoc EMA profiles and their stored
    snapshots included."""
    p = tiny_unet("train.augment_p=0.5", "model.dropout=0.1", *POSTHOC)  # randomness in every part of the step
    train(p, tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_after_step_3(event):
        if isinstance(event, Step) and event.figures["step"] == 3:
            raise Killed  # after the checkpoint at step 2, before the one at step 4

    with pytest.raises(Killed):
        train(p, tmp_path / "resumed", progress=kill_after_step_3)
    assert final_checkpoint(tmp_path / "resumed")["step"] == 2
    state = train(p, tmp_path / "resumed")
    assert state.step == 4
    assert_same_state(final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed"), exact=True)
    stored = [list_profiles(tmp_path / run) for run in ("straight", "resumed")]
    assert [s.path.name for s in stored[0]] == [s.path.name for s in stored[1]] and len(stored[0]) == 8
    for a, b in zip(*stored):  # (the header's key order is not stable in safetensors: the contents are compared)
        assert (a.sigma_rel, a.gamma, a.step, a.nimg) == (b.sigma_rel, b.gamma, b.step, b.nimg)
        sa, sb = load_profile_state(a.path), load_profile_state(b.path)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), a.path.name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 3, 4]  # step 3 ran twice: once before the kill
    assert (tmp_path / "resumed" / "samples" / "grid-latest.png").is_file()


@pytest.mark.e2e
def test_grey_images_train_preview_and_sample(tmp_path):
    """A 1-channel dataset (MNIST-like grey PNGs) trains, draws its preview grid and samples grey images: the U-Net's
    head predicted 3 channels, which EDM broadcast in the loss and the first preview grid then crashed on."""
    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / "grey" / str(k)).mkdir(parents=True)
        for i in range(4):
            grey = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L")
            grey.save(tmp_path / "grey" / str(k) / f"{i}.png")
    p = tiny_unet(f"data.path={tmp_path / 'grey'}", "data.channels=1", "model.in_channels=1", "model.num_classes=2")
    train(p, tmp_path / "run")
    assert Image.open(tmp_path / "run" / "samples" / "grid-latest.png").mode == "L"
    r = invoke(
        "sample", "--ckpt", str(latest_checkpoint(tmp_path / "run")), "--seeds", "0-1", "--out", str(tmp_path / "s.npz")
    )
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 16, 1)


@pytest.mark.e2e
def test_one_process_trains_twice_with_different_precisions(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFIT_CPU_BF16", "1")  # bf16 autocast even where this CPU only emulates it
    assert train(tiny_unet("train.total_kimg=0.008"), tmp_path / "fp32").step == 1
    assert train(tiny_unet("train.total_kimg=0.008", "train.mixed_precision=bf16"), tmp_path / "bf16").step == 1


def test_a_cpu_without_native_bf16_trains_a_bf16_preset_in_fp32_with_a_note(tmp_path, monkeypatch):
    """bf16 autocast on a CPU without AVX512-BF16/AMX is emulated, ~10× slower than fp32: the run uses fp32 and
    says so; with native bf16 (or DIFFIT_CPU_BF16=1) it autocasts in bf16."""
    from diffit_cli.events import Message
    from diffit_cli.training import loop

    seen = []
    real_setup = loop.setup_run

    def spy(*a, **k):
        run = real_setup(*a, **k)
        seen.append(run.accelerator.mixed_precision)
        return run

    monkeypatch.setattr(loop, "setup_run", spy)
    p = tiny_unet("train.total_kimg=0.008", "train.mixed_precision=bf16")
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.delenv("DIFFIT_CPU_BF16", raising=False)
        events = []
        train(p, tmp_path / str(native), progress=events.append)
        notes = [e.text for e in events if isinstance(e, Message) and "no native bf16" in e.text]
        assert len(notes) == (0 if native else 1)
    assert seen == ["no", "bf16"]


@pytest.mark.e2e
def test_resume_refuses_a_changed_preset(tmp_path):
    train(tiny_unet("train.total_kimg=0.008"), tmp_path)
    with pytest.raises(Exception, match="model.dropout"):
        train(tiny_unet("train.total_kimg=0.016", "model.dropout=0.2"), tmp_path)
    state = train(tiny_unet("train.total_kimg=0.016"), tmp_path)  # a longer run is not a different preset
    assert state.step == 2


# Adam turns float-noise gradients of ~0 (e.g. biases feeding a norm) into lr-sized steps; a larger ε
# keeps those parameters still, so the comparisons below test the batch split, not rounding noise.
ADAM_EPS = "train.eps=1e-4"


@pytest.mark.e2e
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    p = tiny_unet("train.total_kimg=0.016", ADAM_EPS)
    train(p, tmp_path / "full")
    train(p, tmp_path / "accum", batch_gpu=2)  # 4 rounds of 2
    assert_same_state(final_checkpoint(tmp_path / "full"), final_checkpoint(tmp_path / "accum"), exact=False)


@pytest.mark.e2e
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="two processes on one GPU: NCCL needs a GPU per process",
)
def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the one-process result, post-hoc EMA
    profiles included (each process tracks them; the main one stores them)."""
    p = tiny_unet("train.total_kimg=0.016", "train.batch_gpu=4", ADAM_EPS, *POSTHOC)
    preset_file = tmp_path / "p.yaml"
    preset_file.write_text(dump_preset(p))
    train(p, tmp_path / "one")  # one process: 2 accumulation rounds of 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29577",
        "-m",
        "diffit_cli",
        "train",
        "--preset",
        str(preset_file),
        "--run-dir",
        str(tmp_path / "two"),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "× 2 (" in out.stderr, out.stderr[-2000:]  # really two processes
    assert_same_state(final_checkpoint(tmp_path / "one"), final_checkpoint(tmp_path / "two"), exact=False)
    stored = [[(s.path.name, s.step) for s in list_profiles(tmp_path / run)] for run in ("one", "two")]
    assert stored[0] == stored[1] and len(stored[0]) == 4


def test_cli_dry_run_prints_preset_and_parameters():
    r = invoke("train", "--preset", "cifar10", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "channels:" in r.output and "# parameters:" in r.output


@pytest.mark.parametrize(
    "sets, words",
    [
        (["eval.feature_extractor=nope"], ["eval.feature_extractor = 'nope'", "inception-v3-compat"]),
        (["eval.feature_extractor=nope", "eval.every_kimg=1"], ["eval.feature_extractor = 'nope'"]),
        (["data.path=torchvision:NOPE"], ["'NOPE'", "CIFAR10"]),
        (["data.path=nowhere/at/all"], ["nowhere/at/all", "does not exist"]),
        (
            ["eval.every_kimg=1", "eval.feature_extractor=diffit-randconv-v1", "eval.reference=nowhere.npz"],
            ["eval.reference = 'nowhere.npz'", "no such file"],
        ),
    ],
)
def test_the_run_and_its_dry_run_refuse_the_same(tmp_path, sets, words):
    """`training.preflight` is what both call: the run refuses before anything is written, the dry run exits 2."""
    from diffit_cli.errors import DiffitError

    with pytest.raises(DiffitError) as e:
        train(load_preset("demo", sets), tmp_path / "run")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "run").exists()
    r = invoke("train", "--dry-run", *sum([["--set", s] for s in sets], []))
    assert r.exit_code == 2 and r.output.strip() == f"Error: {e.value}", r.output


def test_cli_dry_run_notes_what_only_this_machine_lacks(monkeypatch):
    """A preset without data is a template (a note, exit 0); no GPU for fp16 or missing Inception weights offline
    are notes at dry-run time, while the run refuses them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")  # no cached Inception weights
    r = invoke("train", "--preset", "ffhq64", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "# parameters:" in r.output and "note: preset 'ffhq64' names no training data" in r.output
    sets = ["train.mixed_precision=fp16", "eval.every_kimg=1"]
    r = invoke("train", "--dry-run", *sum([["--set", s] for s in sets], []))
    assert r.exit_code == 0, r.output
    assert "# parameters:" in r.output and "Inception-v3 weights" in r.output
    if not torch.cuda.is_available():
        assert "note: fp16 mixed precision does not run on the CPU" in r.output


def test_cli_bad_data_path(tmp_path):
    r = invoke("train", "--data", str(tmp_path / "nope.zip"), "--run-dir", str(tmp_path / "run"))
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_cli_fp16_on_cpu_is_refused(tmp_path):
    args = sum([["--set", s] for s in TINY_UNET + ["train.mixed_precision=fp16"]], [])
    r = invoke("train", "--run-dir", str(tmp_path / "run"), *args)
    assert r.exit_code == 2 and "fp16" in r.output and "Traceback" not in r.output


def test_cli_preset_errors_exit_2():
    r = invoke("train", "--preset", "cifar100", "--dry-run")
    assert r.exit_code == 2 and "available" in r.output and "Traceback" not in r.output
    r = invoke("train", "--set", "model.chanels=3", "--dry-run")
    assert r.exit_code == 2 and "model.chanels" in r.output and "channels" in r.output
    r = invoke("train", "--set", "train.lr", "--dry-run")
    assert r.exit_code == 2 and "section.key=value" in r.output


def test_cli_latents_with_a_pixel_preset(tmp_path):
    shards = fake_latent_shards(tmp_path / "lat")
    args = sum([["--set", s] for s in TINY_UNET], [])
    r = invoke("train", "--data", str(shards), "--run-dir", str(tmp_path / "run"), *args)
    assert r.exit_code == 2 and "latent" in r.output and "Traceback" not in r.output


@pytest.mark.e2e
def test_tiny_latent_vit_trains_on_shards(tmp_path):
    shards = fake_latent_shards(tmp_path / "lat")
    p = tiny_vit(f"data.path={shards}")
    state = train(p, tmp_path / "run")
    assert state.step == 2 and all(np.isfinite(r["loss"]) for r in state.history)
    assert latest_checkpoint(tmp_path / "run") is not None


@pytest.mark.e2e
def test_activation_checkpointing_gives_the_same_step(tmp_path):
    from diffit_cli.training import enable_activation_checkpointing

    assert (
        enable_activation_checkpointing(build_network(tiny_unet().model)) == 3
    )  # ResBlocks: 1 + 1 encoder (incl. bottleneck), 1 decoder
    train(tiny_unet("train.total_kimg=0.008"), tmp_path / "plain")
    train(tiny_unet("train.total_kimg=0.008", "train.grad_checkpointing=true"), tmp_path / "ckpt")
    assert_same_state(final_checkpoint(tmp_path / "plain"), final_checkpoint(tmp_path / "ckpt"), exact=False)


@pytest.mark.parametrize("flag", [["--log-with", "tensorboard"], ["--tensorboard"]])
def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch, flag):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def no_tensorboard(name, *a, **k):
        return None if name in ("tensorboard", "tensorboardX") else real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", no_tensorboard)
    args = sum([["--set", s] for s in TINY_UNET], [])
    r = invoke("train", "--run-dir", str(tmp_path / "run"), *flag, *args)
    assert r.exit_code == 2 and "pip install 'diffit-cli[tensorboard]'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.e2e
def test_a_torn_latest_checkpoint_resumes_from_the_one_before(tmp_path):
    """`latest.pt` truncated by a machine crash: resume from the newest readable one, with a warning."""
    from diffit_cli.events import Message

    p = tiny_unet("train.keep_checkpoints=5")
    train(p, tmp_path / "straight")
    train(tiny_unet("train.keep_checkpoints=5", "train.total_kimg=0.016"), tmp_path / "torn")  # a checkpoint at 16
    train(p, tmp_path / "torn")  # ... and at 32 (latest)
    latest = latest_checkpoint(tmp_path / "torn")
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    events = []
    state = train(p, tmp_path / "torn", progress=events.append)
    warnings = [e.text for e in events if isinstance(e, Message) and e.level == "warning"]
    assert len(warnings) == 1 and latest.name in warnings[0] and "ckpt-00000000.016.pt" in warnings[0]
    assert state.step == 4
    assert_same_state(final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "torn"), exact=True)


def test_non_finite_steps_in_a_row_stop_the_run_naming_the_checkpoint(tmp_path, monkeypatch):
    from diffit_cli.core.edm import EDM
    from diffit_cli.training import TrainError

    real = EDM.loss
    monkeypatch.setattr(EDM, "loss", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    with pytest.raises(TrainError, match=r"3 optimizer steps in a row had non-finite gradients.*step 3"):
        train(tiny_unet("train.max_skipped_steps=3", "train.total_kimg=0.08"), tmp_path)


def test_a_second_train_on_the_same_run_dir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    """`train.lock` names the owner; a lock left by a dead process on this host is taken over."""
    import json
    import socket

    from diffit_cli.events import Message
    from diffit_cli.training.lock import LOCK_NAME, RunLocked

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # alive: this very process
    with pytest.raises(RunLocked, match=f"PID {os.getpid()} on {socket.gethostname()}"):
        train(tiny_unet("train.total_kimg=0.008"), run_dir)
    assert latest_checkpoint(run_dir) is None and lock.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    events = []
    assert train(tiny_unet("train.total_kimg=0.008"), run_dir, progress=events.append).step == 1
    assert any(isinstance(e, Message) and f"PID {dead.pid}" in e.text for e in events)
    assert not lock.exists()  # released at the end


# ------------------------------------------------------- the step's parts: fused optimizer's skip, EMA, skipped count
def _state(net, opt):
    return [p.detach().clone() for p in net.parameters()], [
        {k: v.clone() for k, v in s.items()} for s in opt.state.values()
    ]


def _grads(net, value=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.full_like(p, value) if value is not None else torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "host-flag"])
def test_a_non_finite_step_is_skipped_exactly(fused):
    p = tiny_unet("train.optimizer=adamw", "train.weight_decay=0.01")
    torch.manual_seed(0)
    net, twin = build_network(p.model), build_network(p.model)
    twin.load_state_dict(net.state_dict())
    opt = build_optimizer(net.parameters(), p.train)
    if not fused:
        opt = torch.optim.AdamW(net.parameters(), lr=p.train.lr, weight_decay=0.01)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=p.train.lr, weight_decay=0.01, fused=fused)
    assert bool(opt.defaults["fused"]) is fused  # the kernel training uses on CPU (and CUDA)
    for model, o in ((net, opt), (twin, twin_opt)):
        _grads(model, seed=1)
        step_unless(o, torch.zeros(()))
    before = _state(net, opt)
    _grads(net, float("nan"))
    step_unless(opt, torch.ones(()))  # skipped: parameters, moments and step count untouched
    after = _state(net, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], after[1]) for k in a)
    for model, o in ((net, opt), (twin, twin_opt)):  # the next step is the one the twin, never skipped, takes
        _grads(model, seed=2)
        step_unless(o, torch.zeros(()))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), before[0]))


def test_ema_update_is_the_ema_formula():
    torch.manual_seed(0)
    net = build_network(tiny_unet().model)
    ema = Ema(net)
    ref = [p.detach().clone() for p in ema.net.parameters()]
    for p in net.parameters():
        p.data.add_(torch.randn_like(p))
    for beta in (0.999, 0.5):
        ema.update(net, beta)
        ref = [beta * e + (1 - beta) * p.detach() for e, p in zip(ref, net.parameters())]
        for got, want in zip(ema.net.parameters(), ref):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.e2e
def test_skipped_steps_are_counted_at_report_time(tmp_path, monkeypatch):
    from diffit_cli.core.edm import EDM

    real, calls = EDM.loss, []

    def loss(self, *a, **k):  # the second optimizer step's loss (one micro-batch per step) is NaN
        calls.append(1)
        out = real(self, *a, **k)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(EDM, "loss", loss)
    state = train(tiny_unet("train.report_kimg=0.016"), tmp_path)  # 4 steps, a report every 2
    assert state.step == 4 and state.skipped == 1 and state.skipped_in_a_row == 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["skipped"] for r in log] == [1, 1]
    assert all(math.isfinite(r["grad_norm"]) for r in log)  # the skipped step's norm is left out of the mean
