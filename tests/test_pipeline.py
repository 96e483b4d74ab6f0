"""`DiffiTPipeline`: the same images as `diffit sample` for the same seeds and labels (image space, and a latent model
through a tiny VAE), the diffusers call conventions (output types, `generator`, `.to`), release files with the preset
named, clear errors."""

import numpy as np
import pytest
import torch
from helpers import invoke, perturbed_net, read_pngs, tiny_vit, weights_state

from diffit_cli.checkpoint import NoPresetError, save_checkpoint
from diffit_cli.codecs import decode_pixels
from diffit_cli.config import dump_preset
from diffit_cli.errors import DiffitError
from diffit_cli.pipeline import SEED_LIMIT, DiffiTPipeline, DiffiTPipelineOutput

LATENT_32 = ["model.input_size=4", "data.resolution=32"]  # 32² images → 4×4×4 latents through the tiny VAE


@pytest.fixture(scope="module")
def unet_pipe(unet_ckpt):
    return DiffiTPipeline.from_pretrained(unet_ckpt)


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory, tiny_vae):
    """A tiny class-conditional latent DiffiT (4 classes, guidance 2 with the ddpm sampler) whose preset names the
    tiny VAE, as a training checkpoint with perturbed weights."""
    root = tmp_path_factory.mktemp("latent")
    p = tiny_vit(*LATENT_32, f"data.vae={tiny_vae / 'folder'}")
    save_checkpoint(root, weights_state(p, perturbed_net(p)), 0, keep=1)
    return root / "checkpoints" / "latest.pt"


def _as_uint8(images: np.ndarray) -> np.ndarray:
    """float images in [0, 1] holding 8-bit values → those values."""
    return np.round(images * 255).astype(np.uint8)


@pytest.mark.e2e
def test_images_equal_diffit_sample_for_the_same_seeds(unet_ckpt, unet_pipe, tmp_path):
    seeds = [0, 1, 7]
    r = invoke("sample", "--ckpt", unet_ckpt, "--seeds", "0,1,7", "--out", tmp_path / "png")
    assert r.exit_code == 0, r.output
    expected = read_pngs(tmp_path / "png", seeds)
    out = unet_pipe(seeds=seeds)
    assert isinstance(out, DiffiTPipelineOutput) and out.seeds == seeds and out.class_labels is None
    assert [im.size for im in out.images] == [(16, 16)] * 3
    assert np.array_equal(np.stack([np.asarray(im) for im in out.images]), expected)
    assert not np.array_equal(expected[0], expected[1])  # the seeds' images differ: the comparison can fail


@pytest.mark.e2e
def test_output_types_hold_the_same_images(unet_pipe):
    seeds = [3, 4]
    pil = np.stack([np.asarray(im) for im in unet_pipe(seeds=seeds, output_type="pil").images])
    arr = unet_pipe(seeds=seeds, output_type="np").images
    pt = unet_pipe(seeds=seeds, output_type="pt").images
    latent = unet_pipe(seeds=seeds, output_type="latent").images
    (tup,) = unet_pipe(seeds=seeds, output_type="np", return_dict=False)
    assert arr.dtype == np.float32 and arr.shape == (2, 16, 16, 3) and 0 <= arr.min() and arr.max() <= 1
    assert pt.dtype == torch.float32 and pt.shape == (2, 3, 16, 16)
    assert latent.shape == (2, 3, 16, 16) and latent.dtype == torch.float32
    assert np.array_equal(_as_uint8(arr), pil) and np.array_equal(tup, arr)
    assert np.array_equal(_as_uint8(pt.permute(0, 2, 3, 1).numpy()), pil)
    assert np.array_equal(decode_pixels(latent).numpy(), pil)  # model space, decoded as `diffit sample` decodes


