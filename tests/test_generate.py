"""`diffit sample`: image i depends only on seed i, PNG/NPZ sinks, resume, release files, clear errors."""

import io
import json

import numpy as np
import pytest
import torch
from helpers import invoke, perturbed_net, read_pngs, tiny_unet

from diffit_cli.build import build_diffusion
from diffit_cli.errors import DiffitError
from diffit_cli.sampling.recipe import compact_seeds
from diffit_cli.sampling.run import parse_classes, parse_seeds, run_sample
from diffit_cli.sampling.sinks import png_path


def test_parse_seeds_and_classes():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert compact_seeds([0, 1, 2, 3, 7, 10, 11]) == "0-3,7,10-11"
    for bad in ("a-b", "5-2", "1,,2"):
        with pytest.raises(DiffitError):
            parse_seeds(bad)
    assert parse_classes("random", 10) is None and parse_classes("1,2", 10) == [1, 2]
    with pytest.raises(DiffitError, match="out of range"):
        parse_classes("12", 10)


@pytest.mark.e2e
def test_image_depends_only_on_its_seed(unet_ckpt, tmp_path):
    seeds = list(range(5))
    for batch in (1, 3, 8):
        run_sample(str(unet_ckpt), seeds, tmp_path / f"b{batch}", batch=batch, overrides=["sample.s_churn=5"])
    a, b, c = (read_pngs(tmp_path / f"b{n}", seeds).astype(int) for n in (1, 3, 8))
    # All randomness is per seed, so the images agree; the network's small GEMMs (the time token's Linear on
    # (B, time_dim)) pick kernels by batch size and differ in the last float bit, which may move a pixel
    # that sits on a rounding boundary by one level (seen: 1 value of 3,840).
    for other in (b, c):
        assert np.abs(a - other).max() <= 1 and np.mean(a != other) < 1e-3
    assert a.shape == (5, 16, 16, 3)
    assert not np.array_equal(a[0], a[1])  # different seeds, different images
    recipe = json.loads((tmp_path / "b8" / "sample.json").read_text())
    assert recipe["seeds"] == "0-4" and recipe["sampler"] == "heun" and recipe["nfe"] == 7
    assert recipe["stochastic"]["s_churn"] == 5 and len(recipe["checkpoint_sha256"]) == 16


@pytest.mark.e2e
def test_npz_matches_pngs_and_resumes(unet_ckpt, tmp_path):
    seeds = list(range(6))
    run_sample(str(unet_ckpt), seeds, tmp_path / "png", batch=4)
    out = tmp_path / "s.npz"
    # a killed run: only the parts of the first batch exist
    run_sample(str(unet_ckpt), seeds[:4], tmp_path / "partial.npz", batch=4)
    parts = tmp_path / "partial.npz.parts"
    assert not parts.exists()  # complete runs are assembled and clean up
    from diffit_cli.sampling.sinks import NpzSink

    sink = NpzSink(out)
    first = read_pngs(tmp_path / "png", seeds[:4])
    sink.write(seeds[:4], None, first)
    run_sample(str(unet_ckpt), seeds, out, batch=4, grid=tmp_path / "grid.png")
    with np.load(out) as z:
        assert z.files == ["arr_0"]
        assert np.array_equal(z["arr_0"], read_pngs(tmp_path / "png", seeds))
    assert (tmp_path / "s.sample.json").is_file() and (tmp_path / "grid.png").is_file()
    assert not (tmp_path / "s.npz.parts").exists()


@pytest.mark.e2e
def test_png_folder_resume_skips_done_seeds(unet_ckpt, tmp_path):
    out = tmp_path / "png"
    run_sample(str(unet_ckpt), list(range(4)), out, batch=4)
    png_path(out, 2).unlink()
    before = {s: png_path(out, s).stat().st_mtime_ns for s in (0, 1, 3)}
    run_sample(str(unet_ckpt), list(range(4)), out, batch=4)
    assert png_path(out, 2).is_file()
    assert {s: png_path(out, s).stat().st_mtime_ns for s in (0, 1, 3)} == before


