"""Latent DiffiT end to end (issue #7): encode-latents → train on shards → sample decoded by the VAE."""

import numpy as np
import pytest
from helpers import TINY_VIT, invoke, save_tiny_vae, tiny_vit
from PIL import Image

from diffit_cli.checkpoint import latest_checkpoint
from diffit_cli.encode_latents import encode_latents
from diffit_cli.sampling.run import run_sample
from diffit_cli.training import train

pytestmark = pytest.mark.e2e  # every test here encodes, trains or samples end to end

# 32² images → 4×4×4 latents; a 2-block ViT with patch 2 sees 2×2 tokens
LATENT_32 = ["model.input_size=4", "data.resolution=32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    vae = save_tiny_vae(root) / "folder"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c", "d"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / c / f"{i}.png")
    encode_latents(
        root / "imgs", root / "shards", resolution=32, vae=str(vae), batch=4, shard_size=4, num_workers=0, device="cpu"
    )
    preset = tiny_vit(*LATENT_32, f"data.path={root / 'shards'}", f"data.vae={vae}")
    state = train(preset, root / "run")
    return root, vae, preset, state


def test_trains_on_shards_and_samples_through_the_vae(setup, tmp_path):
    root, vae, preset, state = setup
    assert state.step == 2 and all(np.isfinite(r["loss"]) for r in state.history)
    ckpt = latest_checkpoint(root / "run")
    out = tmp_path / "s.npz"
    run_sample(
        str(ckpt),
        [0, 1, 2],
        out,
        batch=2,
        overrides=["sample.guidance.scale=3.0", "sample.guidance.schedule=power-cosine"],
    )
    with np.load(out) as z:
        assert z["arr_0"].shape == (3, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].shape == (3,) and set(z["arr_1"]) <= {0, 1, 2, 3}
    # image i depends only on seed i, also through CFG and the VAE
    run_sample(
        str(ckpt),
        [2],
        tmp_path / "one.npz",
        batch=1,
        overrides=["sample.guidance.scale=3.0", "sample.guidance.schedule=power-cosine"],
    )
    with np.load(out) as a, np.load(tmp_path / "one.npz") as b:
        assert np.array_equal(a["arr_0"][2], b["arr_0"][0]) and a["arr_1"][2] == b["arr_1"][0]


def test_vae_override_and_release_style_file(setup, tmp_path):
    from safetensors.torch import save_file

    from diffit_cli.checkpoint import load_snapshot

    root, vae, preset, _ = setup
    net, _ = load_snapshot(latest_checkpoint(root / "run"))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "release.safetensors")
    r = invoke(
        "sample", "--ckpt", str(tmp_path / "release.safetensors"), "--seeds", "0-1", "--out", str(tmp_path / "x")
    )
    assert r.exit_code == 2 and "--preset" in r.output
    run_sample(
        str(tmp_path / "release.safetensors"),
        [0, 1],
        tmp_path / "png",
        preset=preset,
        vae=str(root / "vae.safetensors"),
    )
    assert sorted(p.name for p in (tmp_path / "png").rglob("*.png")) == ["000000.png", "000001.png"]


def test_shards_that_do_not_match_the_preset_are_refused(setup, tmp_path):
    root, vae, _, _ = setup
    args = sum([["--set", s] for s in TINY_VIT + [f"data.vae={vae}"]], [])  # preset at 64², shards at 32²
    r = invoke(
        "train", "--preset", "imagenet256", "--data", str(root / "shards"), "--run-dir", str(tmp_path / "r"), *args
    )
    assert r.exit_code == 2 and "resolution" in r.output and "Traceback" not in r.output


def test_offline_hub_vae_fails_fast(setup, tmp_path):
    root, _, _, _ = setup
    r = invoke(
        "sample",
        "--ckpt",
        str(latest_checkpoint(root / "run")),
        "--seeds",
        "0",
        "--out",
        str(tmp_path / "o"),
        "--vae",
        "stabilityai/sd-vae-ft-ema",
    )
    assert r.exit_code == 2 and "sd-vae-ft-ema" in r.output and "Traceback" not in r.output