@pytest.mark.e2e
def test_a_generator_draws_one_seed_per_image(unet_pipe):
    """`generator` stands for the seeds it draws: the images are those of `seeds=` with the drawn seeds, which the
    output reports; one generator per image draws each image's seed; without either, torch's global generator."""
    out = unet_pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="np")
    drawn = torch.randint(SEED_LIMIT, (2,), generator=torch.Generator().manual_seed(5)).tolist()
    assert out.seeds == drawn
    assert np.array_equal(out.images, unet_pipe(seeds=drawn, output_type="np").images)
    per_image = unet_pipe(generator=[torch.Generator().manual_seed(k) for k in (8, 9)], output_type="np")
    assert per_image.seeds == [
        int(torch.randint(SEED_LIMIT, (), generator=torch.Generator().manual_seed(k))) for k in (8, 9)
    ]
    torch.manual_seed(11)
    first = unet_pipe(output_type="np")
    torch.manual_seed(11)
    assert unet_pipe(output_type="np").seeds == first.seeds and len(first.seeds) == 1


@pytest.mark.e2e
def test_to_moves_the_network_and_bf16_samples_under_autocast(unet_ckpt, unet_pipe):
    fp32 = unet_pipe(seeds=[2], output_type="np").images
    pipe = DiffiTPipeline.from_pretrained(unet_ckpt, torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in pipe.network.parameters())  # the weights stay fp32
    bf16 = pipe(seeds=[2], output_type="np").images
    assert not np.array_equal(bf16, fp32) and np.abs(bf16 - fp32).mean() < 0.05  # bf16 rounding, the same image
    assert pipe.to(torch.float32) is pipe and pipe.dtype == torch.float32
    assert np.array_equal(pipe(seeds=[2], output_type="np").images, fp32)
    pipe.to("meta")
    assert pipe.device == torch.device("meta") and all(p.is_meta for p in pipe.network.parameters())
    with pytest.raises(DiffitError, match="torch.float32 or torch.bfloat16"):
        pipe.to(torch.float16)


@pytest.mark.e2e
def test_latent_model_equals_diffit_sample_with_labels_and_guidance(latent_ckpt, tmp_path):
    """Through the VAE, with classifier-free guidance: fixed labels, labels drawn per seed, and the call's sampling
    arguments (sampler, steps, guidance scale and schedule) mapped onto the flags of `diffit sample`."""
    pipe = DiffiTPipeline.from_pretrained(latent_ckpt)
    r = invoke("sample", "--ckpt", latent_ckpt, "--seeds", "0-1", "--classes", "1,3", "--out", tmp_path / "fixed.npz")
    assert r.exit_code == 0, r.output
    out = pipe(class_labels=[1, 3], seeds=[0, 1], output_type="np")
    with np.load(tmp_path / "fixed.npz") as z:
        assert np.array_equal(_as_uint8(out.images), z["arr_0"]) and out.class_labels == [1, 3]
        assert out.images.shape == (2, 32, 32, 3)
    r = invoke("sample", "--ckpt", latent_ckpt, "--seeds", "2-4", "--out", tmp_path / "random.npz")
    assert r.exit_code == 0, r.output
    out = pipe(seeds=[2, 3, 4], output_type="np")
    with np.load(tmp_path / "random.npz") as z:
        assert np.array_equal(_as_uint8(out.images), z["arr_0"]) and out.class_labels == z["arr_1"].tolist()
    flags = ["--sampler", "ddim", "--steps", "3", "--cfg-scale", "3", "--cfg-schedule", "power-cosine"]
    r = invoke("sample", "--ckpt", latent_ckpt, "--seeds", "5", "--classes", "2", *flags, "--out", tmp_path / "s.npz")
    assert r.exit_code == 0, r.output
    out = pipe(2, 3.0, num_inference_steps=3, sampler="ddim", guidance_schedule="power-cosine", seeds=[5])
    with np.load(tmp_path / "s.npz") as z:
        assert np.array_equal(np.asarray(out.images[0]), z["arr_0"][0])
        assert not np.array_equal(_as_uint8(pipe(class_labels=2, seeds=[5], output_type="np").images), z["arr_0"])
    pipe.to("meta")
    assert all(p.is_meta for p in pipe.vae.parameters())  # the VAE moves with the network


