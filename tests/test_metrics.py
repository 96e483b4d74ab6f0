"""Metrics through torch-fidelity, offline: the fixed random-conv extractor stands in for Inception.

Images are drawn in code (colour gradients with a disc and noise); a "shift" brightens them, so
a bigger shift must give a bigger FID. The Inception path is checked only for its failure modes
and for where it loads weights from (a random-weight Inception is never used to judge a metric).
A preset's training-set statistics are computed once, cached and reused.
"""

import json
import os
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from helpers import invoke, tiny_unet, tiny_vit
from PIL import Image

from diffit_cli.data import SyntheticShapes, cache_dir, open_source
from diffit_cli.errors import DiffitError
from diffit_cli.fid import extractors as E
from diffit_cli.fid import metrics as M
from diffit_cli.fid.frechet import frechet_distance
from diffit_cli.fid.inputs import read_stats
from diffit_cli.fid.metrics import fid_distance

EXT = E.register_test_extractor()
N = 96


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def make_images(n, seed, shift=0.0, size=32):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        c0, c1, disc = rng.uniform(0, 255, (3, 3))
        t = ((np.cos(a := rng.uniform(0, 2 * np.pi)) * xx + np.sin(a) * yy + 1) / 2)[..., None]
        img = c0 * (1 - t) + c1 * t
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        img[(xx * (size - 1) - cx) ** 2 + (yy * (size - 1) - cy) ** 2 < rng.uniform(3, 10) ** 2] = disc
        out[i] = np.clip(img + rng.normal(0, 8, img.shape) + shift, 0, 255)
    return out


def write_folder(path, images):
    path.mkdir(parents=True)
    for i, im in enumerate(images):
        sub = path / f"{i // 50:05d}"  # class-style subfolders: the search is recursive
        sub.mkdir(exist_ok=True)
        Image.fromarray(im).save(sub / f"img{i:08d}.png")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-data")
    arrays = {
        "a": make_images(N, 0),
        "b": make_images(N, 1),  # same distribution, other draws
        "shift20": make_images(N, 1, 20),
        "shift60": make_images(N, 1, 60),
    }
    d = {k: write_folder(root / k, v) for k, v in arrays.items()}
    np.savez(root / "a.npz", arr_0=arrays["a"], arr_1=np.zeros(N, np.int64))
    with zipfile.ZipFile(root / "a.zip", "w") as zf:  # EDM dataset_tool layout
        for i, im in enumerate(arrays["a"]):
            buf = root / "tmp.png"
            Image.fromarray(im).save(buf)
            zf.write(buf, f"{i // 50:05d}/img{i:08d}.png")
        zf.writestr("dataset.json", json.dumps({"labels": None}))
    d.update(root=root, arrays=arrays, npz=root / "a.npz", zip=root / "a.zip")
    return d


def fid(samples, ref, **kw):
    return M.compute_metrics(samples, ref, feature_extractor=EXT, device="cpu", **kw)["fid"]


def features(images):
    fe = E.RandConvFeatureExtractor(EXT, ["features"])
    return fe(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0].double().numpy()


# ---------------------------------------------------------------------------------------------- extractor


def test_test_extractor_is_deterministic_and_not_collapsed(data):
    x = data["arrays"]["a"]
    f1, f2 = features(x), features(x)
    assert np.array_equal(f1, f2)
    assert f1.shape == (N, 128)
    assert (f1.std(0) > 1e-3).all()  # every feature varies across images
    s = np.linalg.svd(f1 - f1.mean(0), compute_uv=False)
    assert (s**2)[:3].sum() / (s**2).sum() < 0.95  # not one or two directions
    logits = E.RandConvFeatureExtractor(EXT, ["logits"])(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())[0]
    assert len(set(logits.argmax(1).tolist())) >= 3
    assert E.register_test_extractor() == EXT  # idempotent


# ---------------------------------------------------------------------------------------------- FID


def test_fid_of_a_set_against_itself_is_zero(data):
    assert abs(fid(data["a"], data["a"])) < 1e-6


def test_fid_grows_with_the_shift(data):
    same = fid(data["a"], data["b"])
    small, big = fid(data["a"], data["shift20"]), fid(data["a"], data["shift60"])
    assert 0 < same < small < big
    assert big > 3 * same


