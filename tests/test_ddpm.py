"""ADM Gaussian diffusion: schedules, posterior, learned-range variance, respacing, hybrid loss, σ view."""

import math

import pytest
import torch

from diffit_cli.core.ddpm import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    cosine_betas,
    linear_betas,
)
from diffit_cli.core.schedules import space_timesteps

# element-wise loops gain nothing from threads; avoid spin-waits on shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


D = GaussianDiffusion()


def test_beta_schedules():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and len(b) == 1000
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b250 = linear_betas(250)  # ADM scales by 1000/T
    assert b250[0].item() == pytest.approx(4e-4) and b250[-1].item() == pytest.approx(0.08)
    c = cosine_betas(1000)  # iDDPM eq. 17: ᾱ_t = f(t + 1)/f(0) until β hits 0.999
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ac = torch.cumprod(1 - c, 0)
    for t in (0, 10, 500, 900):
        assert ac[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert c.max().item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="linear"):
        GaussianDiffusion(schedule="quadratic")


def test_q_sample_and_posterior_closed_form():
    x0, xt = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    t = torch.tensor([1, 7, 100, 500, 999])
    b = D.betas
    ac = torch.cumprod(1 - b, 0)
    for i, ti in enumerate(t.tolist()):
        a_prev, alpha = ac[ti - 1], 1 - b[ti]
        # Gaussian conditioning: q(x_{t−1}|x0) = N(√ᾱ_{t−1}x0, 1 − ᾱ_{t−1}),
        # q(x_t|x_{t−1}) = N(√α_t x_{t−1}, β_t)
        precision = 1 / (1 - a_prev) + alpha / b[ti]
        var = 1 / precision
        mean = var * (a_prev.sqrt() * x0[i].double() / (1 - a_prev) + alpha.sqrt() * xt[i].double() / b[ti])
        m, v, lv = D.q_posterior_mean_variance(x0[i : i + 1], xt[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(m[0].double(), mean, rtol=1e-5, atol=1e-5)
        assert v.flatten()[0].item() == pytest.approx(var.item(), rel=1e-6)
        assert lv.flatten()[0].item() == pytest.approx(math.log(var.item()), rel=1e-6)
    noise = torch.randn_like(x0)
    a = ac[t].reshape(-1, 1, 1, 1).float()
    torch.testing.assert_close(D.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    # the t = 0 posterior variance is 0; its log is clipped to β̃_1 (ADM)
    assert D.posterior_variance[0].item() == 0.0
    assert D.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(D.posterior_variance[1].item()))


def test_learned_range_variance():
    t = torch.tensor([0, 1, 250, 999])
    shape = (4, 1, 2, 2)
    log_beta = D.betas[t].log().reshape(-1, 1, 1, 1).float()
    log_post = D.posterior_log_variance_clipped[t].reshape(-1, 1, 1, 1).float()
    ones = torch.ones(shape)
    torch.testing.assert_close(D.learned_range_log_variance(ones, t), log_beta.expand(shape))
    torch.testing.assert_close(D.learned_range_log_variance(-ones, t), log_post.expand(shape))
    v = torch.rand(shape) * 2 - 1
    frac = (v + 1) / 2
    torch.testing.assert_close(D.learned_range_log_variance(v, t), frac * log_beta + (1 - frac) * log_post)
    # p_mean_variance uses it and the ε → x0 → posterior-mean chain (ADM)
    x_t, eps = torch.randn(shape), torch.randn(shape)
    out = D.p_mean_variance(torch.cat([eps, v], 1), x_t, t)
    ac = D.alphas_cumprod[t].reshape(-1, 1, 1, 1).float()
    x0 = (x_t - (1 - ac).sqrt() * eps) / ac.sqrt()
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["mean"], D.q_posterior_mean_variance(x0, x_t, t)[0], rtol=1e-4, atol=1e-4)


def test_space_timesteps_as_adm():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and 0 in kept and 999 in kept
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    sections = space_timesteps(300, [10, 15, 20])  # ADM docstring example
    assert len([t for t in sections if t < 100]) == 10
    assert len([t for t in sections if 100 <= t < 200]) == 15 and len([t for t in sections if t >= 200]) == 20
    assert space_timesteps(1000, "1000") == set(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respacing_keeps_alphas_cumprod_exactly():
    spaced = D.respace("250")
    kept = torch.tensor(sorted(space_timesteps(1000, "250")))
    assert spaced.num_timesteps == 250 and torch.equal(spaced.timestep_map, kept)
    assert torch.equal(spaced.alphas_cumprod, D.alphas_cumprod[kept])  # bit for bit
    torch.testing.assert_close(torch.cumprod(1 - spaced.betas, 0), D.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert spaced.betas[0].item() == pytest.approx(1 - D.alphas_cumprod[0].item())
    # the network sees the original index
    assert spaced.network_time(torch.tensor([0, 1, 249])).tolist() == [0, kept[1].item(), 999]
    # nested respacing composes
    nested = spaced.respace("10")
    assert torch.equal(nested.alphas_cumprod, D.alphas_cumprod[nested.timestep_map])


def discretized_nll_reference(x, mean, log_var):
    """−log P(bin of x) with the exact normal CDF; edge bins extend to ±∞ (DDPM eq. 13)."""
    std = (0.5 * log_var).exp()
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    upper = torch.where(x > 0.999, torch.ones_like(x), cdf((x + 1 / 255 - mean) / std))
    lower = torch.where(x < -0.999, torch.zeros_like(x), cdf((x - 1 / 255 - mean) / std))
    return -(upper - lower).log()


def test_vlb_at_t0_is_the_discretized_gaussian_nll():
    torch.manual_seed(0)
    x0 = (torch.randint(0, 256, (3, 2, 4, 4)) / 127.5 - 1).float()  # 8-bit levels incl. ±1
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0
    x_t = torch.randn_like(x0) * 0.01 + x0
    out = torch.cat([torch.randn_like(x0) * 0.1, torch.rand_like(x0) * 2 - 1], 1)
    t0 = torch.zeros(3, dtype=torch.long)
    vb = D.vb_terms_bpd(out, x0, x_t, t0)
    pm = D.p_mean_variance(out, x_t, t0)
    ref = discretized_nll_reference(x0.double(), pm["mean"].double(), pm["log_variance"].double())
    ref_bpd = ref.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb.double(), ref_bpd, rtol=2e-3, atol=1e-4)  # ADM's tanh CDF ≈ erf CDF
    z = torch.linspace(-4, 4, 101)
    exact_cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    torch.testing.assert_close(approx_standard_normal_cdf(z), exact_cdf, atol=3e-4, rtol=0)
    # for t > 0 it is the Gaussian KL in bits
    t = torch.tensor([5, 300, 999])
    vb = D.vb_terms_bpd(out, x0, x_t, t)
    m1, _, lv1 = D.q_posterior_mean_variance(x0, x_t, t)
    pm = D.p_mean_variance(out, x_t, t)
    m2, lv2 = pm["mean"], pm["log_variance"]
    kl = 0.5 * (lv2 - lv1 + (lv1.exp() + (m1 - m2) ** 2) / lv2.exp() - 1)
    torch.testing.assert_close(vb, kl.mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-5, atol=1e-6)


def test_hybrid_loss_finite_and_vlb_stops_the_mean_gradient():
    x0 = torch.randn(4, 3, 4, 4).clamp(-1, 1)
    leaf = torch.randn(4, 6, 4, 4, requires_grad=True)
    seen = {}

    def net(x_t, t, y):
        seen.update(t=t, y=y)
        return leaf * 1.0

    terms = D.loss_terms(net, x0, torch.tensor([1, 2, 3, 4]))
    assert set(terms) == {"mse", "vb", "loss"}
    assert all(v.shape == (4,) and torch.isfinite(v).all() for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert seen["t"].dtype == torch.int64 and seen["t"].shape == (4,)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), leaf, retain_graph=True)
    assert torch.count_nonzero(g_vb[:, :3]) == 0 and torch.count_nonzero(g_vb[:, 3:]) > 0
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), leaf)
    assert torch.count_nonzero(g_mse[:, 3:]) == 0 and torch.count_nonzero(g_mse[:, :3]) > 0


