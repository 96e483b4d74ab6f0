"""Autoguidance against CFG and no guidance on the 2-D toy of `benchmarks/autoguidance_toy.py`, built like the one of
Karras et al. 2024 ("Guiding a Diffusion Model with a Bad Version of Itself", Sec. 3): two classes of thin Gaussian
branches, MLP denoisers trained against the exact denoiser target, the guide an early EMA snapshot of the main
network's own run. That module's docstring has the setup, the four measures (MMD at the branches' scale, energy
distance, NLL under the true mixture, reverse KL divergence) and their values over seeds 0–4; this test checks seed 0
at w = 1.5 against about half the smallest margin of those seeds. What it does not assert, because it does not hold
there: that the autoguided samples are closer to the truth than the unguided ones by the MMD or the energy distance
(they are by the reverse KL)."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import autoguidance_toy as toy  # noqa: E402

MARGIN_MMD, MARGIN_ENERGY, MARGIN_NLL_UNGUIDED, MARGIN_NLL_CFG = 0.85e-3, 0.014, 0.25, 0.45
MARGIN_KL_UNGUIDED, MARGIN_KL_CFG = 0.07, 0.28


def test_kozachenko_leonenko_entropy_matches_a_gaussians_closed_form_and_true_draws_score_no_divergence():
    """The entropy estimate of 2000 draws of N(0, Σ) is within 0.1 nats of ½ ln((2πe)² det Σ) (its spread over
    seeds is about 0.03; the unit square's volume in place of the disc's is off by ln(4/π) ≈ 0.24, a wrong
    dimension factor by more), and the reverse KL of fresh true draws of the toy is about 0."""
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[0.04, 0.015], [0.015, 0.01]])
    x = torch.randn(2000, 2, generator=g) @ torch.linalg.cholesky(cov).T
    assert abs(toy.knn_entropy(x) - (1 + math.log(2 * math.pi) + 0.5 * torch.logdet(cov).item())) < 0.1
    truth = toy._draw(0, 2000, g)
    assert abs(toy.nll_and_reverse_kl(truth, toy.log_p(truth, 0))[1]) < 0.05


def test_autoguided_samples_are_closer_to_the_truth_than_cfg_ones_and_by_the_reverse_kl_than_unguided_ones(one_thread):
    """At the same scale w = 1.5, autoguidance by an early snapshot of the same training is closer to the true
    mixture than CFG by all four measures, and closer than no guidance by the reverse KL, with its samples on the
    branches (NLL) more than no guidance."""
    m = toy.measure(seed=0, scale=1.5)
    mmd, energy, nll, kl = ({k: v[i] for k, v in m.items()} for i in range(4))
    assert mmd["auto"] < mmd["cfg"] - MARGIN_MMD, m
    assert energy["auto"] < energy["cfg"] - MARGIN_ENERGY, m
    assert nll["auto"] < nll["cfg"] - MARGIN_NLL_CFG, m
    assert kl["auto"] < kl["cfg"] - MARGIN_KL_CFG, m
    assert nll["auto"] < nll["unguided"] - MARGIN_NLL_UNGUIDED, m
    assert kl["auto"] < kl["unguided"] - MARGIN_KL_UNGUIDED, m


def test_release_toy_networks_reach_the_samplers_as_denoisers_of_their_log_density():
    """`autoguidance_toy_release.Raw` turns a log-density network into EDM's raw-network call: through EDM's
    preconditioning it denoises as D(x; σ) = x + σ²·∇log p(x; σ) (Tweedie), CFG's null rows by the unconditional
    network, and the release's fractal has its 1016 components per class (a depth-7 binary tree, 8 per branch)."""
    import autoguidance_toy_release as release

    torch.manual_seed(0)
    net = release.LogDensity(width=16).eval()
    with torch.no_grad():
        net.gain.fill_(0.7)  # a log-density that is not the Gaussian of gain 0
    x, sigma = torch.randn(5, 2), torch.tensor([0.01, 0.1, 0.5, 1.0, 4.0])
    denoised = release.EDM_TOY.denoise(release.Raw(net), x, sigma)
    torch.testing.assert_close(denoised, x + sigma[:, None] ** 2 * net.score(x, sigma), rtol=1e-4, atol=1e-5)
    # under CFG the null label (1) rows come from the unconditional network, the others from the conditional one
    unconditional, y = release.LogDensity(width=8).eval(), torch.tensor([0, 1, 1, 0, 1])
    both = release.EDM_TOY.denoise(release.Raw(net, unconditional), x, sigma, y)
    alone = release.EDM_TOY.denoise(release.Raw(unconditional), x, sigma)
    torch.testing.assert_close(both, torch.where((y == 1)[:, None], alone, denoised))
    assert [len(phi) for phi, _, _ in release.MIXTURES.values()] == [1016, 2032]