def test_two_draws_are_much_closer_than_noise(data):
    noise = np.random.default_rng(5).integers(0, 256, data["arrays"]["a"].shape, dtype=np.uint8)
    assert fid(data["a"], data["b"]) < 0.1 * fid(data["a"], noise)


def test_frechet_distance_matches_the_closed_form():
    """‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), computed independently for commuting (diagonal) covariances."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    got = fid_distance({"mu": mu1, "sigma": np.diag(v1)}, {"mu": mu2, "sigma": np.diag(v2)})
    assert got == pytest.approx(expected, rel=1e-6)


def test_npz_zip_array_and_folder_inputs_agree(data, tmp_path):
    ref = data["b"]
    expected = fid(data["a"], ref)
    assert fid(data["npz"], ref) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert fid(data["zip"], ref) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert fid(data["arrays"]["a"], ref) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    packed = tmp_path / "a-compressed.npz"
    np.savez_compressed(packed, arr_0=data["arrays"]["a"])
    assert fid(packed, ref, batch=25) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # batch size does not change the numbers
    assert fid(data["npz"], ref, batch=7) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_fid_against_saved_stats_equals_fid_against_the_folder(data, tmp_path):
    out = tmp_path / "ref" / "b-stats.npz"
    info = M.save_reference(data["b"], out, feature_extractor=EXT, device="cpu")
    assert info["num_images"] == N and info["extractor"] == EXT and info["dim"] == 128
    assert sorted(os.listdir(out.parent)) == ["b-stats.npz"]  # no temp file left behind
    stats = read_stats(out)
    assert stats["extractor"] == EXT and stats["num_images"] == N
    assert stats["mu"].shape == (128,) and stats["sigma"].shape == (128, 128)
    r = M.compute_metrics(data["a"], out, feature_extractor=EXT, device="cpu")
    assert r["fid"] == pytest.approx(fid(data["a"], data["b"]), rel=1e-9)
    assert r["reference_kind"] == "stats" and r["num_reference"] == N


def test_saved_stats_with_features_serve_kid_and_pr(data, tmp_path):
    out = M.save_reference(data["b"], tmp_path / "b.npz", feature_extractor=EXT, device="cpu", features=True)["path"]
    a = M.compute_metrics(data["a"], out, metrics="kid,pr", feature_extractor=EXT, device="cpu")
    b = M.compute_metrics(data["a"], data["b"], metrics="kid,pr", feature_extractor=EXT, device="cpu")
    for k in ("kid_mean", "precision", "recall"):
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9)


def test_edm_and_adm_style_stats_files_are_read(data, tmp_path):
    f = features(data["arrays"]["b"])
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    expected = fid(data["a"], data["b"])
    edm = tmp_path / "cifar10-32x32.npz"  # EDM's fid.py: mu, sigma only
    np.savez(edm, mu=mu, sigma=sigma)
    assert fid(data["a"], edm) == pytest.approx(expected, rel=1e-6)
    edm32 = tmp_path / "edm-float32.npz"
    np.savez(edm32, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    assert fid(data["a"], edm32) == pytest.approx(expected, rel=1e-4)
    # ADM reference batch: full-dataset mu/sigma (FID) + reference images in arr_0 (KID, P/R) + sFID stats
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, arr_0=data["arrays"]["b"], mu=mu, sigma=sigma, mu_s=np.zeros(4), sigma_s=np.eye(4))
    r = M.compute_metrics(data["a"], adm, metrics="fid,kid,pr", feature_extractor=EXT, device="cpu")
    direct = M.compute_metrics(  # an ADM batch gets ADM's precision/recall; the images alone need it asked for
        data["a"], data["b"], metrics="kid,pr", feature_extractor=EXT, device="cpu", protocol="adm"
    )
    assert r["fid"] == pytest.approx(expected, rel=1e-6)
    assert r["precision"] == direct["precision"] and r["recall"] == direct["recall"]
    assert r["kid_mean"] == pytest.approx(direct["kid_mean"], rel=1e-6)
    info = read_stats(adm)
    assert info["extractor"] is None and info["has_images"]


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"mu": np.zeros(128)}, "needs both `mu` and `sigma`"),
        ({"mu": np.zeros(128), "sigma": np.zeros((128, 5))}, r"must be \(D,\)"),
        ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, "2048-dimensional"),
        ({"foo": np.zeros(3)}, "no `arr_0`"),
        ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "must hold uint8 images"),
    ],
)
def test_bad_reference_files(data, tmp_path, arrays, match):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(DiffitError, match=match):
        fid(data["a"], bad)


def test_stats_from_another_extractor_are_refused(data, tmp_path):
    out = tmp_path / "s.npz"
    np.savez(out, mu=np.zeros(128), sigma=np.eye(128), extractor=np.array("inception-v3-compat"))
    with pytest.raises(DiffitError, match="computed with feature extractor inception-v3-compat"):
        fid(data["a"], out)


def test_other_user_errors(data, tmp_path):
    with pytest.raises(DiffitError, match="not found"):
        fid(tmp_path / "missing", data["b"])
    with pytest.raises(DiffitError, match="--metrics 'lpips': unknown metric"):
        fid(data["a"], data["b"], metrics="fid,lpips")
    with pytest.raises(DiffitError, match="pass --ref"):
        M.compute_metrics(data["a"], None, feature_extractor=EXT)
    with pytest.raises(DiffitError, match="unknown feature extractor"):
        M.compute_metrics(data["a"], data["b"], feature_extractor="nope")
    stats = tmp_path / "s.npz"
    np.savez(stats, mu=np.zeros(128), sigma=np.eye(128))
    with pytest.raises(DiffitError, match="samples must be images"):
        fid(stats, data["b"])
    with pytest.raises(DiffitError, match="need reference images or features"):
        fid(data["a"], stats, metrics="kid")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "0.png")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(mixed / "1.png")
    with pytest.raises(DiffitError, match="differ in size"):
        fid(mixed, data["b"])
    with pytest.raises(DiffitError, match=r"\.npz"):
        M.save_reference(data["b"], tmp_path / "s.pt", feature_extractor=EXT)


# ---------------------------------------------------------------------------------------------- IS, KID, P/R


def test_is_kid_pr_in_range(data):
    r = M.compute_metrics(data["a"], data["shift60"], metrics="fid,is,kid,pr", feature_extractor=EXT, device="cpu")
    assert 1.0 <= r["is_mean"] <= E.RandConvFeatureExtractor.NUM_LOGITS and r["is_std"] >= 0
    assert r["kid_mean"] > 0.01 and r["kid_std"] >= 0
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert r["extractor"] == EXT and r["num_samples"] == N
    assert any("not comparable" in n for n in r["notes"])
    same = M.compute_metrics(data["a"], data["a"], metrics="kid,pr", feature_extractor=EXT, device="cpu")
    assert abs(same["kid_mean"]) < 0.01 < r["kid_mean"]
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    only_is = M.compute_metrics(data["a"], metrics=["is"], feature_extractor=EXT, device="cpu")
    assert only_is["is_mean"] == r["is_mean"] and only_is["reference"] is None


# ---------------------------------------------------------------------------------------------- Inception weights


def test_offline_without_inception_weights_fails_fast(data, tmp_path):
    with pytest.raises(DiffitError) as e:
        M.compute_metrics(data["a"], data["b"])
    msg = str(e.value)
    assert "--inception-weights" in msg and "HF_HUB_OFFLINE" in msg
    expected_name = "weights-inception-2015-12-05-6726825d.pth"
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / expected_name) in msg
    assert E.inception_weights_cache_path() == tmp_path / "torch-home" / "hub" / "checkpoints" / expected_name


def test_failed_download_is_a_clear_error(data, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inc, "load_state_dict_from_url", no_network)
    with pytest.raises(DiffitError, match="could not download.*--inception-weights"):
        M.compute_metrics(data["a"], data["b"])


@pytest.fixture(scope="module")
def inception_state_file(tmp_path_factory):
    """An Inception state dict with the right keys (random init): only to check where weights load from."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    mp = pytest.MonkeyPatch()
    mp.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    try:
        net = inc.FeatureExtractorInceptionV3(E.INCEPTION, ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_path_and_hub_cache_are_used(data, tmp_path, inception_state_file):
    x = data["arrays"]["a"][:2]
    r = M.compute_metrics(x, metrics="is", inception_weights=inception_state_file, device="cpu")
    assert r["extractor"] == E.INCEPTION and r["feature_layers"] == {"is": "logits_unbiased"}
    assert np.isfinite(r["is_mean"])
    cached = E.inception_weights_cache_path()
    cached.parent.mkdir(parents=True)
    os.symlink(inception_state_file, cached)
    r2 = M.compute_metrics(x, metrics="is", device="cpu")  # offline, found in the torch hub cache
    assert r2["is_mean"] == pytest.approx(r["is_mean"], rel=1e-6)


def test_bad_inception_weights_file(data, tmp_path):
    with pytest.raises(DiffitError, match="weights file not found"):
        M.compute_metrics(data["a"], data["b"], inception_weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DiffitError, match="is not a file of inception-v3-compat weights"):
        M.compute_metrics(data["a"], data["b"], inception_weights=junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(DiffitError, match="does not hold inception-v3-compat weights"):
        M.compute_metrics(data["a"], data["b"], inception_weights=wrong)
    cached = E.inception_weights_cache_path()  # a broken download in the torch hub cache
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    with pytest.raises(DiffitError, match="cached Inception weights .* are unreadable"):
        M.compute_metrics(data["a"], data["b"])


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_prints_a_table_and_writes_json(data, tmp_path):
    out = tmp_path / "res" / "metrics.json"
    r = invoke(
        "eval-fid",
        data["npz"],
        "--ref",
        data["shift20"],
        "--metrics",
        "fid,is,kid,pr",
        "--feature-extractor",
        EXT,
        "--device",
        "cpu",
        "--batch",
        "32",
        "--json",
        out,
    )
    assert r.exit_code == 0, r.output
    for word in ("FID", "Inception Score", "KID", "Precision", "Recall", EXT):
        assert word in r.output
    res = json.loads(out.read_text())
    assert res["fid"] == pytest.approx(fid(data["a"], data["shift20"]), rel=1e-9)
    assert {"is_mean", "kid_mean", "precision", "recall", "extractor", "num_samples"} <= set(res)


def test_cli_save_ref_then_evaluate_against_it(data, tmp_path):
    stats = tmp_path / "b.npz"
    r = invoke("eval-fid", data["b"], "--save-ref", stats, "--feature-extractor", EXT)
    assert r.exit_code == 0, r.output
    assert "Saved statistics of 96 images" in r.output and stats.is_file()
    r = invoke("eval-fid", data["a"], "--ref", stats, "--feature-extractor", EXT, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == pytest.approx(fid(data["a"], data["b"]), rel=1e-9)


def test_cli_user_errors_exit_2_without_traceback(data, tmp_path):
    no_arr = tmp_path / "no-arr.npz"
    np.savez(no_arr, images=np.zeros((2, 8, 8, 3), np.uint8))
    wrong_keys = tmp_path / "wrong-keys.npz"
    np.savez(wrong_keys, mu=np.zeros(4), sig=np.eye(4))
    cases = [
        ((tmp_path / "missing", "--ref", data["b"]), "samples not found"),
        ((no_arr, "--ref", data["b"]), "no `arr_0`"),
        ((data["a"], "--ref", wrong_keys), "needs both `mu` and `sigma`"),
        (
            (data["a"], "--ref", data["b"], "--metrics", "fid,bogus"),
            "--metrics 'bogus': unknown metric; choose from fid",
        ),
        ((data["a"], "--ref", data["b"]), "--inception-weights"),  # offline, no Inception weights
        ((data["a"], "--ref", data["b"], "--save-ref", tmp_path / "x.npz"), "takes no --ref"),
    ]
    for args, message in cases:
        r = invoke("eval-fid", *args)
        assert r.exit_code == 2, (args, r.output)
        flat = " ".join(r.output.split())
        assert "Error:" in flat and message in flat, flat
        assert "Traceback" not in r.output


@pytest.mark.parametrize("content", [b"not weights at all", b"PK\x03\x04 truncated zip"])
def test_a_non_weights_file_is_named_without_unsafe_advice(data, tmp_path, content):
    """Torch's hint to retry with weights_only=False (i.e. to execute a pickle) is never passed on."""
    bad = tmp_path / "inception.pth"
    bad.write_bytes(content)
    r = invoke("eval-fid", str(data["a"]), "--ref", str(data["b"]), "--inception-weights", str(bad))
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    flat = "".join(r.output.split())
    assert str(bad) in flat and "statedictoftensors" in flat
    assert "weights_only" not in r.output and "pickle" not in r.output.lower()


def test_a_scorer_swapped_in_fid_metrics_reaches_eval_fid_ckpt(tmp_path, monkeypatch):
    """`fid.score` calls `compute_metrics` through its module `diffit_cli.fid.metrics`, so a function swapped there
    is the one `eval-fid --ckpt` (and FID along training, and ablate) scores the samples with."""
    from helpers import tiny_unet

    from diffit_cli.build import build_network
    from diffit_cli.config import dump_preset

    p = tiny_unet()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "ema": build_network(p.model).state_dict(), "preset": dump_preset(p)}, ckpt)
    seen = []

    def scorer(samples, reference, **kw):
        with np.load(samples) as z:  # the assembled samples of seeds 0..3
            seen.append((z["arr_0"].shape[0], str(reference), kw["feature_extractor"]))
        return {"fid": 1.25, "num_samples": 4, "notes": []}

    monkeypatch.setattr(M, "compute_metrics", scorer)
    r = invoke("eval-fid", "--ckpt", ckpt, "--num", 4, "--feature-extractor", EXT, "--ref", tmp_path / "ref.npz")
    assert r.exit_code == 0, r.output
    assert seen == [(4, str(tmp_path / "ref.npz"), EXT)] and "1.2500" in r.output


# -------------------------------------------------------------------------------------------- training-set statistics
def test_training_statistics_are_computed_once_and_reused(monkeypatch, cache):
    from diffit_cli.fid import metrics as M
    from diffit_cli.fid.extractors import TEST_EXTRACTOR
    from diffit_cli.fid.inputs import read_stats
    from diffit_cli.fid.reference import training_statistics

    p = tiny_unet()
    path, what = training_statistics(p, feature_extractor=TEST_EXTRACTOR, limit=16, batch=8)
    assert path.parent == cache_dir() / "fid-refs" and path.is_file()
    assert what == "16 training images (synthetic-shapes(style=simple, seed=0, size=50000), 16px)"
    stats = read_stats(path)
    assert stats["num_images"] == 16 and stats["extractor"] == TEST_EXTRACTOR
    src = open_source(p.data)  # the images training reads, through save_reference itself
    M.save_reference(
        np.stack([src[i][0].numpy().transpose(1, 2, 0) for i in range(16)]),
        cache / "direct.npz",
        feature_extractor=TEST_EXTRACTOR,
        batch=8,
    )
    np.testing.assert_allclose(stats["mu"], read_stats(cache / "direct.npz")["mu"], rtol=1e-6, atol=1e-7)

    def no_reading(*a, **k):
        raise AssertionError("the images were read again")

    monkeypatch.setattr(SyntheticShapes, "__getitem__", no_reading)
    monkeypatch.setattr(M, "save_reference", no_reading)
    assert training_statistics(p, feature_extractor=TEST_EXTRACTOR, limit=16, batch=8) == (path, what)
    with pytest.raises(AssertionError, match="read again"):  # another count is another key
        training_statistics(p, feature_extractor=TEST_EXTRACTOR, limit=8, batch=8)
    with pytest.raises(DiffitError, match="latent model needs a reference statistics file"):
        training_statistics(tiny_vit(), feature_extractor=TEST_EXTRACTOR)


@pytest.mark.e2e
def test_eval_fid_scores_against_a_presets_training_set(tmp_path, cache):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), np.arange(12) % 8)
    (tmp_path / "samples").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "samples" / f"{i}.png")
    args = [
        "eval-fid",
        str(tmp_path / "samples"),
        "--preset",
        "demo",
        "--data",
        str(tmp_path / "train.npz"),
        "--set",
        "data.resolution=16",
        "--set",
        "model.img_resolution=16",
        "--feature-extractor",
        "diffit-randconv-v1",
    ]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "statistics of 12 training images" in r.output and str(cache / "fid-refs") in r.output
    [stats] = (cache / "fid-refs").glob("*.npz")
    written = stats.stat().st_mtime_ns
    assert invoke(*args).exit_code == 0 and stats.stat().st_mtime_ns == written  # reused, not recomputed
    r = invoke("eval-fid", str(tmp_path / "samples"), "--data", str(tmp_path / "train.npz"))
    assert r.exit_code == 2 and "--preset" in r.output


