"""ADM's evaluator conventions (`fid.adm`): Inception Score over in-order splits, k-NN precision/recall, which
protocol `eval-fid` uses, and the release's published table printed beside the measured values.

IS and precision/recall are checked against implementations written here from the definitions (Dhariwal & Nichol
2021; Kynkäänniemi et al. 2019), on inputs whose answers can be reasoned about. The CLI runs with the offline
stand-in extractor, so its numbers mean nothing: only the plumbing is checked.
"""

import json

import numpy as np
import pytest
import torch
from helpers import invoke

from diffit_cli.errors import DiffitError
from diffit_cli.fid import adm
from diffit_cli.fid import extractors as E
from diffit_cli.fid import metrics as M
from diffit_cli.fid.inputs import open_input

EXT = E.register_test_extractor()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------
# Inception Score


def reference_is(logits: np.ndarray, split_size: int) -> float:
    """The definition: p(y|x) = softmax; per consecutive split, exp(mean_x KL(p(y|x) ‖ mean_x p(y|x))); the mean."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]
        marginal = part.mean(0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.maximum(part, 1e-300)) - np.log(marginal)), 0.0).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def confident_logits(classes: np.ndarray, num_classes: int, scale: float = 50.0) -> np.ndarray:
    out = np.zeros((len(classes), num_classes))
    out[np.arange(len(classes)), classes] = scale
    return out


def test_is_splits_in_order_and_matches_the_definition():
    """The first split is all class 0 (IS 1), the second spreads over 10 classes (IS 10): in order the mean is 5.5;
    shuffled splits would each mix both halves and give another number."""
    classes = np.concatenate([np.zeros(50, int), np.arange(50) % 10])
    logits = confident_logits(classes, 10)
    mean, std = adm.inception_score(torch.from_numpy(logits).float(), split_size=50)
    assert mean == pytest.approx(5.5, rel=1e-6)
    assert std == pytest.approx(4.5, rel=1e-6)
    assert mean == pytest.approx(reference_is(logits, 50), rel=1e-9)
    shuffled = logits[np.random.default_rng(0).permutation(len(logits))]
    assert reference_is(shuffled, 50) < 5.3  # mixed splits: exp(entropy of a 55% / 9 × 5% marginal) ≈ 5.1


def test_is_on_random_logits_with_a_remainder_split():
    logits = np.random.default_rng(1).normal(0, 3, (12_345, 17))
    mean, _ = adm.inception_score(torch.from_numpy(logits).float())  # splits 5000, 5000, 2345
    assert mean == pytest.approx(reference_is(logits.astype(np.float32).astype(np.float64), 5000), rel=1e-9)
    whole, _ = adm.inception_score(torch.from_numpy(logits).float(), split_size=len(logits))
    assert whole != pytest.approx(mean, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Precision / recall


def reference_pr(samples: np.ndarray, reference: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The definition, brute force in float64: a point's ball reaches its k-th nearest neighbour in its own set
    (itself excluded); precision = share of samples in some reference ball, recall = the converse."""

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d = np.sqrt(((samples[:, None] - reference[None]) ** 2).sum(-1))  # samples × reference
    precision = (d <= radii(reference)[None, :]).any(1).mean()
    recall = (d <= radii(samples)[:, None]).any(0).mean()
    return float(precision), float(recall)


def pr(samples, reference, **kw):
    r = adm.precision_recall(torch.as_tensor(samples).float(), torch.as_tensor(reference).float(), **kw)
    return r["precision"], r["recall"]


def integer_points(n, seed, dims=4, high=7, offset=0):
    """Small integer coordinates: exact in float16, so ADM's float16 distances equal the exact ones (ties
    included, which exercises the inclusive boundary)."""
    return np.random.default_rng(seed).integers(0, high, (n, dims)).astype(np.float64) + offset


def test_identical_sets_give_one_and_one():
    x = integer_points(40, 0)
    assert pr(x, x) == (1.0, 1.0)