def test_cli_errors_exit_2(unet_ckpt, tmp_path):
    run = lambda *a: invoke("sample", *a)  # noqa: E731
    r = run("--ckpt", str(tmp_path / "missing.pt"))
    assert r.exit_code == 2 and "does not exist" in r.output
    r = run("--ckpt", "nvidia/DiffiT:diffit_256.safetensors", "--preset", "imagenet256")
    assert r.exit_code == 2 and "nvidia/DiffiT" in r.output and "Traceback" not in r.output
    r = run("--ckpt", str(unet_ckpt), "--sampler", "ddpm", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "ddpm" in r.output
    r = run("--ckpt", str(unet_ckpt), "--cfg-scale", "2", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "class-conditional" in r.output
    r = run("--ckpt", str(unet_ckpt), "--seeds", "3-1")
    assert r.exit_code == 2 and "seed" in r.output
    r = run("--ckpt", str(unet_ckpt), "--set", "model.depth=3")
    assert r.exit_code == 2 and "sample.*" in r.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    r = run("--ckpt", str(bad))
    assert r.exit_code == 2 and "corrupt" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag, value, valid",
    [
        ("--sampler", "heun2", ["heun", "euler", "dpmpp-2m", "ddpm", "ddim"]),
        ("--cfg-schedule", "cosine", ["constant", "power-cosine", "interval"]),
        ("--cfg-channels", "some", ["all"]),
        ("--precision", "fp64", ["fp32", "bf16"]),
    ],
)
def test_bad_enumerated_flags_name_the_valid_values_before_reading_anything(tmp_path, flag, value, valid):
    r = invoke("sample", "--ckpt", str(tmp_path / "not-read.pt"), flag, value, "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "does not exist" not in r.output  # refused before the checkpoint was looked at
    assert all(v in r.output for v in valid) and not (tmp_path / "o").exists()


def test_cfg_channels_beyond_the_models_channels_is_refused(unet_ckpt, tmp_path, monkeypatch):
    import diffit_cli.sampling.run as sampling

    built = []
    monkeypatch.setattr(sampling, "snapshot_network", lambda *a, **k: built.append(a))
    r = invoke("sample", "--ckpt", str(unet_ckpt), "--cfg-channels", "7", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "guidance.channels 7" in r.output and "1..3 or all" in r.output, r.output
    assert built == [] and not (tmp_path / "o").exists()  # no network was built


@pytest.mark.e2e
def test_cli_sample_writes_pngs(unet_ckpt, tmp_path):
    r = invoke(
        "sample",
        "--ckpt",
        str(unet_ckpt),
        "--seeds",
        "0-3",
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "3",
        "--grid",
        str(tmp_path / "g.png"),
    )
    assert r.exit_code == 0, r.output
    assert all(png_path(tmp_path / "o", s).is_file() for s in range(4)) and (tmp_path / "g.png").is_file()
    assert json.loads((tmp_path / "o" / "sample.json").read_text())["steps"] == 3


@pytest.mark.e2e
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="two processes on one GPU: NCCL needs a GPU per process",
)
def test_two_processes_give_the_same_npz(unet_ckpt, tmp_path):
    """Seeds are split across 2 gloo processes (torchrun); the assembled .npz equals the 1-process one."""
    import os
    import subprocess
    import sys

    run_sample(str(unet_ckpt), list(range(5)), tmp_path / "one.npz", batch=2)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29583",
        "-m",
        "diffit_cli",
        "sample",
        "--ckpt",
        str(unet_ckpt),
        "--seeds",
        "0-4",
        "--batch",
        "2",
        "--out",
        str(tmp_path / "two.npz"),
    ]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    recipe = json.loads((tmp_path / "two.sample.json").read_text())
    assert recipe["processes"] == 2
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


@pytest.mark.e2e
@pytest.mark.parametrize("out_name", ["s.npz", "pngs"])
def test_another_recipe_is_refused_unless_forced(unet_ckpt, tmp_path, out_name):
    """Output made with other sampling settings is never silently replaced; --force replaces it."""
    import hashlib

    out = tmp_path / out_name

    def run(*a):
        return invoke("sample", "--ckpt", str(unet_ckpt), "--seeds", "0-3", "--out", str(out), *a)

    assert run("--steps", "3").exit_code == 0

    def digest():
        return sorted(
            (str(p.relative_to(tmp_path)), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in tmp_path.rglob("*")
            if p.is_file()
        )

    before = digest()
    r = run("--steps", "4", "--sampler", "euler")
    assert r.exit_code == 2 and "changed: sampler, steps" in r.output and "--force" in r.output, r.output
    assert "Traceback" not in r.output and digest() == before  # nothing touched
    assert run("--steps", "3").exit_code == 0  # the same recipe resumes
    r = run("--steps", "4", "--sampler", "euler", "--force")
    assert r.exit_code == 0, r.output
    recipe = json.loads((out.with_name("s.sample.json") if out.suffix == ".npz" else out / "sample.json").read_text())
    assert (recipe["sampler"], recipe["steps"], recipe["complete"]) == ("euler", 4, True)


@pytest.mark.e2e
def test_a_killed_run_is_checked_against_its_recipe(unet_ckpt, tmp_path, monkeypatch):
    import diffit_cli.sampling.run as sampling

    class Killed(Exception):
        pass

    def kill(e):
        if isinstance(e, sampling.Step):
            raise Killed

    with pytest.raises(Killed):
        run_sample(str(unet_ckpt), list(range(8)), tmp_path / "s.npz", batch=4, progress=kill)
    recipe_file = tmp_path / "s.sample.json"
    recipe = json.loads(recipe_file.read_text(), parse_constant=pytest.fail)  # strict JSON: no Infinity/NaN
    assert recipe["complete"] is False and recipe["stochastic"]["s_max"] == "inf"
    # a recipe written before it was strict (s_max as Infinity) is the same recipe: the run still resumes below
    recipe_file.write_text(json.dumps({**recipe, "stochastic": {**recipe["stochastic"], "s_max": float("inf")}}))
    with pytest.raises(DiffitError, match="changed: steps"):
        run_sample(str(unet_ckpt), list(range(8)), tmp_path / "s.npz", batch=4, overrides=["sample.steps=2"])
    run_sample(str(unet_ckpt), list(range(8)), tmp_path / "s.npz", batch=4)  # same recipe: resumes
    assert json.loads((tmp_path / "s.sample.json").read_text())["complete"] is True


@pytest.mark.e2e
def test_resume_redoes_a_truncated_png_and_a_torn_npz_part(unet_ckpt, tmp_path):
    """A machine crash can leave a PNG or an npz part cut short: the rerun removes it (with a warning)
    and samples its seeds again."""
    from diffit_cli.events import Message
    from diffit_cli.sampling.sinks import NpzSink

    seeds = list(range(8))
    run_sample(str(unet_ckpt), seeds, tmp_path / "png", batch=4)
    want = read_pngs(tmp_path / "png", seeds)
    torn = png_path(tmp_path / "png", 5)
    torn.write_bytes(torn.read_bytes()[:60])
    events = []
    run_sample(str(unet_ckpt), seeds, tmp_path / "png", batch=4, progress=events.append)
    assert np.array_equal(read_pngs(tmp_path / "png", seeds), want)
    assert any(isinstance(e, Message) and e.level == "warning" and str(torn) in e.text for e in events)

    out = tmp_path / "s.npz"
    sink = NpzSink(out)
    sink.write(seeds[:4], None, want[:4])
    sink.write(seeds[4:], None, want[4:])
    part = sorted(sink.parts.iterdir())[1]
    part.write_bytes(part.read_bytes()[:100])  # the second part torn: its four seeds are redone
    run_sample(str(unet_ckpt), seeds, out, batch=4)
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], want)