@pytest.mark.e2e
def test_release_layout_file_loads_with_the_preset_named(tiny_vae, tmp_path, monkeypatch):
    """A `.safetensors` file in the release's layout (no preset inside) is one clear error without `preset=`; with
    it, the file loads, also as a Hub reference `REPO:FILE` served from the local Hub cache."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    p = tiny_vit(*LATENT_32)
    net = perturbed_net(p)
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(weights, tmp_path / "release.safetensors")
    with pytest.raises(NoPresetError, match="--preset") as e:
        DiffiTPipeline.from_pretrained(tmp_path / "release.safetensors")
    assert isinstance(e.value, DiffitError) and "\n" not in str(e.value)
    pipe = DiffiTPipeline.from_pretrained(tmp_path / "release.safetensors", preset=p, vae=tiny_vae / "folder")
    assert all(torch.equal(weights[k], v) for k, v in pipe.network.state_dict().items())
    cache = tmp_path / "hub"  # the Hub cache's layout: what `hf download nvidia/DiffiT FILE` leaves
    snapshot = cache / "models--nvidia--DiffiT" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "diffit_tiny.safetensors").write_bytes((tmp_path / "release.safetensors").read_bytes())
    (cache / "models--nvidia--DiffiT" / "refs").mkdir()
    (cache / "models--nvidia--DiffiT" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    (tmp_path / "tiny.yaml").write_text(dump_preset(p))
    hub = DiffiTPipeline.from_pretrained(
        "nvidia/DiffiT:diffit_tiny.safetensors", preset=str(tmp_path / "tiny.yaml"), vae=tiny_vae / "vae.safetensors"
    )
    assert hub.preset.model == p.model
    assert np.array_equal(hub(1, seeds=[0], output_type="np").images, pipe(1, seeds=[0], output_type="np").images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": [1]}, "unconditional"),
        ({"output_type": "jpeg"}, "pil, np, pt, latent"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"sampler": "ddpm"}, "sampler 'ddpm'"),
        ({"guidance_scale": 2.0}, "class-conditional"),
        ({"seeds": [1, 2], "batch_size": 3}, "2 seeds, 3 batch_size"),
        ({"seeds": [1], "generator": torch.Generator()}, "seeds or generator"),
        ({"seeds": [-1]}, "non-negative"),
        ({"generator": [torch.Generator()], "batch_size": 2}, "1 generators, 2 batch_size"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_argument(unet_pipe, kwargs, message):
    with pytest.raises(DiffitError, match=message) as e:
        unet_pipe(**kwargs)
    assert "\n" not in str(e.value)


def test_labels_are_checked_against_the_models_classes(latent_ckpt):
    pipe = DiffiTPipeline.from_pretrained(latent_ckpt)
    with pytest.raises(DiffitError, match=r"class_labels \[4\]: this model has classes 0..3"):
        pipe(class_labels=[0, 4])
    with pytest.raises(DiffitError, match="3 class_labels"):
        pipe(class_labels=[0, 1, 2], seeds=[0, 1])


@pytest.mark.e2e
def test_exported_folder_gives_the_checkpoints_images(unet_ckpt, unet_pipe, tmp_path, monkeypatch):
    """`diffit export`'s folder, by path and as a Hub repository OWNER/NAME (download replaced at the boundary),
    samples the images of the checkpoint it was exported from, bit for bit in fp32."""
    import huggingface_hub

    from diffit_cli.sharing.export import export_model

    export_model(str(unet_ckpt), tmp_path / "unet")
    expected = unet_pipe(seeds=[0, 5], output_type="np").images
    folder = DiffiTPipeline.from_pretrained(tmp_path / "unet")
    assert np.array_equal(folder(seeds=[0, 5], output_type="np").images, expected)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or tmp_path / "unet"
    )
    hub = DiffiTPipeline.from_pretrained("someone/tiny-diffit")
    assert asked == ["someone/tiny-diffit"]
    assert np.array_equal(hub(seeds=[0, 5], output_type="np").images, expected)


@pytest.mark.e2e
def test_exported_latent_folder_gives_the_checkpoints_images(latent_ckpt, tmp_path):
    """A latent model's exported folder samples, through the VAE its preset names, the checkpoint's images."""
    from diffit_cli.sharing.export import export_model

    export_model(str(latent_ckpt), tmp_path / "latent")
    source = DiffiTPipeline.from_pretrained(latent_ckpt)(class_labels=[0, 3], seeds=[1, 2], output_type="np").images
    exported = DiffiTPipeline.from_pretrained(tmp_path / "latent")(class_labels=[0, 3], seeds=[1, 2], output_type="np")
    assert np.array_equal(exported.images, source)
