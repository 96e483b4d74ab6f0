"""Latent diffusion with a tiny random AutoencoderKL (sd-vae-ft-ema block layout, small widths): the VAE codec and
its loading (folder, single file, Hub id offline), `encode-latents` (shards, manifest, labels, mirrors, skip/resume to
identical bytes, a full disk), and the pipeline end to end: encode → train on the shards → sample decoded by the VAE."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_VIT, encode_cli, folder_bytes, invoke, save_tiny_vae, tiny_vit
from PIL import Image

from diffit_cli.checkpoint import latest_checkpoint
from diffit_cli.codecs import DEFAULT_VAE, PixelCodec, VAECodec, VAEError, load_vae, make_codec, vae_config
from diffit_cli.config import DataConfig
from diffit_cli.data import MANIFEST_NAME, DataError, LatentShardSource, make_loader, open_source, shard_name
from diffit_cli.encode_latents import encode_latents
from diffit_cli.events import Start, Step
from diffit_cli.sampling.run import run_sample
from diffit_cli.training import train

RES = 32


def _encode(images, out, vae, **kw):
    kw = {**dict(resolution=RES, vae=vae, batch=2, shard_size=4, num_workers=0, device="cpu"), **kw}
    return encode_latents(images, out, **kw)


@pytest.mark.e2e
def test_shards_manifest_and_labels(tiny_vae, images, tmp_path):
    m = _encode(images, tmp_path / "lat", tiny_vae / "folder", dtype="fp32")
    assert m["complete"] and m["count"] == 6 and m["class_names"] == ["cat", "dog"] and m["num_classes"] == 2
    assert (m["resolution"], m["latent_channels"], m["latent_size"], m["shard_size"]) == (RES, 4, 4, 4)
    assert m["scaling_factor"] == 0.18215 and m["dtype"] == "float32" and m["crop"] == "adm-center-crop"
    assert m["vae"]["hash"].startswith("sha256:") and m["vae"]["id"] == str(tiny_vae / "folder")
    assert [s["count"] for s in m["shards"]] == [4, 2]
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text()) == m
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["manifest.json", shard_name(0), shard_name(1)]

    src = open_source(
        DataConfig(path=str(tmp_path / "lat"), space="latent", resolution=RES, channels=4, vae="x", use_labels=True)
    )
    assert isinstance(src, LatentShardSource) and len(src) == 6 and src.labels().tolist() == [0, 0, 0, 1, 1, 1]
    stats, label = src[4]
    assert stats.shape == (2, 2, 4, 4, 4) and stats.dtype == torch.float32 and int(label) == 1
    assert (stats[1] > 0).all()  # std

    # index 0 = the image, index 1 = its mirror, each as the VAE encodes it
    codec = VAECodec(tiny_vae / "folder", device="cpu")
    pixels = open_source(images, RES)
    x = torch.stack([pixels[i][0] for i in range(6)])
    mean, std = codec.encode_stats(x)
    fmean, fstd = codec.encode_stats(x.flip(3))
    got = torch.stack([src[i][0] for i in range(6)])
    torch.testing.assert_close(got[:, 0, 0], mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 1, 0], std, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 0, 1], fmean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 1, 1], fstd, atol=1e-4, rtol=1e-4)

    # the training path: stats batch → model-space latents; decode → uint8 NHWC
    batch, _ = next(iter(make_loader(src, 3, num_workers=0)))
    z = make_codec(
        DataConfig(space="latent", resolution=RES, channels=4, vae=str(tiny_vae / "folder")), device="cpu"
    ).encode(batch, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, 4, 4) and z.dtype == torch.float32
    out = codec.decode(z)
    assert out.shape == (3, RES, RES, 3) and out.dtype == np.uint8
    assert np.array_equal(out, codec.decode_tensor(z).numpy())
    assert codec.encode(x[:2]).shape == (2, 4, 4, 4)  # images encoded on the fly


@pytest.mark.e2e
def test_rerun_skips_finished_shards(tiny_vae, images, tmp_path):
    _encode(images, tmp_path / "lat", tiny_vae / "folder")
    before = folder_bytes(tmp_path / "lat")
    events = []
    _encode(images, tmp_path / "lat", tiny_vae / "folder", progress=events.append)
    steps = [e for e in events if isinstance(e, Step)]
    assert [e.figures["skipped"] for e in steps] == [True, True] and steps[-1].figures["encoded"] == 0
    assert steps[-1].done == 6 and isinstance(events[0], Start) and events[0].total == 6
    assert folder_bytes(tmp_path / "lat") == before
    with pytest.raises(DataError, match=r"different settings \(changed: dtype, shard_size"):
        _encode(images, tmp_path / "lat", tiny_vae / "folder", dtype="fp32", shard_size=3)
    assert folder_bytes(tmp_path / "lat") == before  # refused: nothing touched
    replaced = _encode(images, tmp_path / "lat", tiny_vae / "folder", dtype="fp32", shard_size=3, force=True)
    assert (replaced["dtype"], replaced["shard_size"], len(replaced["shards"])) == ("float32", 3, 2)
    assert sorted(p.name for p in (tmp_path / "lat").glob("shard-*")) == [s["file"] for s in replaced["shards"]]


class _Stop(Exception):
    pass


@pytest.mark.e2e
def test_interrupted_run_resumes_to_the_same_bytes(tiny_vae, images, tmp_path):
    _encode(images, tmp_path / "full", tiny_vae / "folder")

    def stop_after_first_shard(e):
        if isinstance(e, Step) and e.figures["shards_done"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        _encode(images, tmp_path / "part", tiny_vae / "folder", progress=stop_after_first_shard)
    assert (tmp_path / "part" / shard_name(0)).exists() and not (tmp_path / "part" / shard_name(1)).exists()
    with pytest.raises(DataError, match="incomplete"):
        open_source(tmp_path / "part")
    events = []
    _encode(images, tmp_path / "part", tiny_vae / "vae.safetensors", progress=events.append)
    steps = [e for e in events if isinstance(e, Step)]
    assert steps[0].figures["skipped"] and steps[-1].figures["encoded"] == 2  # same weights from a single file
    full, part = folder_bytes(tmp_path / "full"), folder_bytes(tmp_path / "part")
    assert full.keys() == part.keys()
    for name in full:
        if name != "manifest.json":
            assert full[name] == part[name], name
    strip = lambda b: {k: v for k, v in json.loads(b).items() if k != "vae"}  # noqa: E731 (vae id differs)
    assert strip(full["manifest.json"]) == strip(part["manifest.json"])


def test_vae_loads_from_folder_file_and_pipeline_folder(tiny_vae, tmp_path):
    x = torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8)
    a = VAECodec(tiny_vae / "folder", device="cpu")
    b = VAECodec(tiny_vae / "vae.safetensors", device="cpu")
    assert a.content_hash == b.content_hash
    assert list(b.vae.config.block_out_channels) == [32, 32, 64, 64]
    torch.testing.assert_close(a.encode_stats(x), b.encode_stats(x))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "vae").symlink_to(tiny_vae / "folder", target_is_directory=True)
    assert load_vae(tmp_path / "pipe").config.latent_channels == 4
    bf16 = VAECodec(tiny_vae / "folder", device="cpu", precision="bf16").encode_stats(x)
    assert bf16[0].dtype == torch.float32


def test_vae_errors_are_clear(tmp_path):
    with pytest.raises(VAEError, match="does not exist"):
        load_vae(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="config.json"):
        load_vae(tmp_path / "empty")
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, tmp_path / "junk.safetensors")
    with pytest.raises(VAEError, match="junk.safetensors"):
        load_vae(tmp_path / "junk.safetensors")


def _cached(repo_id):
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def test_hub_id_offline_fails_fast_with_a_clear_message(images, tmp_path):
    if _cached(DEFAULT_VAE):
        pytest.skip(f"{DEFAULT_VAE} is in the local Hugging Face cache")
    result = invoke(
        "encode-latents", str(images), str(tmp_path / "out"), "--resolution", str(RES), "--vae", DEFAULT_VAE
    )
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text and "HF_HUB_OFFLINE" in text and "--vae /path/to" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_cli_encodes(tiny_vae, images, tmp_path):
    result = invoke(
        "encode-latents",
        str(images),
        str(tmp_path / "out"),
        "--resolution",
        "64",
        "--vae",
        str(tiny_vae / "vae.safetensors"),
        "--batch",
        "4",
        "--shard-size",
        "8",
        "--dtype",
        "fp16",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    src = open_source(tmp_path / "out", 64)
    assert len(src) == 6 and src[0][0].shape == (2, 2, 4, 8, 8) and src[0][0].dtype == torch.float16
    bad = invoke(
        "encode-latents", str(images), str(tmp_path / "o2"), "--resolution", "60", "--vae", str(tiny_vae / "folder")
    )
    assert bad.exit_code == 2 and "multiple of 8" in bad.output


def test_pixel_codec_round_trips():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    codec = PixelCodec()
    x = codec.encode(u)
    assert x.min() == -1 and x.max() == 1
    back = codec.decode(x)
    assert back.shape == (2, 16, 16, 3) and back.dtype == np.uint8
    assert np.array_equal(back, u.permute(0, 2, 3, 1).numpy())
    assert codec.decode(torch.tensor([[[[-3.0, 3.0, 0.0]]]])).flatten().tolist() == [0, 255, 128]


def _ldm_key(key, blocks=4):
    """diffusers AutoencoderKL key → original LDM checkpoint key (as in vae-ft-ema-560000-ema-pruned)."""
    import re

    up = lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.{m.group(2)}."  # noqa: E731
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets)\.", up, key).replace(".resnets.", ".block.")
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.(upsamplers)\.0\.", up, key).replace(".upsamplers.", ".upsample.")
    for a, b in [
        ("mid_block.attentions.0.", "mid.attn_1."),
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
        ("conv_shortcut", "nin_shortcut"),
        ("conv_norm_out", "norm_out"),
    ]:
        key = key.replace(a, b)
    return "first_stage_model." + key


def test_single_file_in_original_ldm_layout_loads(tiny_vae, tmp_path):
    from safetensors.torch import save_file

    ref = load_vae(tiny_vae / "folder")
    sd = {}
    for k, v in ref.state_dict().items():
        k = _ldm_key(k)
        sd[k] = (v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v).contiguous()  # 1×1 convs
    save_file(sd, tmp_path / "ldm.safetensors")
    vae = load_vae(tmp_path / "ldm.safetensors")
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, ref.decode(z).sample)


def test_shipped_config_is_sd_vae_ft_ema():
    from diffusers import AutoencoderKL

    cfg = vae_config()
    assert cfg["block_out_channels"] == [128, 256, 512, 512] and cfg["latent_channels"] == 4
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # 83.7 M: the SD KL-f8 autoencoder


@pytest.mark.e2e
def test_a_full_disk_while_writing_a_shard_keeps_the_previous_one_and_exits_2(tiny_vae, images, tmp_path, monkeypatch):
    """ENOSPC inside the second shard's write: one line naming the file and the space needed, the first
    shard and the manifest intact, no temporary file left; the rerun with space finishes."""
    import errno

    import diffit_cli.fileio as F

    fsync, calls = F.os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:  # manifest, shard 0, then shard 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    out = tmp_path / "lat"
    with monkeypatch.context() as m:
        m.setattr(F.os, "fsync", full_disk)
        r = encode_cli(images, out, tiny_vae / "folder")
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert shard_name(1) in "".join(r.output.split()) and "needed" in flat and "free" in flat and "disk is full" in flat
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, shard_name(0)]  # no temporary file
    before = folder_bytes(out)
    assert encode_cli(images, out, tiny_vae / "folder").exit_code == 0
    assert folder_bytes(out)[shard_name(0)] == before[shard_name(0)]


# ------------------------------------------------------------------ encode → train on shards → sample through the VAE
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


@pytest.mark.e2e  # the module fixture encodes and trains end to end
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


@pytest.mark.e2e  # the module fixture encodes and trains end to end
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


@pytest.mark.e2e  # the module fixture encodes and trains end to end
def test_shards_that_do_not_match_the_preset_are_refused(setup, tmp_path):
    root, vae, _, _ = setup
    args = sum([["--set", s] for s in TINY_VIT + [f"data.vae={vae}"]], [])  # preset at 64², shards at 32²
    r = invoke(
        "train", "--preset", "imagenet256", "--data", str(root / "shards"), "--run-dir", str(tmp_path / "r"), *args
    )
    assert r.exit_code == 2 and "resolution" in r.output and "Traceback" not in r.output


@pytest.mark.e2e  # the module fixture encodes and trains end to end
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
