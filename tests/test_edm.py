"""EDM preconditioning, σ distribution, loss weighting and the network call contract (EDM Table 1)."""

import math

import pytest
import torch

from diffit_cli.core.edm import EDM
from diffit_cli.core.schedules import karras_sigmas

# element-wise loops gain nothing from threads; avoid spin-waits on shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def zero_net(x_in, c_noise, y=None, **kwargs):
    return torch.zeros_like(x_in)


def test_preconditioning_closed_forms():
    edm = EDM()
    sd = 0.5
    tiny, sd_t = torch.tensor(1e-6, dtype=torch.float64), torch.tensor(sd, dtype=torch.float64)
    assert edm.c_skip(tiny).item() == pytest.approx(1.0, abs=1e-10)
    assert edm.c_out(tiny).item() == pytest.approx(0.0, abs=1e-5)
    assert edm.c_skip(sd_t).item() == pytest.approx(0.5, abs=1e-15)
    assert edm.c_out(sd_t).item() == pytest.approx(sd / math.sqrt(2), abs=1e-15)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(edm.c_in(sigma), 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(edm.c_noise(sigma), sigma.log() / 4)
    # λ(σ)·c_out(σ)² = 1: the effective training target of F has unit weight at every σ (EDM §5)
    torch.testing.assert_close(edm.loss_weight(sigma) * edm.c_out(sigma) ** 2, torch.ones_like(sigma))
    # c_in makes the network input unit-variance for N(0, σ_d²) data: Var(c_in·(x0 + σn)) = 1
    torch.testing.assert_close(edm.c_in(sigma) ** 2 * (sd**2 + sigma**2), torch.ones_like(sigma))


def test_zero_network_gives_c_skip_x():
    edm = EDM()
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    D = edm.denoise(zero_net, x, sigma)
    torch.testing.assert_close(D, edm.c_skip(sigma).reshape(-1, 1, 1, 1) * x)
    assert D.dtype == torch.float32


def test_network_call_contract():
    edm = EDM()
    seen = {}

    def net(x_in, c_noise, y, **kwargs):
        seen.update(x_in=x_in, c_noise=c_noise, y=y, kwargs=kwargs)
        return torch.zeros_like(x_in)

    x, sigma, y = torch.randn(2, 3, 4, 4).double(), torch.tensor([0.3, 7.0]), torch.tensor([4, 1])
    edm.denoise(net, x, sigma, y)
    assert seen["kwargs"] == {} and torch.equal(seen["y"], y)
    assert seen["c_noise"].shape == (2,) and seen["c_noise"].dtype == torch.float32
    torch.testing.assert_close(seen["c_noise"], sigma.log() / 4)
    torch.testing.assert_close(seen["x_in"], (x.float() / (sigma**2 + 0.25).sqrt().reshape(-1, 1, 1, 1)))
    aug = torch.randn(2, 9)
    edm.loss(net, torch.randn(2, 3, 4, 4), y, augment_labels=aug)
    assert torch.equal(seen["kwargs"]["augment_labels"], aug)
    D = edm.denoiser(net, y)  # the sampler view binds the labels
    D(x, sigma.double())
    assert torch.equal(seen["y"], y) and seen["kwargs"] == {}


def test_ideal_denoiser_loss_is_one():
    # For x0 ~ N(0, σ_d²) the exact denoiser is c_skip·x (the zero network), and its expected
    # weighted error is λ(σ)·σ²σ_d²/(σ² + σ_d²) = 1 for every σ.
    torch.manual_seed(0)
    edm = EDM()
    x0 = 0.5 * torch.randn(512, 3, 16, 16)
    loss = edm.loss(zero_net, x0)
    assert loss.shape == (512,)
    assert loss.mean().item() == pytest.approx(1.0, abs=0.02)  # s.e. ≈ √(2/(768·512)) ≈ 0.002
    # per-sample: a χ² mean over 768 elements, so every sample is near 1 too
    assert (loss - 1).abs().max().item() < 0.35


def test_sigma_distribution_is_log_normal():
    torch.manual_seed(1)
    log_sigma = EDM().sample_sigma(200_000, "cpu").log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_loss_replays_from_saved_rng_state():
    edm = EDM()
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    net = lambda x_in, c_noise, y=None: conv(x_in)  # noqa: E731
    x0 = torch.randn(4, 3, 8, 8)
    state = torch.get_rng_state()
    a = edm.loss(net, x0)
    torch.set_rng_state(state)
    b = edm.loss(net, x0)
    assert torch.equal(a, b)


def test_training_noise_matches_explicit_loss():
    edm = EDM()
    draws = edm.training_noise(4, (3, 8, 8), torch.Generator().manual_seed(3))
    assert draws["sigma"].shape == (4,) and draws["noise"].shape == (4, 3, 8, 8)
    x0 = 0.5 * torch.randn(4, 3, 8, 8)
    loss = edm.loss(zero_net, x0, sigma=draws["sigma"], noise=draws["noise"])
    s = draws["sigma"].reshape(-1, 1, 1, 1)
    expected = edm.loss_weight(s) * (edm.c_skip(s) * (x0 + s * draws["noise"]) - x0) ** 2
    torch.testing.assert_close(loss, expected.mean(dim=(1, 2, 3)))


def test_autocast_network_fp32_wrapper():
    edm = EDM()
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    seen = {}

    def net(x_in, c_noise, y=None):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        out = conv(x_in)
        seen["dtype"] = out.dtype
        return out

    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    D = edm.denoise(net, x, sigma, autocast_dtype=torch.bfloat16)
    assert seen == {"autocast": True, "dtype": torch.bfloat16}
    assert D.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F = conv(edm.c_in(sigma).reshape(-1, 1, 1, 1) * x).float()
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(D, edm.c_skip(s) * x + edm.c_out(s) * F)  # the skip path stays float32
    assert torch.is_autocast_enabled("cpu") is False


def test_karras_sigmas():
    sig = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(sig) == 19 and sig[-1] == 0.0
    assert sig[0] == pytest.approx(80.0, rel=1e-12) and sig[-2] == pytest.approx(0.002, rel=1e-12)
    assert all(a > b for a, b in zip(sig, sig[1:]))
    i = 5  # EDM eq. 5
    assert sig[i] == pytest.approx((80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rel=1e-12)
    assert karras_sigmas(1, 0.002, 80.0) == [80.0, 0.0]
    with pytest.raises(ValueError):
        karras_sigmas(0, 0.002, 80.0)


def test_a_network_of_another_output_shape_is_refused_not_broadcast():
    """c_skip·x + c_out·F(x) broadcasts a 3-channel F against a 1-channel x: the loss would train the wrong thing."""
    edm = EDM()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"maps \(2, 1, 8, 8\) to \(2, 3, 8, 8\)"):
        edm.loss(lambda x, t, y: x.expand(-1, 3, -1, -1), x)
