"""Sharing a trained model (docs/sharing.md): `diffit export` writes a folder with no pickle in it, the folder (or a
Hub repository holding it) loads back into `diffit sample` / `eval-fid --ckpt` and draws the source checkpoint's
images seed for seed, its model card's front matter parses and its command redraws the grid, the Hub boundary
uploads exactly the folder's files, and bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import invoke, perturbed_net, read_pngs, tiny_unet, tiny_vit, weights_state
from PIL import Image
from safetensors import safe_open

from diffit_cli.build import count_parameters
from diffit_cli.checkpoint import save_checkpoint
from diffit_cli.config import preset_from_yaml, preset_to_dict
from diffit_cli.sampling.run import run_sample
from diffit_cli.sharing.card import dataset_id
from diffit_cli.sharing.folder import FOLDER_FILES

SEEDS = [0, 1, 2, 3]
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _export(ckpt, out, *extra):
    r = invoke("export", ckpt, out, *extra)
    assert r.exit_code == 0, r.output
    return out


def _samples(ckpt, out) -> np.ndarray:
    run_sample(str(ckpt), SEEDS, out)
    return read_pngs(out, SEEDS)


def _one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in r.output, r.output


def _front_matter(card: str) -> tuple[dict, str]:
    _, head, body = card.split("---\n", 2)
    return yaml.safe_load(head), body


def _read_without_torch(folder: Path) -> dict:
    """Every file of an export read by format-specific readers (no torch.load, no unpickling anywhere)."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(FOLDER_FILES)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    for p in folder.iterdir():
        head = p.read_bytes()[:4]
        assert not head.startswith((b"\x80", b"PK\x03\x04")), f"{p.name} looks like a pickle / torch.save archive"
    with Image.open(folder / "samples.png") as im:
        im.load()
    return {
        "tensors": tensors,
        "meta": meta,
        "preset": yaml.safe_load((folder / "preset.yaml").read_text()),
        "config": json.loads((folder / "config.json").read_text()),
        "card": (folder / "README.md").read_text(),
    }


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory, tiny_vae):
    """A tiny latent DiffiT checkpoint (class-conditional, CFG) that decodes through the tiny test VAE."""
    root = tmp_path_factory.mktemp("vit")
    p = tiny_vit(f"data.vae={tiny_vae / 'folder'}")
    save_checkpoint(root, weights_state(p, perturbed_net(p)), 0, keep=1)
    return root / "checkpoints" / "latest.pt"


@pytest.fixture(scope="module")
def exported(unet_ckpt, tmp_path_factory):
    """The image-space checkpoint exported (fp32, EMA)."""
    return _export(unet_ckpt, tmp_path_factory.mktemp("exp") / "tiny-unet")


# ------------------------------------------------------------------------------------------------ export → load
@pytest.mark.e2e
def test_image_model_folder_samples_the_checkpoint_bit_for_bit(unet_ckpt, exported, tmp_path):
    files = _read_without_torch(exported)
    assert all(t.dtype == torch.float32 for t in files["tensors"].values() if t.is_floating_point())
    assert files["config"]["format"] == "diffit-model" and files["config"]["weights"] == "ema"
    assert files["config"]["model"]["kind"] == "unet" and files["config"]["vae"] is None
    assert files["preset"]["name"] == "demo" and "preset" in files["meta"]
    assert np.array_equal(_samples(exported, tmp_path / "a"), _samples(unet_ckpt, tmp_path / "b"))
    # the folder's weights are the checkpoint's EMA weights, tensor for tensor
    ema = torch.load(unet_ckpt, weights_only=True)["ema"]
    assert ema.keys() == files["tensors"].keys() and all(torch.equal(ema[k], files["tensors"][k]) for k in ema)


@pytest.mark.e2e
def test_latent_model_folder_samples_the_checkpoint_bit_for_bit(vit_ckpt, tiny_vae, tmp_path):
    out = _export(vit_ckpt, tmp_path / "tiny-vit")
    files = _read_without_torch(out)
    assert files["config"]["vae"] == str(tiny_vae / "folder") and files["config"]["space"] == "latent"
    assert np.array_equal(_samples(out, tmp_path / "a"), _samples(vit_ckpt, tmp_path / "b"))


@pytest.mark.e2e
@pytest.mark.parametrize("dtype, tolerance", [("bf16", 8), ("fp16", 1)])
def test_half_precision_exports_stay_within_the_stated_tolerance(unet_ckpt, exported, tmp_path, dtype, tolerance):
    """docs/sharing.md states the largest pixel difference (of 255) measured here against the fp32 export."""
    out = _export(unet_ckpt, tmp_path / dtype, "--dtype", dtype)
    files = _read_without_torch(out)
    assert {t.dtype for t in files["tensors"].values() if t.is_floating_point()} == {TORCH_DTYPES[dtype]}
    diff = np.abs(_samples(out, tmp_path / "half").astype(int) - _samples(exported, tmp_path / "full").astype(int))
    assert diff.max() <= tolerance, diff.max()


