"""FD-DINOv2 offline: EDM2's preprocessing against a resize computed here, the ViT-L/14 definition against the
official checkpoint's layout, a tiny random ViT of the same interface through `compute_metrics`, and the offline
message when the weights are missing."""

import numpy as np
import pytest
import torch
from helpers import invoke
from PIL import Image
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from diffit_cli.errors import DiffitError
from diffit_cli.fid import dinov2 as D
from diffit_cli.fid import extractors as E
from diffit_cli.fid import metrics as M

TINY = "test-dinov2-tiny"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


class TinyDino(D.DinoV2FeatureExtractor):
    """The real extractor (EDM2's preprocessing, the same ViT) with a 2-block, 32-wide random ViT for the weights."""

    def build_model(self, weights_path):
        torch.manual_seed(0)
        model = D.DinoViT(dim=32, depth=2, heads=2, grid=4)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        return model


def images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, (n, 40, 48, 3)) + shift
    return np.clip(x, 0, 255).astype(np.uint8)


def test_preprocessing_is_pil_bicubic_then_imagenet_normalisation():
    img = images(1, 1)[0]
    img[:, :24] = [250, 10, 90]  # a sharp edge, where bicubic and bilinear differ
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)).astype(np.float64) / 255
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    got = D.edm2_preprocess(torch.from_numpy(img).permute(2, 0, 1)[None])
    assert got.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    bilinear = torch.nn.functional.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(224, 224), mode="bilinear"
    )
    assert not torch.allclose(got, (bilinear / 255 - torch.tensor(D.MEAN).view(1, 3, 1, 1)) / 0.229, atol=1e-2)


def test_vit_l14_layout_matches_the_official_checkpoint():
    with torch.device("meta"):
        model = D.DinoViT()
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 1370, 1024) and sd["cls_token"].shape == (1, 1, 1024)
    assert sd["mask_token"].shape == (1, 1024) and sd["patch_embed.proj.weight"].shape == (1024, 3, 14, 14)
    assert sd["blocks.23.attn.qkv.weight"].shape == (3072, 1024) and sd["blocks.23.ls2.gamma"].shape == (1024,)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (4096, 1024) and "blocks.24.norm1.weight" not in sd
    assert len(sd) == 3 + 2 + 24 * 14 + 2  # tokens, patch embedding, 14 tensors a block, final norm
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(304.4e6, rel=0.01)  # ViT-L/14


def test_tiny_vit_features_and_pos_interpolation():
    model = D.DinoViT(dim=32, depth=2, heads=2, grid=4)
    out = model(torch.randn(3, 3, 224, 224))  # 16×16 patches from a 4×4 position grid
    assert out.shape == (3, 32) and torch.isfinite(out).all()


def test_fd_dinov2_flows_through_compute_metrics():
    FEATURE_EXTRACTORS_REGISTRY[TINY] = TinyDino
    a, b, c = images(12, 1), images(12, 2), images(12, 3, shift=60)
    r = M.compute_metrics(a, b, feature_extractor=TINY, device="cpu", batch=5)
    far = M.compute_metrics(a, c, feature_extractor=TINY, device="cpu", batch=5)
    assert np.isfinite(r["fid"]) and r["fid"] >= 0 and far["fid"] > r["fid"]
    fe = E.make_extractor(TINY, ["dinov2"], torch.device("cpu"), None)
    assert fe(torch.from_numpy(a[:2]).permute(0, 3, 1, 2))[0].shape == (2, 32)


def test_alias_and_name_resolve_to_the_edm2_extractor():
    assert E.extractor_class("dinov2-vit-l14") is D.DinoV2FeatureExtractor
    assert E.extractor_class("dinov2-vit-l-14") is D.DinoV2FeatureExtractor
    assert E.canonical_extractor("dinov2-vit-l14") == "dinov2-vit-l-14"


def test_offline_without_weights_says_where_the_file_goes():
    with pytest.raises(DiffitError) as e:
        M.compute_metrics(images(4, 1), images(4, 2), feature_extractor="dinov2-vit-l14", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and D.DINOV2_URL in msg and str(D.dinov2_weights_cache_path()) in msg
    assert "--dinov2-weights" in msg


def test_eval_fid_without_dinov2_weights_offline_exits_2(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=images(4, 1))
    r = invoke(
        "eval-fid", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "a.npz"), "--feature-extractor", "dinov2-vit-l14"
    )
    assert r.exit_code == 2 and "dinov2_vitl14_pretrain.pth" in r.output
    r = invoke("eval-fid", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "a.npz"), "--dinov2-weights", "x.pth")
    assert r.exit_code == 2 and "--dinov2-weights goes with" in r.output


def test_wrong_file_for_dinov2_weights_fails_cleanly(tmp_path):
    torch.save({"foo": torch.zeros(2)}, tmp_path / "w.pth")
    with pytest.raises(DiffitError, match="does not hold"):
        M.compute_metrics(images(4, 1), images(4, 2), feature_extractor=D.DINOV2, inception_weights=tmp_path / "w.pth")


def test_fd_dinov2_is_named_in_the_result_and_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(D.DinoV2FeatureExtractor, "build_model", TinyDino.build_model)
    D.dinov2_weights_cache_path().parent.mkdir(parents=True)
    D.dinov2_weights_cache_path().write_bytes(b"")  # found in the hub cache; the tiny ViT stands in for its contents
    a, b = images(6, 1), images(6, 2)
    r = M.compute_metrics(a, b, feature_extractor="dinov2-vit-l14", device="cpu")
    assert r["extractor"] == D.DINOV2 and r["fd_dinov2"] == r["fid"] and np.isfinite(r["fd_dinov2"])
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    out = invoke("eval-fid", tmp_path / "a.npz", "--ref", tmp_path / "b.npz", "--feature-extractor", D.DINOV2)
    assert out.exit_code == 0, out.output
    assert "FD-DINOv2" in out.output


def test_inception_score_is_refused_with_dinov2():
    with pytest.raises(DiffitError, match="class probabilities"):
        M.compute_metrics(images(4, 1), metrics="is", feature_extractor="dinov2-vit-l14", device="cpu")