def test_far_apart_clusters_give_zero_and_zero():
    assert pr(integer_points(30, 0), integer_points(30, 1, offset=40)) == (0.0, 0.0)


def test_samples_covering_half_the_reference():
    """Reference = clusters A and B; samples = A: every sample is a reference point (precision 1), and only A's half
    of the reference is reached by the samples' balls (recall 0.5)."""
    a, b = integer_points(20, 2), integer_points(20, 3, offset=40)
    assert pr(a, np.concatenate([a, b])) == (1.0, 0.5)


@pytest.mark.parametrize("block", [10_000, 7])
def test_precision_recall_match_brute_force(block):
    """Overlapping clouds where the answer is neither 0 nor 1; blocks smaller than the sets give the same."""
    s, r = integer_points(45, 4, high=9), integer_points(38, 5, high=9, offset=2)
    expected = reference_pr(s, r)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert pr(s, r, block=block) == pytest.approx(expected, abs=1e-12)


def test_float16_overflow_falls_back_to_float32():
    """Squared norms beyond float16's 65504 overflow; the block is recomputed in float32 and the answer stays right."""
    s, r = integer_points(25, 6) * 100 + 300, integer_points(25, 7) * 100 + 330
    expected = reference_pr(s, r)
    assert pr(s, r) == pytest.approx(expected, abs=1e-12)
    d = adm.squared_distances(torch.tensor(s[:3]).float(), torch.tensor(r[:4]).float())
    assert torch.isfinite(d).all()


def test_distances_are_rounded_as_float16():
    u = torch.tensor([[0.1, 0.2, 0.3]])
    v = torch.tensor([[0.3, 0.1, 0.7]])
    d = adm.squared_distances(u, v)
    assert d.item() == d.half().float().item()  # a float16 value
    assert d.item() == pytest.approx(((u - v) ** 2).sum().item(), rel=2e-2)


def test_distances_follow_float16_arithmetic():
    """Against torch's own float16 arithmetic, every step in half precision: the same values but for the summation
    order of a few (one float16 step apart); exact float32 distances rounded once would differ on most entries."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(200, 2048, generator=g) * 0.5, torch.rand(150, 2048, generator=g) * 0.5
    h, k = u.half(), v.half()
    expected = torch.clamp_min((h * h).sum(1)[:, None] - 2 * (h @ k.T) + (k * k).sum(1)[None], 0).float()
    d = adm.squared_distances(u, v)
    assert (d == expected).float().mean() > 0.999
    assert torch.allclose(d, expected, rtol=0, atol=0.25)  # a few float16 steps (0.0625 between 64 and 128)
    exact = ((u[:, None] - v[None]) ** 2).sum(-1).half().float()
    assert (d == exact).float().mean() < 0.5


def test_too_few_points_is_one_line():
    with pytest.raises(DiffitError, match="at least 4"):
        pr(integer_points(3, 0), integer_points(10, 1))


# ----------------------------------------------------------------------------------------------
# Protocol choice and the release's table


def images(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def adm_batch(tmp_path):
    """A stand-in for ADM's ImageNet-256 reference batch: its file name, mu/sigma, sFID statistics and images."""
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=images(24, 1), mu=np.zeros(128), sigma=np.eye(128), mu_s=np.zeros(4), sigma_s=np.eye(4))
    return path


def stand_in_features(arr):
    fe = E.make_extractor(EXT, ["features", "logits"], torch.device("cpu"), None)
    return E.extract_features(open_input(arr, "x", allow_stats=False), fe, "cpu", 64, None, "x")


def test_auto_uses_adm_for_an_adm_batch_and_its_numbers(adm_batch):
    samples = images(30, 2)
    r = M.compute_metrics(samples, adm_batch, metrics="is,pr", feature_extractor=EXT, device="cpu")
    assert r["protocol"] == "adm"
    f, ref = stand_in_features(samples), stand_in_features(images(24, 1))
    assert r["is_mean"] == pytest.approx(adm.inception_score(f["logits"])[0], rel=1e-12)
    expected = adm.precision_recall(f["features"], ref["features"])
    assert (r["precision"], r["recall"]) == (expected["precision"], expected["recall"])