# ---------------------------------------------------------------------------------------------- sFID and the
# Fréchet distance


def textbook_frechet(mu1, s1, mu2, s2):
    """The textbook formula with a general matrix square root of Σ1Σ2 (Denman–Beavers iteration: no eigenvalues),
    written independently of the package; for well-conditioned covariances."""
    y, z = s1 @ s2, np.eye(len(s1))
    for _ in range(60):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(y))


def eigvals_frechet(mu1, s1, mu2, s2):
    """tr (Σ1Σ2)^½ from the (complex) eigenvalues of the non-symmetric Σ1Σ2: also valid for singular covariances."""
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def spd(rng, d, spread=1.0):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + spread * np.eye(d)


@pytest.mark.parametrize("d", [8, 256])
def test_frechet_distance_equals_the_textbook_formula_and_torch_fidelity_on_well_conditioned_covariances(d):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(d)
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), spd(rng, d), spd(rng, d, 0.5)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(textbook_frechet(mu1, s1, mu2, s2), rel=1e-6)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)[KEY_METRIC_FID]
    assert got == pytest.approx(tf, rel=1e-6)


def test_frechet_distance_of_two_known_gaussians():
    """Σ1 = c·I commutes with any Σ2, so tr (Σ1Σ2)^½ = √c Σ √λ(Σ2): a known answer for a non-diagonal Σ2."""
    rng = np.random.default_rng(1)
    d, c = 40, 2.5
    s2 = spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + c * d + np.trace(s2) - 2 * np.sqrt(c) * np.sqrt(np.linalg.eigvalsh(s2)).sum()
    assert frechet_distance(mu1, c * np.eye(d), mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, c * np.eye(d)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_stays_real_and_finite_on_rank_deficient_covariances():
    """2048-dim covariances of 64 and 100 feature vectors (rank ≤ 99) plus an exactly singular diagonal case with
    a closed form: the distance is a finite real number, ≥ 0 up to rounding, 0 for identical inputs, symmetric."""
    rng = np.random.default_rng(2)
    d = 2048
    f1 = rng.normal(size=(64, d)) * np.logspace(0, -6, d)  # scales spanning 6 decades: ill-conditioned
    f2 = rng.normal(size=(100, d)) * np.logspace(0, -6, d) + 0.01
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert np.isfinite(d12) and isinstance(d12, float)
    scale = np.trace(s1) + np.trace(s2)
    assert d12 > -1e-9 * scale and d12 == pytest.approx(d21, rel=1e-6)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * scale
    v1 = np.where(np.arange(50) % 3 == 0, 0.0, rng.uniform(0, 2, 50))  # exact zeros: singular
    v2 = np.where(np.arange(50) % 4 == 0, 0.0, rng.uniform(0, 2, 50))
    expected = ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(np.zeros(50), np.diag(v1), np.zeros(50), np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def spatial_features(images):
    fe = E.RandConvFeatureExtractor(EXT, [E.SPATIAL])
    return fe(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0].double().numpy()


def test_sfid_against_images_and_against_a_known_gaussian(data, tmp_path):
    """sFID of the samples' spatial features (computed here from the stand-in's definition) against the reference
    images' ones and against a Gaussian given as `mu_s`/`sigma_s`, each by an independent formula (the eigenvalues
    of the non-symmetric Σ1Σ2)."""
    fa, fb = spatial_features(data["arrays"]["a"]), spatial_features(data["arrays"]["b"])
    assert fa.shape == (N, 8 * 8 * E.SPATIAL_CHANNELS)
    mu_a, s_a = fa.mean(0), np.cov(fa, rowvar=False)
    r = M.compute_metrics(data["a"], data["b"], metrics="fid,sfid", feature_extractor=EXT, device="cpu")
    expected = eigvals_frechet(mu_a, s_a, fb.mean(0), np.cov(fb, rowvar=False))
    assert r["sfid"] == pytest.approx(expected, rel=1e-5) and r["sfid"] > 0
    assert r["feature_layers"]["sfid"] == E.SPATIAL
    rng = np.random.default_rng(3)
    mu_g, s_g = mu_a + rng.normal(0, 0.05, mu_a.shape), spd(rng, len(mu_a), 0.2) * 0.01
    gauss = tmp_path / "gaussian.npz"
    np.savez(gauss, mu=np.zeros(128), sigma=np.eye(128), mu_s=mu_g, sigma_s=s_g)
    got = M.compute_metrics(data["a"], gauss, metrics="sfid", feature_extractor=EXT, device="cpu")["sfid"]
    assert got == pytest.approx(eigvals_frechet(mu_a, s_a, mu_g, s_g), rel=1e-5)
    assert abs(M.compute_metrics(data["a"], data["a"], metrics="sfid", feature_extractor=EXT)["sfid"]) < 1e-6


def test_save_ref_writes_spatial_statistics_that_sfid_reads(data, tmp_path):
    out = tmp_path / "ref.npz"
    M.save_reference(data["b"], out, feature_extractor=EXT, device="cpu")
    info = read_stats(out)
    assert info["has_spatial"] and info["spatial_dim"] == 448
    with np.load(out) as z:
        fb = spatial_features(data["arrays"]["b"])
        np.testing.assert_allclose(z["mu_s"], fb.mean(0), rtol=1e-5, atol=1e-6)
        assert z["sigma_s"].shape == (448, 448)
    a = M.compute_metrics(data["a"], out, metrics="fid,sfid", feature_extractor=EXT, device="cpu")
    b = M.compute_metrics(data["a"], data["b"], metrics="fid,sfid", feature_extractor=EXT, device="cpu")
    assert a["sfid"] == pytest.approx(b["sfid"], rel=1e-6) and a["fid"] == pytest.approx(b["fid"], rel=1e-6)


def test_sfid_needs_spatial_statistics_and_spatial_features(data, tmp_path):
    stats = tmp_path / "cifar10-32x32.npz"
    np.savez(stats, mu=np.zeros(128), sigma=np.eye(128))
    with pytest.raises(DiffitError, match=r"sFID needs the reference's spatial statistics .*cifar10-32x32\.npz"):
        fid(data["a"], stats, metrics="sfid")
    half = tmp_path / "half.npz"
    np.savez(half, mu=np.zeros(128), sigma=np.eye(128), mu_s=np.zeros(448))
    with pytest.raises(DiffitError, match="only one of `mu_s` and `sigma_s`"):
        fid(data["a"], half, metrics="sfid")
    wrong = tmp_path / "inception-spatial.npz"
    np.savez(wrong, mu=np.zeros(128), sigma=np.eye(128), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with pytest.raises(DiffitError, match="sFID: .* 2023-dimensional .* samples' have 448"):
        fid(data["a"], wrong, metrics="sfid")
    with pytest.raises(DiffitError, match="does not give"):
        E.make_extractor("vgg16", ["fc2", E.SPATIAL], torch.device("cpu"), None)


def test_cli_sfid_against_a_reference_without_spatial_statistics_is_one_line(data, tmp_path):
    stats = tmp_path / "edm-ref.npz"
    np.savez(stats, mu=np.zeros(128), sigma=np.eye(128))
    r = invoke("eval-fid", data["a"], "--ref", stats, "--metrics", "fid,sfid", "--feature-extractor", EXT)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    flat = " ".join(r.output.split())
    assert "edm-ref.npz" in flat and "`mu_s`, `sigma_s`" in flat, flat
    assert sum("Error:" in line for line in lines) == 1


def test_inception_spatial_features_come_from_mixed_6d_branch1x1_in_the_same_forward(inception_state_file):
    """The compat network with random weights of the right shapes: one forward per batch gives the 2048 pool
    features and 2023 spatial ones (TF `mixed_6/conv`, first 7 channels, NHWC order); the spatial layer runs
    before the pool."""
    fe = E.make_extractor(E.INCEPTION, ["2048", E.SPATIAL], torch.device("cpu"), inception_state_file)
    order, full, forwards = [], [], []

    def record(name):
        def hook(module, inputs, output):
            order.append(name)
            if name == "mixed_6/conv":
                full.append(output.detach().clone())

        return hook

    fe.get_submodule(E.INCEPTION_SPATIAL_MODULE).register_forward_hook(record("mixed_6/conv"))
    fe.Mixed_7a.register_forward_hook(record("Mixed_7a"))
    fe.AvgPool.register_forward_hook(record("pool_3"))
    fe.register_forward_pre_hook(lambda module, inputs: forwards.append(len(inputs[0])) and None)
    images = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    from diffit_cli.fid.inputs import array_images

    feats = E.extract_features(array_images(images), fe, torch.device("cpu"), 2, None, "samples")
    assert forwards == [2, 1]  # one pass per batch, no second pass for the spatial features
    assert order == ["mixed_6/conv", "Mixed_7a", "pool_3"] * 2
    assert feats["2048"].shape == (3, 2048) and feats[E.SPATIAL].shape == (3, 17 * 17 * 7)
    fmap = torch.cat(full)
    assert fmap.shape == (3, 192, 17, 17)  # the 1×1 branch of the 17×17×768 block Mixed_6d
    n, h, w, c = 2, 5, 11, 6  # row-major over (row, column, channel), as TF's reshape of NHWC
    assert feats[E.SPATIAL][n, (h * 17 + w) * 7 + c] == fmap[n, c, h, w]
    torch.testing.assert_close(feats[E.SPATIAL], fmap[:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    only = E.make_extractor(E.INCEPTION, [E.SPATIAL], torch.device("cpu"), inception_state_file)
    alone = E.extract_features(array_images(images), only, torch.device("cpu"), 3, None, "samples")
    torch.testing.assert_close(alone[E.SPATIAL], feats[E.SPATIAL])


def test_eval_fid_ckpt_scores_sfid_beside_fid_and_refuses_a_reference_without_spatial_statistics(data, tmp_path):
    from helpers import tiny_unet

    from diffit_cli.build import build_network
    from diffit_cli.config import dump_preset

    p = tiny_unet()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "ema": build_network(p.model).state_dict(), "preset": dump_preset(p)}, ckpt)
    ref = tmp_path / "ref.npz"
    M.save_reference(data["b"], ref, feature_extractor=EXT, device="cpu")
    out = tmp_path / "r.json"
    args = ("eval-fid", "--ckpt", ckpt, "--num", 4, "--feature-extractor", EXT, "--ref")
    r = invoke(*args, ref, "--metrics", "sfid", "--json", out)
    assert r.exit_code == 0, r.output
    [rep] = json.loads(out.read_text())["repeats"]
    assert set(rep) == {"seeds", "fid", "sfid"} and np.isfinite(rep["sfid"]) and rep["sfid"] > 0
    assert "sfid" in r.output
    bare = tmp_path / "bare.npz"
    np.savez(bare, mu=np.zeros(128), sigma=np.eye(128))
    r = invoke(*args, bare, "--metrics", "fid,sfid")
    assert r.exit_code == 2 and "bare.npz" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.e2e
def test_fid_along_training_logs_the_other_eval_metrics_beside_fid(data, tmp_path):
    from helpers import tiny_unet

    from diffit_cli.training import train

    ref = tmp_path / "ref.npz"
    M.save_reference(data["b"], ref, feature_extractor=EXT, device="cpu")
    sets = ["eval.every_kimg=0.016", "eval.num_samples=8", f"eval.feature_extractor={EXT}", f"eval.reference={ref}"]
    train(tiny_unet(*sets, "eval.metrics=[sfid]", "train.total_kimg=0.016"), tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    [point] = [r for r in log if r.get("event") == "fid"]
    assert np.isfinite(point["fid"]) and np.isfinite(point["sfid"]) and point["sfid"] > 0
