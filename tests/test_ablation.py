"""`diffit ablate`: study files, budgets, dry runs, baseline networks, end-to-end runs at the test budget,
resume without retraining, attention maps that depend on t, and the CLI's error path."""

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke
from PIL import Image

from diffit_cli import ablation as A
from diffit_cli.build import build_diffusion, build_network, count_config_parameters
from diffit_cli.config import load_preset
from diffit_cli.events import Start
from diffit_cli.fid.extractors import INCEPTION, TEST_EXTRACTOR

PAPER_STUDIES = [
    "time-feature-dims",
    "architecture",
    "tmsa-in-ddpmpp",
    "time-in-attention",
    "time-token",
    "time-embedding",
    "window-size",
    "tmsa-vs-adaln",
    "cfg-scale",
    "attention-maps",
]
# every study file on disk is validated: a new one needs no edit here
STUDIES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "presets" / "ablations").glob("*.yaml"))


# ----------------------------------------------------------------------------------------------- studies
def test_every_study_ships():
    """Each of the paper's ablations has a study file the package finds, and the wheel carries every study file:
    pyproject.toml maps presets/ to the package diffit_cli.presets and its package data takes each file in
    presets/ablations (an editable install reads the folder itself, so only the packaging rules can show this)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    root = Path(__file__).resolve().parents[1]
    assert set(PAPER_STUDIES) <= set(A.available_studies())
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["diffit_cli.presets"] == "presets"
    assert "diffit_cli.presets.ablations" in setup["packages"]
    patterns = setup["package-data"]["diffit_cli.presets.ablations"]
    files = sorted(p.name for p in (root / "presets" / "ablations").iterdir() if p.is_file())
    assert files and [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


@pytest.mark.parametrize("name", STUDIES)
def test_study_validates_at_every_budget(name):
    study = A.load_study(name)
    assert study.source.startswith("DiffiT ")
    for budget in ("test", "tiny", "small", "paper"):
        plan = A.plan_study(study, budget)
        assert [v.name for v in plan.variants] == [v.name for v in study.variants]
        assert all(v.parameters > 0 for v in plan.variants)
    if study.metric == "fid" and study.kind != "curve":
        assert any(v.paper is not None for v in study.variants), "the paper column must cite values"


@pytest.mark.parametrize("name", [s for s in STUDIES if A.load_study(s).kind != "sample"])
def test_each_variant_network_really_differs(name):
    """Variants of a training study differ in parameter count, module types or diffusion (never identical)."""
    plan = A.plan_study(name, "tiny")
    sig = {v.name: (v.parameters, tuple(sorted(v.module_types.items())), v.diffusion) for v in plan.variants}
    for a, b in itertools.combinations(sig, 2):
        assert sig[a] != sig[b], f"{name}: {a} and {b} build the same network"


def test_sample_study_changes_only_sampling():
    plan = A.plan_study("cfg-scale", "tiny")
    assert len({v.parameters for v in plan.variants}) == 1
    for v in plan.variants:
        assert all(k.startswith("sample.") for k in v.changes)
    cos46 = next(v for v in plan.variants if v.name == "cos-4.6")
    assert cos46.changes == {"sample.guidance.scale": (4.4, 4.6)} and cos46.paper == 1.73


def test_guidance_study_fills_in_the_guide_of_autoguided_variants(tmp_path):
    """The guidance study samples one network; its autoguided variants (and only they) get the guide the study trains
    in <dir>/guide, or --guide-checkpoint; the guide is the base preset, narrower, trained for a quarter as long."""
    plan = A.plan_study("guidance", "paper", runs_dir=tmp_path)
    trained = str(tmp_path / "guide" / "checkpoints" / "latest.pt")
    assert len({v.parameters for v in plan.variants}) == 1
    for v in plan.variants:
        assert all(k.startswith("sample.") for k in v.changes)
        auto = v.name.startswith("auto-")
        assert ("sample.guidance.guide" in v.changes) == auto and ("sample.guidance.mode" in v.changes) == auto
        if auto:
            assert v.changes["sample.guidance.guide"] == (None, trained)
    assert {v.name: v.paper for v in plan.variants if v.paper} == {"none": 2.56, "cfg-1.4": 2.23, "auto-2.1": 1.34}
    study = A.load_study("guidance")
    guide, base = A.resolve_guide_preset(study, "paper"), A.resolve_preset(study, None, "paper")
    assert guide.train.total_kimg == pytest.approx(base.train.total_kimg / 4)
    assert count_config_parameters(guide.model) < count_config_parameters(base.model)
    assert guide.model.num_classes == base.model.num_classes and guide.data == base.data
    assert base.model.label_dropout > 0  # CFG's null class is trained
    given = A.plan_study("guidance", "test", runs_dir=tmp_path, guide_checkpoint="weak.pt")
    assert {v.changes["sample.guidance.guide"][1] for v in given.variants if v.name.startswith("auto-")} == {"weak.pt"}
    r = invoke("ablate", "guidance", "--budget", "test", "--runs-dir", str(tmp_path), "--dry-run")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "guide: the base preset with model.channels=[16,32,32] trained to 0.012 kimg" in flat
    assert f"sample.guidance.guide:–→{trained}" in "".join(flat.split())  # rich breaks long paths anywhere
    assert not (tmp_path / "guide").exists()


def test_an_autoguided_variant_without_a_guide_is_refused(tmp_path):
    """A variant with sample.guidance.mode=auto in a study without a guide: section needs --guide-checkpoint; the
    guide flag belongs to sample studies only (the command's one-line errors: test_errors.py)."""
    study = tmp_path / "noguide.yaml"
    study.write_text(
        "name: noguide\ntitle: t\nsource: DiffiT test\nkind: sample\nbase: demo\nvariants:\n"
        "  - {name: auto, overrides: [sample.guidance.mode=auto, sample.guidance.scale=2]}\n"
    )
    with pytest.raises(A.StudyError, match="names no guiding network.*--guide-checkpoint"):
        A.plan_study(str(study), "test")
    assert A.plan_study(str(study), "test", guide_checkpoint="weak.pt").variants[0].changes[
        "sample.guidance.guide"
    ] == (None, "weak.pt")
    with pytest.raises(A.StudyError, match="--guide-checkpoint is for studies that only sample"):
        A.run_study("window-size", "test", runs_dir=tmp_path / "ws", guide_checkpoint="weak.pt")
    assert not (tmp_path / "ws").exists()


def test_dry_run_lists_the_resolved_overrides():
    plan = A.plan_study("window-size", "tiny")
    changes = {v.name: v.changes for v in plan.variants}
    assert changes == {
        "w2": {"model.window_size": ([4, 4], [2, 2])},
        "w4": {},
        "w8": {"model.window_size": ([4, 4], [8, 8])},
    }
    tia = {v.name: v for v in A.plan_study("time-in-attention", "paper").variants}
    assert tia["bias"].changes == {"model.time_mode": ("tmsa", "bias")} and tia["bias"].overrides == [
        "model.time_mode=bias"
    ]
    arch = {v.name: v for v in A.plan_study("architecture", "paper").variants}
    assert arch["A"].changes["model.kind"] == ("unet", "encdec") and arch["A"].changes["model.encoder"] == (None, "vit")
    assert arch["A"].network == "EncoderDecoder" and arch["E"].network == "ImageDiffiT" and arch["E"].changes == {}
    dd = {v.name: v for v in A.plan_study("tmsa-in-ddpmpp", "paper").variants}
    assert dd["ve-tmsa"].changes["diffusion.kind"] == ("edm-vp", "edm-ve")
    assert dd["ve-tmsa"].changes["model.attention"] == ("plain", "tmsa")

    r = invoke("ablate", "window-size", "--dry-run", "--set", "train.lr=2e-4")
    assert r.exit_code == 0, r.output
    assert "model.window_size: [4, 4] → [2, 2]" in r.output and "w8" in r.output
    assert "train.lr" not in r.output  # a user --set applies to the base too, so it is no difference


def test_budgets_shrink_widths_but_keep_the_variants_ratios():
    s = A.load_study("time-feature-dims")
    paper = {v.name: A.resolve_preset(s, v, "paper").model for v in s.variants}
    tiny = {v.name: A.resolve_preset(s, v, "tiny").model for v in s.variants}
    assert paper["t512-f512"].channels == (128, 512, 512) and paper["t256-f256"].time_dim == 256
    assert tiny["t512-f512"].channels == (16, 64) and tiny["t512-f256"].channels == (16, 32)
    assert (tiny["t512-f256"].time_dim, tiny["t256-f256"].time_dim) == (64, 32)
    assert A.resolve_preset(s, s.variants[0], "paper").train.total_kimg == 200000


def test_tiny_budget_turns_the_latent_model_into_a_pixel_stand_in():
    s = A.load_study("tmsa-vs-adaln")
    p = A.resolve_preset(s, s.variant("adaln"), "tiny")
    assert (p.data.space, p.data.path, p.data.vae, p.model.in_channels) == ("pixel", None, None, 3)
    assert (p.model.kind, p.model.time_mode, p.model.num_classes, p.data.use_labels) == ("vit", "adaln", 8, True)
    assert (
        p.sample.guidance.scale == 1.0
        and p.train.ema_decay is None
        and A.load_study("tmsa-vs-adaln").points("tiny") == 4
    )
    paper = A.resolve_preset(s, s.variant("adaln"), "paper")
    assert (paper.data.space, paper.model.depth, paper.train.total_kimg) == ("latent", 28, 256000)


def test_study_errors_name_the_fix(tmp_path):
    with pytest.raises(A.StudyError, match="available studies: .*window-size"):
        A.load_study("windowsize")
    with pytest.raises(A.StudyError, match="valid variants: w2, w4, w8"):
        A.plan_study("window-size", "tiny", only=["w16"])
    with pytest.raises(A.StudyError, match="choose one of tiny, small, paper"):
        A.plan_study("window-size", "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ntitle: t\nsource: s\nkind: sample\nbase: imagenet256\n"
        "variants: [{name: a, overrides: [model.depth=2]}, {name: a}]\n"
    )
    with pytest.raises(A.StudyError) as e:
        A.load_study(bad)
    assert "unique" in str(e.value) or "sample.*" in str(e.value)


# ------------------------------------------------------------------------------------- baseline networks
def test_table4_networks_and_diffit_equivalence():
    cifar = load_preset("cifar10")
    e = load_preset("cifar10", ["model.kind=encdec", "model.encoder=diffit", "model.decoder=diffit"])
    assert count_config_parameters(e.model) == count_config_parameters(
        cifar.model
    )  # E built as an encdec is DiffiT itself
    a = load_preset("cifar10", ["model.kind=encdec", "model.encoder=vit", "model.decoder=setr-mla"])
    assert 80e6 < count_config_parameters(a.model) < 120e6  # ViT-Base (86M) + SETR-MLA
    with pytest.raises(Exception, match="setr-mla"):
        load_preset("cifar10", ["model.kind=encdec", "model.encoder=vit", "model.decoder=multires"])
    tiny = [
        "model.channels=[16, 32]",
        "model.blocks=[1, 1]",
        "model.window_size=[4, 4]",
        "model.head_dim=8",
        "model.time_dim=32",
        "model.img_resolution=16",
        "data.resolution=16",
        "model.vit_width=32",
        "model.vit_heads=4",
        "model.vit_depth=4",
        "model.mla_channels=16",
        "model.num_classes=3",
    ]
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([-1.0, 1.0]), torch.tensor([0, 2])
    for enc, dec in [("vit", "setr-mla"), ("multires", "setr-mla"), ("multires", "multires"), ("diffit", "multires")]:
        p = load_preset("cifar10", tiny + ["model.kind=encdec", f"model.encoder={enc}", f"model.decoder={dec}"])
        net = build_network(p.model)
        out = net(x, t, y, torch.zeros(2, 9))
        assert out.shape == x.shape and out.abs().max() == 0  # zero-initialised output conv
        loss = build_diffusion(p.diffusion, p.model).loss(net, x, y, torch.zeros(2, 9))
        loss.mean().backward()
        assert torch.isfinite(loss).all()


def test_ddpmpp_and_vp_ve_preconditioning():
    p = load_preset("cifar10", ["model={kind: ddpmpp, img_resolution: 32}", "diffusion={kind: edm-vp}"])
    assert 55e6 < count_config_parameters(p.model) < 57e6  # EDM's DDPM++ CIFAR-10 network: 55.7M
    t = load_preset(
        "cifar10", ["model={kind: ddpmpp, img_resolution: 32, attention: tmsa}", "diffusion={kind: edm-ve}"]
    )
    assert count_config_parameters(t.model) > count_config_parameters(p.model)
    vp = build_diffusion(p.diffusion, p.model)
    ve = build_diffusion(t.diffusion, t.model)
    tt = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(vp.sigma_inv(vp.sigma(tt)), tt, atol=1e-9)
    assert abs(float(vp.sigma(torch.tensor(1.0))) - 152.0) < 1.0  # VP's σ_max ≈ 152 (EDM)
    s = torch.tensor([0.5, 20.0])
    assert torch.allclose(vp.sigma_from_network_time(vp.c_noise(s)), s, rtol=1e-4)
    assert torch.allclose(ve.sigma_from_network_time(ve.c_noise(s)), s, rtol=1e-5)
    assert (ve.sigma_min, ve.sigma_max, vp.sigma_min, vp.sigma_max) == (0.02, 80.0, 0.002, 80.0)
    draws = ve.training_noise(4096, (1,), torch.Generator().manual_seed(0))
    assert 0.02 <= draws["sigma"].min() and draws["sigma"].max() <= 100.0
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    n = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    for d, target in [(vp, n), (ve, -n)]:  # an ideal network (ε for VP, −ε for VE) denoises exactly
        ideal = lambda x_in, c_noise, y=None, target=target, **k: target  # noqa: E731
        x = x0 + sigma.view(-1, 1, 1, 1) * n
        assert torch.allclose(d.denoise(ideal, x, sigma), x0, atol=1e-4)
        assert d.loss(ideal, x0, sigma=sigma, noise=n).abs().max() < 1e-6
    small = [
        "model={kind: ddpmpp, img_resolution: 16, model_channels: 16, num_blocks: 1, attn_resolutions: [8], "
        "dropout: 0}",
        "data.resolution=16",
    ]
    for diff, attn in [("edm-vp", "plain"), ("edm-ve", "tmsa")]:
        q = load_preset("cifar10", small + [f"diffusion={{kind: {diff}}}", f"model.attention={attn}"])
        net, d = build_network(q.model), build_diffusion(q.diffusion, q.model)
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        loss = d.loss(net, x, None, torch.zeros(2, 9))
        assert loss.shape == (2,) and torch.isfinite(loss).all()


# --------------------------------------------------------------------------------------------- end to end
def _events(log):
    return lambda e: log.append(e)


@pytest.mark.e2e
def test_window_size_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "ws"
    first = A.run_study("window-size", "test", runs_dir=out, only=["w2"])
    assert first.ran == ["w2"] and first.extractor == TEST_EXTRACTOR
    rows = {r["variant"]: r for r in first.rows}
    assert rows["w4"]["status"] == "not run" and math.isfinite(rows["w2"]["value"])

    (out / "w2" / "result.json").rename(out / "w2" / "result.kept")  # "interrupted" after training
    log = []
    second = A.run_study("window-size", "test", runs_dir=out, progress=_events(log))
    assert second.ran == ["w2", "w4", "w8"]
    starts = [e for e in log if isinstance(e, Start) and e.task == "train"]
    assert starts[0].text.startswith("resuming") and starts[1].text.startswith("starting")  # w2: train's own resume
    for name in ("results.md", "results.csv", "results.json", "window-size.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["w2", "w4", "w8"] and data["budget"] == "test"
    for r in data["rows"]:
        assert math.isfinite(r["value"]) and r["extractor"] == TEST_EXTRACTOR
        assert r["paper"] is not None and r["difference"] is None  # not comparable: a tiny run, stand-in features
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["w2", "w4", "w8"] and {r["budget"] for r in table} == {"test"}
    assert {"metric", "paper", "difference", "extractor"} <= set(table[0])
    md = (out / "results.md").read_text()
    assert (
        TEST_EXTRACTOR in md and "NOT comparable" in md and "| w8 |" in md and "![window-size](window-size.png)" in md
    )
    with Image.open(out / "window-size.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300

    import diffit_cli.training

    def no_training(*a, **k):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(diffit_cli.training, "train", no_training)
    third = A.run_study("window-size", "test", runs_dir=out)
    assert third.ran == [] and third.skipped == ["w2", "w4", "w8"]
    with pytest.raises(A.StudyError, match="other settings"):
        A.run_study("window-size", "test", runs_dir=out, overrides=["train.lr=1e-4"])
    with pytest.raises(A.StudyError, match="budget"):
        A.run_study("window-size", "tiny", runs_dir=out)


@pytest.mark.e2e
def test_guidance_study_end_to_end_with_a_trained_guide_and_a_given_one(tmp_path):
    """The guidance study trains the base and, for its autoguided variants, a guide for a quarter as long; the guide
    reaches the sampler (autoguided images differ from unguided ones). With --checkpoint and --guide-checkpoint both
    the base's own network, autoguidance is D + w·(D − D) = D: exactly the unguided images, and nothing is trained."""
    out, few = tmp_path / "g", ["eval.num_samples=8", "sample.num_images=8"]  # the mechanics, quickly
    first = A.run_study("guidance", "test", runs_dir=out, only=["none", "auto-2.1"], overrides=few)
    assert first.ran == ["none", "auto-2.1"] and first.extractor == TEST_EXTRACTOR
    rows = {r["variant"]: r for r in first.rows}
    assert math.isfinite(rows["none"]["value"]) and math.isfinite(rows["auto-2.1"]["value"])
    assert rows["cfg-2.1"]["status"] == "not run"
    auto = json.loads((out / "auto-2.1" / "result.json").read_text())
    guide_file = (out / "guide" / "checkpoints" / "latest.pt").resolve()
    assert auto["guide"] == str(guide_file) and auto["guide_kimg"] == pytest.approx(0.016)  # one batch of 16
    assert auto["kimg"] == pytest.approx(0.048) and "guide" not in json.loads(
        (out / "none" / "result.json").read_text()
    )
    preset = load_preset(out / "guide" / "preset.yaml")
    assert preset.train.total_kimg == pytest.approx(0.012)
    images = {v: np.load(out / v / "samples.npz")["arr_0"] for v in ("none", "auto-2.1")}
    assert images["none"].shape == images["auto-2.1"].shape and not np.array_equal(images["none"], images["auto-2.1"])

    import diffit_cli.training

    base = str((out / "base" / "checkpoints" / "latest.pt").resolve())
    again = tmp_path / "self"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffit_cli.training, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
        second = A.run_study(
            "guidance",
            "test",
            runs_dir=again,
            only=["none", "auto-2.1"],
            overrides=few,
            checkpoint=base,
            guide_checkpoint=base,
        )
    assert second.ran == ["none", "auto-2.1"] and not (again / "guide").exists()
    same = {v: np.load(again / v / "samples.npz")["arr_0"] for v in ("none", "auto-2.1")}
    assert np.array_equal(same["none"], images["none"]) and np.array_equal(same["auto-2.1"], images["none"])


@pytest.mark.e2e
def test_time_in_attention_through_the_cli(tmp_path, monkeypatch):
    out = tmp_path / "tia"
    r = invoke("ablate", "time-in-attention", "--budget", "test", "--runs-dir", str(out))
    assert r.exit_code == 0, r.output
    assert "diffit-randconv-v1" in r.output and "tmsa" in r.output
    for name in ("results.md", "results.csv", "results.json", "time-in-attention.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(x["variant"], x["paper"]) for x in rows] == [("bias", 3.97), ("mlp", 3.81), ("tmsa", 1.95)]
    assert all(math.isfinite(x["value"]) for x in rows)

    import diffit_cli.training

    monkeypatch.setattr(diffit_cli.training, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    again = invoke("ablate", "time-in-attention", "--budget", "test", "--runs-dir", str(out))
    assert again.exit_code == 0, again.output
    flat = " ".join(again.output.split())  # rich wraps long lines
    assert [v for v in ("bias", "mlp", "tmsa") if f"variant {v}: finished before, skipped" not in flat] == []


@pytest.mark.e2e
def test_attention_maps_depend_on_t_with_tmsa_only(tmp_path):
    out = tmp_path / "att"
    res = A.run_study("attention-maps", "test", runs_dir=out)
    for name in ("attention-maps-fixed.png", "attention-maps-trajectory.png", "attention-change.png", "results.md"):
        assert (out / name).is_file(), name
    sigmas = A.load_study("attention-maps").timesteps

    def pngs(variant, kind):
        return [
            np.asarray(Image.open(out / variant / "attention" / f"{kind}-sigma{s:g}.png")).astype(int) for s in sigmas
        ]

    tmsa, mlp = pngs("tmsa", "fixed-change"), pngs("mlp", "fixed-change")
    assert max(np.abs(a - b).max() for a, b in itertools.combinations(tmsa, 2)) > 50  # the map moves with t
    assert max(np.abs(a - b).max() for a, b in itertools.combinations(mlp, 2)) == 0  # attention never sees t
    with np.load(out / "tmsa" / "attention.npz") as z:
        fixed = z["fixed"]
        assert fixed.shape == (len(sigmas), 16, 16) and np.abs(fixed[0] - fixed[-1]).max() > 1e-6
    with np.load(out / "mlp" / "attention.npz") as z:
        assert np.abs(z["fixed"][0] - z["fixed"][-1]).max() < 1e-6
        assert np.abs(z["trajectory"][0] - z["trajectory"][-1]).max() > 1e-4  # the noisy input still moves it
    values = {r["variant"]: r["value"] for r in res.rows}
    assert values["tmsa"] > 1e-6 > values["mlp"]


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_list_and_errors():
    r = invoke("ablate", "--list")
    assert r.exit_code == 0 and all(s in r.output for s in STUDIES)
    r = invoke("ablate")
    assert r.exit_code == 0 and "window-size" in r.output
    for args, text in [
        (["ablate", "window-sizes"], "unknown study 'window-sizes'"),
        (["ablate", "window-size", "--only", "w3", "--dry-run"], "valid variants: w2, w4, w8"),
        (["ablate", "window-size", "--budget", "huge"], "unknown budget"),
        (["ablate", "window-size", "--checkpoint", "x.pt", "--budget", "test"], "--checkpoint"),
    ]:
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert text in r.output and "Traceback" not in r.output
    assert "window-size" in invoke("ablate", "nope").output  # the message lists the valid studies


def test_inception_weights_reach_the_metrics(tmp_path, monkeypatch):
    from diffit_cli.fid import metrics as M

    r = invoke(
        "ablate",
        "window-size",
        "--budget",
        "test",
        "--runs-dir",
        str(tmp_path / "a"),
        "--inception-weights",
        str(tmp_path / "missing.pth"),
    )
    assert r.exit_code == 2 and "missing.pth" in r.output and "is not a file" in r.output
    assert A.choose_extractor("tiny") == TEST_EXTRACTOR  # no weights cached in the tests' TORCH_HOME
    assert A.choose_extractor("tiny", have_weights=True) == INCEPTION
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"weights")
    seen = {}

    class Stop(Exception):
        pass

    def fake_save_reference(dataset, out_file, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(M, "save_reference", fake_save_reference)
    with pytest.raises(Stop):  # the reference is computed before any training
        A.run_study("window-size", "test", runs_dir=tmp_path / "b", inception_weights=weights)
    assert seen["feature_extractor"] == INCEPTION and seen["inception_weights"] == weights


def test_plots_are_drawn_by_matplotlib(tmp_path):
    from PIL import Image

    from diffit_cli.plots import Panel, Series, colormap, save_image_table, save_plot

    path = save_plot(
        tmp_path / "p.png",
        [
            Panel("a", "x", "y", [Series("s1", [1, 2, 4], [3.0, None, 1.0]), Series("s2", [1], [2.0])], log_x=True),
            Panel("b", "v", "y", [Series("", [], [1.0, 2.0])], ["p", "q"]),
        ],
        "title",
    )
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 1.8 * im.height  # two panels side by side
    c = colormap(np.array([[0.0, 1.0]]))
    assert c.dtype == np.uint8 and tuple(c[0, 0]) == (68, 1, 84) and tuple(c[0, 1]) == (253, 231, 37)  # viridis
    grid = [[np.zeros((8, 8, 3), np.uint8), colormap(np.eye(8))], [np.full((8, 8, 1), 200, np.uint8)]]
    with Image.open(save_image_table(tmp_path / "t.png", grid, ["r1", "r2"], ["c1", "c2"], "t", "note")) as im:
        assert im.height > 100 and im.width > 100


def test_the_gap_to_the_paper_is_given_only_where_it_is_comparable():
    """Δ vs paper only at the paper budget with Inception features (as the paper scored); at smaller budgets or with
    another extractor a gap measures the budget, not the method."""
    from diffit_cli.ablation.report import paper_difference

    assert paper_difference(2.5, 1.95, "paper", INCEPTION) == pytest.approx(0.55)
    for budget, extractor in (("small", INCEPTION), ("tiny", INCEPTION), ("paper", TEST_EXTRACTOR)):
        assert paper_difference(2.5, 1.95, budget, extractor) is None
    assert paper_difference(None, 1.95, "paper", INCEPTION) is None
    assert paper_difference(2.5, None, "paper", INCEPTION) is None


def test_a_sample_study_recognises_release_weights_by_their_error_type(tmp_path):
    """A `.safetensors` without a preset (NVIDIA's release) raises `NoPresetError`, a `CheckpointError`; a sample
    study given one takes the architecture from its base preset, and one of our checkpoints brings its own."""
    from helpers import save_self_describing_safetensors, tiny_unet
    from safetensors.torch import save_file

    from diffit_cli.ablation.variants import VariantRunner
    from diffit_cli.checkpoint import CheckpointError, NoPresetError, read_snapshot

    p = tiny_unet()
    net = build_network(p.model)
    release, ours = tmp_path / "release.safetensors", tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, release)
    save_self_describing_safetensors(ours, net, p)
    with pytest.raises(NoPresetError, match="carries no preset") as e:
        read_snapshot(release)
    assert isinstance(e.value, CheckpointError)
    study = A.load_study("cfg-scale")
    for ckpt, weights_preset in ((release, p), (ours, None)):
        runner = VariantRunner(study, "test", None, tmp_path / "s", None, str(ckpt), None)
        assert runner.base_checkpoint(p) == (str(ckpt), weights_preset)
