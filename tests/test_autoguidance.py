"""Autoguidance (Karras et al. 2024) through the pipeline and the CLI: `diffit sample --guidance auto --guide-ckpt`,
the guide's hash in sample.json, `eval-fid --ckpt`, FID along training, `DiffiTPipeline`, and the guides refused
(another resolution, class count, channel count or diffusion, not a checkpoint)."""

import json

import numpy as np
import pytest
import torch
from helpers import invoke, read_pngs, set_flags, tiny_unet

from diffit_cli.build import build_network
from diffit_cli.config import dump_preset
from diffit_cli.fid import metrics as M
from diffit_cli.fid.extractors import register_test_extractor
from diffit_cli.sampling.weights import GuideError, weights_sha256

STANDIN = register_test_extractor()
AUTO = ["--guidance", "auto", "--cfg-scale", "2.5"]


def _save(path, preset, seed):
    """A checkpoint of `preset`'s network with seeded weights (head included, so the outputs depend on them)."""
    torch.manual_seed(seed)
    net = build_network(preset.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "preset": dump_preset(preset)}, path)
    return path


@pytest.fixture(scope="module")
def guides(tmp_path_factory):
    """A weaker guide of the tiny preset (other weights), guides of another shape, and a file that is no checkpoint."""
    root = tmp_path_factory.mktemp("guides")
    made = {
        "weak": _save(root / "weak.pt", tiny_unet(), 1),
        "resolution": _save(root / "res8.pt", tiny_unet("model.img_resolution=8", "data.resolution=8"), 1),
        "classes": _save(root / "classes.pt", tiny_unet("model.num_classes=10", "data.use_labels=true"), 1),
        "channels": _save(root / "grey.pt", tiny_unet("model.in_channels=1", "data.channels=1"), 1),
        "diffusion": _save(root / "sigma.pt", tiny_unet("diffusion.sigma_data=0.6"), 1),
    }
    made["text"] = root / "notes.pt"
    made["text"].write_text("not a checkpoint")
    return made


def _sample(ckpt, out, *flags, seeds="0-3"):
    r = invoke("sample", "--ckpt", ckpt, "--seeds", seeds, "--out", out, *flags)
    assert r.exit_code == 0, r.output
    return read_pngs(out, range(4))


@pytest.mark.e2e
def test_sample_with_the_guide_equal_to_the_main_network_is_the_unguided_network(unet_ckpt, guides, tmp_path):
    unguided = _sample(unet_ckpt, tmp_path / "plain")
    same = _sample(unet_ckpt, tmp_path / "same", *AUTO, "--guide-ckpt", unet_ckpt)
    assert np.array_equal(unguided, same)  # D_g + w·(D − D_g) with D_g = D: bit for bit
    recipe = json.loads((tmp_path / "same" / "sample.json").read_text())
    assert recipe["guidance"]["mode"] == "auto" and recipe["guidance"]["scale"] == 2.5
    assert recipe["guide"] == str(unet_ckpt) and recipe["guide_sha256"] == weights_sha256(unet_ckpt)
    assert json.loads((tmp_path / "plain" / "sample.json").read_text())["guide_sha256"] is None
    # scale 1 is the main network whatever the guide; another guide at w ≠ 1 changes the images
    one = _sample(unet_ckpt, tmp_path / "one", "--guidance", "auto", "--cfg-scale", "1", "--guide-ckpt", guides["weak"])
    assert np.array_equal(unguided, one)
    assert json.loads((tmp_path / "one" / "sample.json").read_text())["guide_sha256"] is None  # it made no image
    _sample(unet_ckpt, tmp_path / "one", "--guidance", "auto", "--cfg-scale", "1", "--guide-ckpt", unet_ckpt)
    weak = _sample(unet_ckpt, tmp_path / "weak", *AUTO, "--guide-ckpt", guides["weak"])
    assert not np.array_equal(unguided, weak)
    recipe = json.loads((tmp_path / "weak" / "sample.json").read_text())
    assert recipe["guide_sha256"] == weights_sha256(guides["weak"]) != weights_sha256(unet_ckpt)
    # resuming with another guide is refused like any other changed setting; the output stays as it was
    before = {p.name: p.read_bytes() for p in (tmp_path / "weak").rglob("*") if p.is_file()}
    r = invoke(
        "sample", "--ckpt", unet_ckpt, "--seeds", "0-3", "--out", tmp_path / "weak", *AUTO, "--guide-ckpt", unet_ckpt
    )
    assert r.exit_code == 2 and "guide_sha256" in r.output, r.output
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "weak").rglob("*") if p.is_file()}
    # CFG's --cfg-channels does not change autoguided images: the same output resumes
    _sample(unet_ckpt, tmp_path / "weak", *AUTO, "--guide-ckpt", guides["weak"], "--cfg-channels", "1")