@pytest.mark.e2e
def test_a_full_disk_while_writing_an_npz_part_keeps_the_previous_part_and_exits_2(unet_ckpt, tmp_path, monkeypatch):
    """ENOSPC inside the second npz part's write: one line naming the part and the space needed, the
    first part and the recipe intact, no temporary file; the rerun finishes."""
    import errno

    import diffit_cli.fileio as F

    fsync, calls = F.os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:  # the recipe, part 1, then part 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    out, argv = tmp_path / "s.npz", ["sample", "--ckpt", str(unet_ckpt), "--seeds", "0-7", "--batch", "4"]
    with monkeypatch.context() as m:
        m.setattr(F.os, "fsync", full_disk)
        r = invoke(*argv, "--out", str(out))
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "part-000000004-000000007.npz" in "".join(r.output.split()) and "needed" in flat and "free" in flat
    parts = tmp_path / "s.npz.parts"
    assert [p.name for p in parts.iterdir()] == ["part-000000000-000000003.npz"]  # no temporary file
    first = (parts / "part-000000000-000000003.npz").read_bytes()
    assert invoke(*argv, "--out", str(out)).exit_code == 0
    with np.load(out) as z:
        assert z["arr_0"].shape[0] == 8
    with np.load(io.BytesIO(first)) as z:
        assert np.array_equal(np.load(out)["arr_0"][:4], z["images"])