def test_loss_draws_t_then_noise_from_the_global_rng():
    x0 = torch.randn(3, 2, 4, 4)
    net = lambda x_t, t, y: torch.cat([x_t, torch.zeros_like(x_t)], 1)  # noqa: E731
    torch.manual_seed(5)
    a = D.loss(net, x0)
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (3,))
    noise = torch.randn_like(x0)
    torch.testing.assert_close(a, D.loss(net, x0, t=t, noise=noise))
    draws = D.training_noise(3, (2, 4, 4), torch.Generator().manual_seed(0))
    assert draws["t"].dtype == torch.int64 and draws["noise"].shape == (3, 2, 4, 4)
    assert torch.isfinite(D.loss(net, x0, **draws)).all()


def test_fixed_large_variance_without_learn_sigma():
    d = GaussianDiffusion(learn_sigma=False)
    t = torch.tensor([0, 10])
    out = d.p_mean_variance(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), t)
    lv = out["log_variance"][:, 0, 0, 0].double()
    torch.testing.assert_close(lv, torch.stack([d.posterior_variance[1].log(), d.betas[10].log()]), rtol=1e-6, atol=0)
    terms = d.loss_terms(lambda x, t, y: x, torch.randn(2, 1, 2, 2))
    assert set(terms) == {"mse", "loss"}


def test_sigma_view_and_adapter():
    sig = torch.tensor([0.0005, D.sigma_min, 0.3, 1.0, 40.0, D.sigma_max, 1e4], dtype=torch.float64)
    t = D.sigma_to_t(sig)
    assert t[0].item() == 0 and t[-1].item() == 999
    torch.testing.assert_close(D.t_to_sigma(t[1:-1]), sig[1:-1])
    ints = torch.tensor([0, 17, 999])
    torch.testing.assert_close(D.sigma_to_t(D.sigmas[ints]), ints.double())
    torch.testing.assert_close(D.sigma_from_network_time(ints), D.sigmas[ints])
    # with the exact ε of N(μ, s²) data the adapter is the exact σ-space denoiser at the table's σ
    mu, s = 0.5, 1.0

    def eps_net(x_t, t, y):
        ab = 1 / (1 + D.sigma_from_network_time(t).reshape(-1, 1, 1, 1) ** 2)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1).float()

    sigma = D.sigmas[torch.tensor([3, 200, 800])]
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * (1 + sigma.reshape(-1, 1, 1, 1))
    got = D.denoiser(eps_net)(x, sigma)
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(got, mu + s**2 / (s**2 + s2) * (x - mu), rtol=1e-4, atol=1e-4)