@pytest.mark.e2e
def test_pipeline_autoguidance_makes_the_images_of_diffit_sample(unet_ckpt, guides, tmp_path):
    from diffit_cli.pipeline import DiffiTPipeline

    cli = _sample(unet_ckpt, tmp_path / "cli", *AUTO, "--guide-ckpt", guides["weak"])
    pipe = DiffiTPipeline.from_pretrained(unet_ckpt, guide=guides["weak"])
    images = pipe(seeds=[0, 1, 2, 3], guidance_scale=2.5, output_type="np").images
    assert np.array_equal(np.round(images * 255).astype(np.uint8), cli)
    unguided = DiffiTPipeline.from_pretrained(unet_ckpt)
    plain = unguided(seeds=[0, 1, 2, 3], output_type="np").images
    assert np.array_equal(pipe(seeds=[0, 1, 2, 3], guidance_scale=1.0, output_type="np").images, plain)
    with pytest.raises(GuideError, match="a guide goes with autoguidance"):  # it would go unused under CFG
        DiffiTPipeline(unguided.network, unguided.preset, guide=pipe.guide)


@pytest.mark.e2e
def test_eval_fid_ckpt_with_autoguidance(unet_ckpt, guides, tmp_path):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    M.save_reference(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), ref, feature_extractor=STANDIN)
    base = ["eval-fid", "--ckpt", unet_ckpt, "--num", 4, "--ref", ref, "--feature-extractor", STANDIN, "--json"]
    results = {}
    for name, flags in (
        ("plain", []),
        ("same", [*AUTO, "--guide-ckpt", unet_ckpt]),
        ("weak", [*AUTO, "--guide-ckpt", guides["weak"]]),
    ):
        r = invoke(*base, tmp_path / f"{name}.json", *flags)
        assert r.exit_code == 0, r.output
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["same"]["values"] == results["plain"]["values"]  # the guide equal to the main network
    assert results["weak"]["values"] != results["plain"]["values"]
    assert results["weak"]["guidance"] == {"mode": "auto", "scale": 2.5, "schedule": "constant"}
    assert results["weak"]["guide_sha256"] == weights_sha256(guides["weak"]) and results["plain"]["guide"] is None
    assert "autoguidance w=2.5" in r.output


@pytest.mark.e2e
def test_fid_along_training_samples_with_the_presets_autoguidance(guides, tmp_path, monkeypatch):
    from diffit_cli.training import evaluate

    loads = []
    load_guide = evaluate.load_guide
    monkeypatch.setattr(evaluate, "load_guide", lambda *a, **k: loads.append(a[0]) or load_guide(*a, **k))
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    M.save_reference(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), ref, feature_extractor=STANDIN)
    flags = set_flags(
        [
            "train.total_kimg=0.016",
            "eval.every_kimg=0.008",
            "eval.num_samples=4",
            f"eval.feature_extractor={STANDIN}",
            f"eval.reference={ref}",
            "sample.guidance.mode=auto",
            f"sample.guidance.guide={guides['weak']}",
            "sample.guidance.scale=2.0",
        ]
    )
    from helpers import TINY_UNET

    run = tmp_path / "run"
    r = invoke("train", "--run-dir", run, *set_flags(TINY_UNET), *flags)
    assert r.exit_code == 0, r.output
    fids = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"fid"' in line]
    assert [f["kimg"] for f in fids] == [0.008, 0.016] and all(np.isfinite(f["fid"]) for f in fids)
    assert loads == [str(guides["weak"])]  # read once per run, used at every FID point
    assert (run / "samples" / "grid-latest.png").is_file()  # the preview grid is autoguided too


BAD_GUIDES = [
    ("resolution", "resolution (model grid) 8 (guide) vs 16 (main)"),
    ("classes", "model.num_classes 10 (guide) vs 0 (main)"),
    ("channels", "model.in_channels 1 (guide) vs 3 (main)"),
    ("diffusion", "diffusion.sigma_data 0.6 (guide) vs 0.5 (main)"),
    ("text", "not a diffit checkpoint"),
    ("missing", "does not exist"),
]