def test_the_training_preview_samples_in_fp32_on_the_cpu(tmp_path, monkeypatch):
    """A bf16 preset's preview grid on the CPU samples in fp32 (emulated bf16 autocast made each demo grid cost
    minutes), as `diffit sample`, FID along training and ablate do; bf16 on a GPU."""
    from diffit_cli.precision import sampling_precision
    from diffit_cli.sampling import generate as G

    p = tiny_unet("train.mixed_precision=bf16")
    assert sampling_precision(p, "cpu") == "fp32" and sampling_precision(p, torch.device("cuda")) == "bf16"
    assert sampling_precision(tiny_unet("train.mixed_precision=fp32"), "cuda") == "fp32"
    seen = []
    real = G.sample_batch
    monkeypatch.setattr(G, "sample_batch", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    out = G.preview_grid(
        perturbed_net(p),
        build_diffusion(p.diffusion, p.model),
        p,
        lambda x: ((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy(),
        tmp_path / "grid.png",
        seeds=4,
    )
    assert seen == ["fp32"] and out.is_file() and (tmp_path / "grid-latest.png").is_file()


def test_one_precision_rule_for_the_command_run_sample_and_the_vae(unet_ckpt, tmp_path):
    """`precision.check_precision` is the one check: the flag, `run_sample` and the VAE codec each name what they
    were given and the choices, before any network or VAE is built."""
    from diffit_cli.codecs import VAECodec, VAEError

    r = invoke("sample", "--ckpt", unet_ckpt, "--precision", "fp16", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--precision 'fp16': choose fp32 or bf16" in r.output, r.output
    with pytest.raises(DiffitError, match="^precision 'fp16': choose fp32 or bf16$"):
        run_sample(str(unet_ckpt), [0], tmp_path / "o", precision="fp16")
    with pytest.raises(VAEError, match="^VAE precision 'fp16': choose fp32 or bf16$"):
        VAECodec("no/such-vae", precision="fp16")  # refused before the VAE is looked for
    assert not (tmp_path / "o").exists()


def test_balanced_classes_give_each_class_its_share():
    """`--classes balanced`: the seed at position j gets class j mod C, so N seeds hold N // C images of each class
    (the first N mod C classes one more), whatever the seed values."""
    from diffit_cli.sampling.generate import seed_labels

    classes = parse_classes("balanced", 10)
    labels = seed_labels(list(range(1000)), 10, classes)
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    shifted = seed_labels(list(range(5000, 6000)), 10, classes)  # repeat 5 of eval-fid --ckpt --num 1000
    assert torch.equal(shifted, labels)
    odd = seed_labels(list(range(1001)), 10, classes)
    assert torch.bincount(odd, minlength=10).tolist() == [101] + [100] * 9  # the rounding rule
    assert odd[:20].tolist() == list(range(10)) * 2
    assert parse_classes("random", 10) is None  # the default is unchanged: labels drawn per seed
    with pytest.raises(DiffitError, match="^--classes balanced: this model is unconditional"):
        parse_classes("balanced", 0)


def test_balanced_on_an_unconditional_checkpoint_exits_2_with_one_line(unet_ckpt, tmp_path):
    r = invoke("sample", "--ckpt", unet_ckpt, "--classes", "balanced", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "balanced" in r.output and "unconditional" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    """A tiny class-conditional U-Net checkpoint (4 classes), weights perturbed so images depend on the label."""
    from helpers import weights_state

    from diffit_cli.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("cond")
    p = tiny_unet("model.num_classes=4")
    save_checkpoint(root, weights_state(p, perturbed_net(p)), 0, keep=1)
    return root / "checkpoints" / "latest.pt"


@pytest.mark.e2e
def test_balanced_images_do_not_depend_on_batch_or_resume_and_the_recipe_records_it(cond_ckpt, tmp_path):
    seeds = list(range(10))
    ckpt = str(cond_ckpt)
    run_sample(ckpt, seeds, tmp_path / "b4.npz", batch=4, classes="balanced", overrides=["sample.steps=3"])
    run_sample(ckpt, seeds, tmp_path / "b3.npz", batch=3, classes="balanced", overrides=["sample.steps=3"])
    with np.load(tmp_path / "b4.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    # a resumed run: the first five seeds written (a run killed after them), then the whole list again; the rest
    # keep their positions in the whole list, not in what is left to do
    out = tmp_path / "resumed"
    run_sample(ckpt, seeds[:5], out, batch=2, classes="balanced", overrides=["sample.steps=3"])
    run_sample(ckpt, seeds, out, batch=2, classes="balanced", overrides=["sample.steps=3"])
    assert labels.tolist() == [0, 1, 2, 3] * 2 + [0, 1]  # position j → class j mod 4
    with np.load(tmp_path / "b3.npz") as z:
        assert np.array_equal(z["arr_1"], labels)
        assert np.abs(z["arr_0"].astype(int) - images).max() <= 1  # see test_image_depends_only_on_its_seed
    assert np.abs(read_pngs(out, seeds).astype(int) - images).max() <= 1
    random = tmp_path / "random.npz"
    run_sample(ckpt, seeds, random, batch=4, overrides=["sample.steps=3"])
    with np.load(random) as z:
        assert not np.array_equal(z["arr_1"], labels)  # drawn per seed, as before
    for path in (tmp_path / "b4.sample.json", out / "sample.json"):
        assert json.loads(path.read_text())["classes"] == "balanced"
    with pytest.raises(DiffitError, match="changed: classes"):
        run_sample(ckpt, seeds, out, batch=2, classes="random", overrides=["sample.steps=3"])


def test_eval_fid_ckpt_scores_balanced_samples_and_refuses_them_unconditional(
    cond_ckpt, unet_ckpt, tmp_path, monkeypatch
):
    """`eval-fid --ckpt --classes balanced`: each repeat's seeds k·num … (k+1)·num−1 are balanced on their own (the
    labels the scorer receives); an unconditional checkpoint or --classes without --ckpt is one line, exit 2."""
    from diffit_cli.fid import metrics as M
    from diffit_cli.fid.extractors import TEST_EXTRACTOR

    seen = []

    def scorer(samples, reference, **kw):
        with np.load(samples) as z:
            seen.append(z["arr_1"].tolist())
        return {"fid": 1.0, "num_samples": 6, "notes": []}

    monkeypatch.setattr(M, "compute_metrics", scorer)
    args = ["eval-fid", "--ckpt", cond_ckpt, "--num", 6, "--repeats", 2, "--feature-extractor", TEST_EXTRACTOR]
    args += ["--ref", tmp_path / "ref.npz", "--json", tmp_path / "r.json"]
    r = invoke(*args, "--classes", "balanced")
    assert r.exit_code == 0, r.output
    assert seen == [[0, 1, 2, 3, 0, 1]] * 2 and "balanced labels" in " ".join(r.output.split())
    assert json.loads((tmp_path / "r.json").read_text())["classes"] == "balanced"
    seen.clear()
    assert invoke(*args).exit_code == 0  # the preset's eval.classes: random, drawn per seed
    assert len(seen) == 2 and seen[0] != [0, 1, 2, 3, 0, 1] and seen[0] != seen[1]
    for bad, words in (
        (["eval-fid", "--ckpt", unet_ckpt, "--classes", "balanced", "--ref", tmp_path / "ref.npz"], "unconditional"),
        (["eval-fid", "--ckpt", cond_ckpt, "--classes", "fair"], "choose random or balanced"),
        (["eval-fid", tmp_path, "--ref", tmp_path, "--classes", "balanced"], "go with --ckpt"),
    ):
        r = invoke(*bad)
        assert r.exit_code == 2 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_fid_along_training_samples_the_labels_eval_classes_names(monkeypatch, tmp_path):
    """`eval.classes: balanced` reaches the FID point's sampling; an unconditional preset refuses it."""
    from types import SimpleNamespace

    from diffit_cli.config import PresetError
    from diffit_cli.training import evaluate

    with pytest.raises(PresetError, match="eval.classes balanced needs a class-conditional model"):
        tiny_unet("eval.classes=balanced")
    seen = []
    monkeypatch.setattr(evaluate, "sample_fid", lambda *a, **k: seen.append(k["classes"]))  # None: not main
    for value in ("balanced", "random"):
        p = tiny_unet("model.num_classes=4", f"eval.classes={value}")
        acc = SimpleNamespace(is_main_process=False, device=torch.device("cpu"), wait_for_everyone=lambda: None)
        run = SimpleNamespace(preset=p, accelerator=acc, state=None, codec=None, run_dir=tmp_path)
        run.ema = SimpleNamespace(net=None)
        run.diffusion = run.inception_weights = run.emit = None
        assert evaluate.fid_point(run) is False
    assert seen == [[0, 1, 2, 3], None]


@pytest.mark.e2e
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="two processes on one GPU: NCCL needs a GPU per process",
)
def test_two_processes_give_the_same_balanced_npz(cond_ckpt, tmp_path):
    """`--classes balanced` split across 2 gloo processes (torchrun): the same labels and images as one process."""
    import os
    import subprocess
    import sys

    run_sample(str(cond_ckpt), list(range(7)), tmp_path / "one.npz", batch=3, classes="balanced")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29587", "-m"]
    cmd += ["diffit_cli", "sample", "--ckpt", str(cond_ckpt), "--seeds", "0-6", "--batch", "2", "--classes"]
    cmd += ["balanced", "--out", str(tmp_path / "two.npz")]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    recipe = json.loads((tmp_path / "two.sample.json").read_text())
    assert recipe["processes"] == 2 and recipe["classes"] == "balanced"
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["arr_1"].tolist() == b["arr_1"].tolist() == [0, 1, 2, 3, 0, 1, 2]
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() <= 1  # see test_image_depends_only_on_its_seed