def test_torch_fidelity_protocol_and_auto_for_plain_images(adm_batch):
    samples = images(30, 2)
    forced = M.compute_metrics(samples, adm_batch, metrics="is", feature_extractor=EXT, device="cpu",
                               protocol="torch-fidelity")  # fmt: skip
    assert forced["protocol"] == "torch-fidelity"
    adm_is = M.compute_metrics(samples, adm_batch, metrics="is", feature_extractor=EXT, device="cpu")["is_mean"]
    assert forced["is_mean"] != pytest.approx(adm_is, rel=1e-9)  # shuffled splits of 3 vs one in-order split
    plain = M.compute_metrics(samples, images(24, 1), metrics="pr", feature_extractor=EXT, device="cpu")
    assert plain["protocol"] == "torch-fidelity" and "published" not in plain
    asked = M.compute_metrics(samples, images(24, 1), metrics="pr", feature_extractor=EXT, device="cpu", protocol="adm")
    assert asked["protocol"] == "adm"
    with pytest.raises(DiffitError, match="--protocol 'tf'"):
        M.compute_metrics(samples, adm_batch, metrics="is", feature_extractor=EXT, device="cpu", protocol="tf")


def test_release_table_by_name_or_by_resolution_and_size(adm_batch, tmp_path, monkeypatch):
    assert adm.release_table(open_input(adm_batch, "r", allow_stats=True)).name == "ImageNet-256"
    monkeypatch.setattr(adm, "ADM_BATCH_IMAGES", 3)
    unnamed = tmp_path / "ref512.npz"
    np.savez(unnamed, arr_0=images(3, 0, size=512), mu=np.zeros(2), sigma=np.eye(2))
    assert adm.release_table(open_input(unnamed, "r", allow_stats=True)).name == "ImageNet-512"
    small = tmp_path / "ref16.npz"
    np.savez(small, arr_0=images(3, 0), mu=np.zeros(2), sigma=np.eye(2))
    assert adm.release_table(open_input(small, "r", allow_stats=True)) is None


def test_differences_only_where_comparable():
    table = adm.RELEASE_TABLES[0]
    measured = {"fid": 2.0, "is_mean": 270.0, "precision": 0.81}
    side = adm.published_beside(measured, table, comparable=True)["metrics"]
    assert side["fid"] == {"release": 1.73, "measured": 2.0, "difference": pytest.approx(0.27)}
    assert side["is_mean"]["difference"] == pytest.approx(-6.49)
    assert "recall" not in side
    assert adm.published_beside(measured, table, comparable=False)["metrics"]["fid"]["difference"] is None


@pytest.mark.e2e
def test_cli_prints_the_release_beside_the_measured_values(adm_batch, tmp_path):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=images(30, 2))
    out = tmp_path / "r.json"
    r = invoke("eval-fid", samples, "--ref", adm_batch, "--metrics", "fid,is,pr", "--feature-extractor", EXT,
               "--device", "cpu", "--json", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "Release (ImageNet-256)" in r.output and "276.49" in r.output and "0.6205" in r.output
    assert "protocol:  adm" in r.output
    result = json.loads(out.read_text())
    assert result["protocol"] == "adm"
    assert result["published"]["table"] == "ImageNet-256" and result["published"]["comparable"] is False
    assert result["published"]["metrics"]["is_mean"] == {
        "release": 276.49,
        "measured": result["is_mean"],
        "difference": None,
    }
    r = invoke("eval-fid", samples, "--ref", adm_batch, "--metrics", "is", "--feature-extractor", EXT,
               "--device", "cpu", "--protocol", "torch-fidelity")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "protocol:  torch-fidelity" in r.output