@pytest.mark.parametrize("command", ["sample", "eval-fid"])
@pytest.mark.parametrize("guide,words", BAD_GUIDES)
def test_a_guide_that_cannot_guide_is_one_line_and_nothing_is_written(
    unet_ckpt, guides, tmp_path, command, guide, words
):
    path = guides.get(guide, tmp_path / "missing.pt")
    out = tmp_path / "out"
    if command == "sample":
        r = invoke("sample", "--ckpt", unet_ckpt, "--out", out, *AUTO, "--guide-ckpt", path)
    else:
        r = invoke(
            "eval-fid",
            "--ckpt",
            unet_ckpt,
            "--num",
            4,
            "--keep",
            out,
            "--json",
            tmp_path / "r.json",
            "--feature-extractor",
            STANDIN,
            "--ref",
            tmp_path / "none.npz",
            *AUTO,
            "--guide-ckpt",
            path,
        )
    text = r.output.strip()
    assert r.exit_code == 2 and words in text and "guid" in text, text
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_autoguidance_without_a_guide_or_a_guide_without_autoguidance_is_one_line(unet_ckpt, tmp_path):
    r = invoke("sample", "--ckpt", unet_ckpt, "--out", tmp_path / "out", *AUTO)
    text = r.output.strip()
    assert r.exit_code == 2 and "--guide-ckpt" in text and len(text.splitlines()) == 1, text
    assert not (tmp_path / "out").exists()
    r = invoke("sample", "--ckpt", unet_ckpt, "--out", tmp_path / "out", "--guidance", "weak")
    assert r.exit_code == 2 and "--guidance" in r.output and "auto" in r.output, r.output
    # a guide with classifier-free guidance would go unused: said, not ignored
    r = invoke("sample", "--ckpt", unet_ckpt, "--out", tmp_path / "out", "--guide-ckpt", unet_ckpt)
    text = r.output.strip()
    assert r.exit_code == 2 and "--guidance auto" in text and len(text.splitlines()) == 1, text
    assert not (tmp_path / "out").exists()


def test_a_guide_set_under_cfg_is_refused_however_it_is_given(unet_ckpt, tmp_path):
    r = invoke("sample", "--ckpt", unet_ckpt, "--out", tmp_path / "out", "--set", f"sample.guidance.guide={unet_ckpt}")
    text = r.output.strip()
    assert r.exit_code == 2 and "--guidance auto" in text and len(text.splitlines()) == 1, text
    assert not (tmp_path / "out").exists()


def test_a_local_guide_path_is_kept_absolute_and_a_hub_id_as_given(tmp_path, monkeypatch):
    """The preset travels in checkpoints: `weak.pt` given in one folder must name the same file from any other."""
    from helpers import tiny_unet

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weak.pt").write_bytes(b"")
    auto = ("sample.guidance.mode=auto", "sample.guidance.scale=2")
    assert tiny_unet(*auto, "sample.guidance.guide=weak.pt").sample.guidance.guide == str(tmp_path / "weak.pt")
    assert tiny_unet(*auto, "sample.guidance.guide=owner/weak").sample.guidance.guide == "owner/weak"


def test_train_dry_run_checks_the_guide(guides, tmp_path):
    from helpers import TINY_UNET

    flags = ["sample.guidance.mode=auto", f"sample.guidance.guide={guides['resolution']}", "sample.guidance.scale=2"]
    r = invoke("train", "--dry-run", "--run-dir", tmp_path / "run", *set_flags(TINY_UNET + flags))
    assert r.exit_code == 2 and "resolution (model grid) 8 (guide) vs 16 (main)" in r.output, r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_latent_ddpm_model_autoguided_by_itself_is_its_unguided_self(tiny_vae, tmp_path):
    """The latent DDPM model (ε and learned-variance channels, ancestral sampler, class labels): with itself as the
    guide, autoguidance gives the latents of the unguided model bit for bit; a weaker guide changes them."""
    from helpers import tiny_vit

    from diffit_cli.pipeline import DiffiTPipeline

    p = tiny_vit("model.input_size=4", "data.resolution=32", f"data.vae={tiny_vae / 'folder'}")
    main, weak = _save(tmp_path / "main.pt", p, 0), _save(tmp_path / "weak.pt", p, 1)
    call = {"seeds": [0, 1, 2], "class_labels": [0, 3, 1], "output_type": "latent"}
    plain = DiffiTPipeline.from_pretrained(main)(guidance_scale=1.0, **call).images
    same = DiffiTPipeline.from_pretrained(main, guide=main)(guidance_scale=3.0, **call).images
    assert torch.equal(plain, same)
    weaker = DiffiTPipeline.from_pretrained(main, guide=weak)(guidance_scale=3.0, **call).images
    assert not torch.equal(plain, weaker) and torch.isfinite(weaker).all()


@pytest.mark.e2e
def test_output_whose_recipe_names_no_guidance_mode_resumes_as_cfg(unet_ckpt, tmp_path):
    """sample.json files written before `guidance.mode` existed hold CFG's recipe: the same command resumes them."""
    out = tmp_path / "out"
    invoke("sample", "--ckpt", unet_ckpt, "--seeds", "0-1", "--out", out)
    recipe = json.loads((out / "sample.json").read_text())
    del recipe["guidance"]["mode"], recipe["guide_sha256"]
    (out / "sample.json").write_text(json.dumps(recipe))
    r = invoke("sample", "--ckpt", unet_ckpt, "--seeds", "0-3", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "sample.json").read_text())["count"] == 4