@pytest.mark.e2e
def test_eval_fid_ckpt_scores_the_folder_as_the_checkpoint(unet_ckpt, exported, tmp_path):
    run_sample(str(unet_ckpt), list(range(100, 108)), tmp_path / "ref")
    results = []
    for ckpt in (unet_ckpt, exported):
        js = tmp_path / f"{len(results)}.json"
        args = ["--num", 8, "--ref", tmp_path / "ref", "--feature-extractor", "diffit-randconv-v1", "--json", js]
        r = invoke("eval-fid", "--ckpt", ckpt, *args)
        assert r.exit_code == 0, r.output
        results.append(json.loads(js.read_text())["values"])
    assert results[0] == results[1]


# ------------------------------------------------------------------------------------------------------ the card
@pytest.mark.e2e
def test_card_front_matter_and_its_command_redraws_the_grid(unet_ckpt, tmp_path, monkeypatch):
    run = tmp_path / "run"
    state = torch.load(unet_ckpt, weights_only=True)
    save_checkpoint(run, {**state, "nimg": 16000, "step": 125}, 16000, keep=1)
    fid = {"event": "fid", "extractor": "diffit-randconv-v1", "num_samples": 64, "reference": "train", "best": True}
    lines = [{**fid, "kimg": 8.0, "fid": 90.0}, {**fid, "kimg": 16.0, "fid": 70.0}]
    lines += [{**fid, "kimg": 8.0, "fid": 80.0}, {**fid, "kimg": 16.0, "fid": 60.0}, {**fid, "kimg": 24.0, "fid": 50.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))  # a resume replayed 8..16
    out = _export(run / "checkpoints" / "latest.pt", tmp_path / "shared" / "my-model")
    meta, body = _front_matter((out / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "diffit"
    assert {"diffit", "unconditional-image-generation", "pixel-space"} <= set(meta["tags"])
    assert "datasets" not in meta  # built-in shapes: no Hub dataset
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"][0]["type"] == "fid" and result["metrics"][0]["value"] == 60.0  # the 16-kimg point
    assert "diffit-randconv-v1" in result["metrics"][0]["name"] and "64 samples" in result["metrics"][0]["name"]
    assert "| 16 | 60.000 | diffit-randconv-v1 | 64 | train |" in body and "90.000" not in body and "50.000" not in body
    assert "16 kimg (125 optimizer steps) at batch 8" in body and "synthetic-shapes-v1-simple" in body
    assert f"{count_parameters(perturbed_net(tiny_unet())):,} parameters" in body
    assert "- `model.channels`: [32, 64, 64] → [16, 16]" in body  # the recipe's differences from the shipped `demo`
    (command,) = [line for line in body.splitlines() if line.startswith("diffit sample")]
    monkeypatch.chdir(out.parent)
    r = invoke(*shlex.split(command)[1:])
    assert r.exit_code == 0, r.output
    assert (out.parent / "samples.png").read_bytes() == (out / "samples.png").read_bytes()


def test_dataset_ids_for_the_card():
    assert dataset_id(tiny_unet("data.path=hf:someone/faces:train")) == "someone/faces"
    assert dataset_id(tiny_unet("data.path=torchvision:CIFAR10")) == "uoft-cs/cifar10"
    assert dataset_id(tiny_unet()) is None


# ------------------------------------------------------------------------------------------------------ the Hub
@pytest.fixture
def online(monkeypatch):
    """The Hub switched on, a token at hand, and no network: each Hub call the code makes is replaced."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DIFFIT_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    calls: dict = {"repo_files": [], "uploaded": None, "created": None}
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: calls["repo_files"])

    def create_repo(self, repo_id, **kw):
        calls["created"] = (repo_id, kw.get("private"))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kw):
        names = sorted(p.name for p in Path(folder_path).rglob("*") if p.is_file())
        calls["uploaded"] = [
            n for n in names if not allow_patterns or any(fnmatch.fnmatch(n, a) for a in allow_patterns)
        ]

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


@pytest.mark.e2e
def test_push_uploads_exactly_the_folder(unet_ckpt, tmp_path, online):
    r = invoke("export", unet_ckpt, tmp_path / "m", "--push-to-hub", "someone/tiny-diffit", "--private")
    assert r.exit_code == 0, r.output
    assert online["created"] == ("someone/tiny-diffit", True)
    assert online["uploaded"] == sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(FOLDER_FILES)
    assert "https://huggingface.co/someone/tiny-diffit" in r.output
    _, body = _front_matter((tmp_path / "m" / "README.md").read_text())
    assert "diffit sample --ckpt someone/tiny-diffit " in body  # the card names the repository


def test_push_to_a_repository_with_other_content_is_refused_before_any_work(unet_ckpt, tmp_path, online):
    online["repo_files"] = [".gitattributes", "pytorch_model.bin"]
    r = invoke("export", unet_ckpt, tmp_path / "m", "--push-to-hub", "someone/taken")
    _one_line_error(r, "someone/taken", "pytorch_model.bin")
    assert not (tmp_path / "m").exists() and online["uploaded"] is None


def test_push_offline_or_without_a_token_is_one_line(unet_ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    r = invoke("export", unet_ckpt, tmp_path / "m", "--push-to-hub", "someone/model")  # HF_HUB_OFFLINE=1 (conftest)
    _one_line_error(r, "someone/model", "HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    r = invoke("export", unet_ckpt, tmp_path / "m", "--push-to-hub", "someone/model")
    _one_line_error(r, "no Hugging Face token", "huggingface-cli login")
    assert not (tmp_path / "m").exists()


@pytest.mark.e2e
def test_ckpt_owner_name_downloads_the_repository(unet_ckpt, exported, tmp_path, monkeypatch, online):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or exported)
    r = invoke("sample", "--ckpt", "someone/tiny-diffit", "--seeds", "0-3", "--out", tmp_path / "hub")
    assert r.exit_code == 0, r.output
    assert asked == ["someone/tiny-diffit"]
    assert np.array_equal(read_pngs(tmp_path / "hub", SEEDS), _samples(unet_ckpt, tmp_path / "ckpt"))


def test_ckpt_owner_name_offline_says_what_is_missing(tmp_path):
    r = invoke("sample", "--ckpt", "someone/tiny-diffit", "--seeds", "0", "--out", tmp_path / "o")
    _one_line_error(r, "someone/tiny-diffit", "huggingface-cli download", "--ckpt DIR")
    # a missing local file is not taken for a repository, and REPO:FILE keeps its meaning
    r = invoke("sample", "--ckpt", "runs/model.pt", "--seeds", "0", "--out", tmp_path / "o")
    _one_line_error(r, "does not exist")
    r = invoke("sample", "--ckpt", "someone/tiny-diffit:w.safetensors", "--seeds", "0", "--out", tmp_path / "o")
    _one_line_error(r, "w.safetensors", "someone/tiny-diffit")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_export_requests_are_one_line_and_write_nothing(unet_ckpt, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    _one_line_error(invoke("export", unet_ckpt, busy), "not empty", "--force")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    release = tmp_path / "release.safetensors"  # weights only, as NVIDIA's files are
    from safetensors.torch import save_file

    save_file(torch.load(unet_ckpt, weights_only=True)["ema"], release)
    _one_line_error(invoke("export", release, tmp_path / "r"), "--preset")
    _one_line_error(invoke("export", unet_ckpt, tmp_path / "d", "--dtype", "fp8"), "--dtype", "fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "release.safetensors"]


@pytest.mark.e2e  # the export samples its grid
def test_a_folder_is_not_a_training_checkpoint(exported, tmp_path):
    _one_line_error(invoke("sample", "--ckpt", exported, "--raw", "--out", tmp_path / "o"), "--raw")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(invoke("sample", "--ckpt", empty, "--out", tmp_path / "o"), "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.e2e
def test_release_weights_export_with_preset(unet_ckpt, tmp_path):
    """A weight file without a preset exports with --preset; the folder then carries that preset."""
    from safetensors.torch import save_file

    state = torch.load(unet_ckpt, weights_only=True)
    save_file(state["ema"], tmp_path / "w.safetensors")
    preset_file = tmp_path / "tiny.yaml"
    preset_file.write_text(state["preset"])
    out = _export(tmp_path / "w.safetensors", tmp_path / "rel", "--preset", preset_file)
    assert yaml.safe_load((out / "preset.yaml").read_text()) == preset_to_dict(preset_from_yaml(state["preset"]))
    assert "records no training state" in (out / "README.md").read_text()


@pytest.mark.e2e
def test_an_autoguided_preset_is_exported_without_its_guide(unet_ckpt, tmp_path):
    """The guide is another network at a path of this machine: the folder samples unguided and the export says so."""
    p = tiny_unet("sample.guidance.mode=auto", f"sample.guidance.guide={unet_ckpt}", "sample.guidance.scale=2.0")
    root = tmp_path / "run"
    save_checkpoint(root, weights_state(p, perturbed_net(p)), 0, keep=1)
    r = invoke("export", root / "checkpoints" / "latest.pt", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "exported without guidance" in " ".join(r.output.split()), r.output
    guidance = yaml.safe_load((tmp_path / "out" / "preset.yaml").read_text())["sample"]["guidance"]
    assert (guidance["mode"], guidance["scale"], guidance["guide"]) == ("cfg", 1.0, None)
