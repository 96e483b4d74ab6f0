"""Classifier-free guidance (scale 1, three-channel CFG, schedules, interval, through the samplers) and autoguidance."""

import math

import pytest
import torch

from diffit_cli.core.ddpm import GaussianDiffusion
from diffit_cli.core.edm import EDM
from diffit_cli.core.guidance import Guidance, guided_network, in_interval, power_cosine_scale
from diffit_cli.core.samplers import nfe, sample

NULL = 1000


class LabelNet:
    """(B, k·C, H, W) output that depends on the label, the input and the time; records every call."""

    def __init__(self, k=2, tame=False):
        self.calls, self.k, self.tame = [], k, tame

    def __call__(self, x, t, y, **kwargs):
        self.calls.append((x.shape[0], None if y is None else y.clone(), kwargs))
        lab = torch.ones(x.shape[0], 1, 1, 1) if y is None else (y.float() + 1).reshape(-1, 1, 1, 1)
        ch = torch.arange(self.k * x.shape[1], dtype=torch.float32).reshape(1, -1, 1, 1)
        out = torch.cat([x] * self.k, 1) * lab + ch * lab.sqrt() + t.float().reshape(-1, 1, 1, 1) * 1e-3
        return torch.tanh(out) if self.tame else out


def split(net, x, t, y):
    B = x.shape[0]
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
    return both[:B], both[B:]


def test_scale_one_is_the_conditional_model():
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    for g in (None, Guidance(scale=1.0), Guidance(scale=1.0, schedule="power-cosine")):
        net = LabelNet()
        out = guided_network(net, y, g, GaussianDiffusion())(x, t)
        assert torch.equal(out, net(x, t, y))
        assert net.calls[0][0] == 3  # one forward of the un-doubled batch


def test_three_channel_cfg():
    x, t, y = torch.randn(2, 4, 2, 2), torch.tensor([10, 700]), torch.tensor([5, 9])
    net = LabelNet()
    w = 4.4
    out = guided_network(net, y, Guidance(scale=w, channels=3), GaussianDiffusion())(x, t)
    assert len(net.calls) == 1 and net.calls[0][0] == 4  # one forward of the doubled batch
    assert torch.equal(net.calls[0][1], torch.tensor([5, 9, NULL, NULL]))
    cond, uncond = split(LabelNet(), x, t, y)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + w * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3], cond[:, 3])  # the 4th ε channel: conditional, unguided
    assert torch.equal(out[:, 4:], cond[:, 4:])  # learned-variance channels: conditional
    assert not torch.equal(out[:, :3], cond[:, :3])


@pytest.mark.parametrize("channels", [None, "all"])
def test_all_channel_cfg(channels):
    x, t, y = torch.randn(2, 4, 2, 2), torch.tensor([10, 700]), torch.tensor([5, 9])
    g = Guidance(scale=2.0, channels=channels)
    assert g.channels is None
    out = guided_network(LabelNet(), y, g, GaussianDiffusion())(x, t)
    cond, uncond = split(LabelNet(), x, t, y)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 2.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(out[:, 4:], cond[:, 4:])


def test_power_cosine_values():
    w = 4.4
    t = torch.tensor([1000, 999, 500, 300, 200, 100, 0])
    s = power_cosine_scale(w, t, 1000, 4.0)
    assert s[0].item() == pytest.approx(1.0, abs=1e-6) and s[-1].item() == pytest.approx(w, abs=1e-6)
    assert s[1].item() == pytest.approx(1.0, abs=1e-6)
    for got, want in zip(s[2:6].tolist(), [1.03, 1.46, 2.22, 3.50]):  # docs/paper.md, 'Guidance'
        assert got == pytest.approx(want, abs=0.006)
    assert all(a <= b for a, b in zip(s.tolist(), s[1:].tolist()))  # grows as t → 0
    # applied per row through the network wrapper (t is the original index the network sees)
    x, y = torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 2])
    tt = torch.tensor([999, 300, 0])
    out = guided_network(LabelNet(), y, Guidance(scale=w, schedule="power-cosine"), GaussianDiffusion())(x, tt)
    cond, uncond = split(LabelNet(), x, tt, y)
    scale = power_cosine_scale(w, tt).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]))


def test_power_cosine_needs_a_ddpm_index():
    with pytest.raises(ValueError, match="constant' or 'interval"):
        guided_network(LabelNet(), torch.tensor([1]), Guidance(scale=2.0, schedule="power-cosine"), EDM())


def test_interval_guides_only_inside():
    edm = EDM()
    sigma = torch.tensor([0.1, 0.27, 0.29, 2.0, 5.4, 6.0])  # σ recovered from c_noise in float32: stay off the edges
    c_noise = edm.c_noise(sigma)
    x, y = torch.randn(6, 3, 2, 2), torch.arange(6)
    w = 3.0
    g = Guidance(scale=w, schedule="interval", channels=None, interval=(0.28, 5.42))
    out = guided_network(LabelNet(k=1), y, g, edm)(x, c_noise)
    cond, uncond = split(LabelNet(k=1), x, c_noise, y)
    guided = uncond[:, :3] + w * (cond[:, :3] - uncond[:, :3])
    inside = [False, False, True, True, True, False]  # σ ∈ (σ_lo, σ_hi]
    for i, ins in enumerate(inside):
        if ins:
            torch.testing.assert_close(out[i, :3], guided[i])
        else:
            assert torch.equal(out[i], cond[i])
    # DDPM: σ_t = √((1 − ᾱ_t)/ᾱ_t) of the original index
    d = GaussianDiffusion()
    t = torch.tensor([0, 300, 999])  # σ ≈ 0.01, ≈ 0.73, ≈ 157
    out = guided_network(LabelNet(), y[:3], Guidance(scale=w, schedule="interval", interval=(0.28, 5.42)), d)(x[:3], t)
    cond, uncond = split(LabelNet(), x[:3], t, y[:3])
    assert torch.equal(out[[0, 2]], cond[[0, 2]])
    torch.testing.assert_close(out[1, :3], uncond[1, :3] + w * (cond[1, :3] - uncond[1, :3]))


@pytest.mark.parametrize("sampler,steps", [("heun", 6), ("ddpm", 8)])
def test_interval_guidance_skips_the_unconditional_half_outside(sampler, steps):
    d = EDM() if sampler == "heun" else GaussianDiffusion()
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = torch.stack([torch.randn(4, 2, 2, generator=g) for g in gens])
    y, g = torch.tensor([3, 4]), Guidance(scale=3.0, schedule="interval", channels=None, interval=(0.28, 5.42))
    k = 1 if sampler == "heun" else 2  # EDM predicts C channels; the DDPM network also its variance channels
    net = LabelNet(k=k, tame=True)
    x = sample(d, net, noise, y=y, sampler=sampler, steps=steps, generators=gens, guidance=g)
    batches = [b for b, _, _ in net.calls]
    assert set(batches) == {2, 4} and len(batches) == nfe(sampler, steps)  # N outside the interval, 2N inside

    class AlwaysDoubled:  # the reference: every call doubled, the conditional half taken outside the interval
        def __init__(self):
            self.net = LabelNet(k=k, tame=True)

        def __call__(self, x, t, y, **kwargs):
            both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
            active = in_interval(d.sigma_from_network_time(t), g.interval).reshape(-1, 1, 1, 1)
            cond, uncond = both.chunk(2)
            C = x.shape[1]
            guided = torch.cat([uncond[:, :C] + 3.0 * (cond[:, :C] - uncond[:, :C]), cond[:, C:]], 1)
            return torch.where(active, guided, cond)

    gens = [torch.Generator().manual_seed(i) for i in range(2)]  # the same ancestral noise again
    assert torch.equal(torch.stack([torch.randn(4, 2, 2, generator=g) for g in gens]), noise)
    ref = sample(
        d, AlwaysDoubled(), noise, y=y, sampler=sampler, steps=steps, generators=gens, guidance=Guidance(scale=1.0)
    )  # the reference does its own guidance
    torch.testing.assert_close(x, ref)


def test_validation():
    with pytest.raises(ValueError, match="constant, power-cosine, interval"):
        Guidance(schedule="linear")
    with pytest.raises(ValueError):
        Guidance(channels=0)
    with pytest.raises(ValueError):
        Guidance(interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="needs class labels"):
        guided_network(LabelNet(), None, Guidance(scale=2.0), EDM())
    net = guided_network(LabelNet(), torch.tensor([1]), Guidance(scale=2.0), EDM())
    with pytest.raises(ValueError, match="bound"):
        net(torch.randn(1, 3, 2, 2), torch.zeros(1), torch.tensor([1]))


@pytest.mark.parametrize("sampler,steps", [("ddpm", 5), ("heun", 3), ("dpmpp-2m", 4)])
def test_guided_sampling_one_doubled_forward_per_evaluation(sampler, steps):
    d = GaussianDiffusion()
    net = LabelNet(tame=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = torch.stack([torch.randn(4, 2, 2, generator=g) for g in gens])
    y = torch.tensor([3, 4])
    x = sample(
        d,
        net,
        noise,
        y=y,
        sampler=sampler,
        steps=steps,
        generators=gens,
        guidance=Guidance(scale=4.4, schedule="power-cosine"),
    )
    assert x.shape == noise.shape and torch.isfinite(x).all()
    assert len(net.calls) == nfe(sampler, steps)
    assert all(b == 4 and torch.equal(labels, torch.tensor([3, 4, NULL, NULL])) for b, labels, _ in net.calls)
    # scale 1 through the same entry point: un-doubled
    net1 = LabelNet(tame=True)
    sample(d, net1, noise, y=y, sampler=sampler, steps=steps, generators=gens, guidance=Guidance(scale=1.0))
    assert all(b == 2 for b, _, _ in net1.calls)


def test_edm_guidance_is_guidance_of_the_denoiser():
    # D = c_skip·x + c_out·F is affine in F with the same x for both halves, so guiding F guides D.
    edm = EDM()
    x, y, sigma = torch.randn(2, 3, 2, 2), torch.tensor([1, 2]), torch.tensor([0.7, 3.0])
    guided = edm.denoise(guided_network(LabelNet(k=1), y, Guidance(scale=2.5, channels=None), edm), x, sigma)
    Dc = edm.denoise(LabelNet(k=1), x, sigma, y)
    Du = edm.denoise(LabelNet(k=1), x, sigma, torch.full_like(y, NULL))
    torch.testing.assert_close(guided, Du + 2.5 * (Dc - Du), rtol=1e-5, atol=1e-5)
    assert math.isclose(Guidance().interval[0], 0.28) and Guidance().null_class == 1000


# ------------------------------------------------------------------------------ autoguidance (Karras et al. 2024)
class WeakNet(LabelNet):
    """Another network of the same inputs and outputs: a damped LabelNet (the 'bad version' of autoguidance)."""

    def __call__(self, x, t, y, **kwargs):
        return 0.5 * super().__call__(x, t, y, **kwargs) - 0.25


@pytest.mark.parametrize("sampler,steps", [("heun", 3), ("ddpm", 4)])
@pytest.mark.parametrize("y", [torch.tensor([3, 4]), None])
def test_autoguidance_with_the_guide_equal_to_the_main_network_is_the_unguided_network(sampler, steps, y):
    # D_g + w·(D − D_g) with D_g = D is D exactly: the same input, the same output, bit for bit
    d = EDM() if sampler == "heun" else GaussianDiffusion()
    k = 1 if sampler == "heun" else 2
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    outs = []
    for guidance, guide in ((None, None), (Guidance(scale=3.0, mode="auto"), LabelNet(k=k, tame=True))):
        net = LabelNet(k=k, tame=True)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        outs.append(
            sample(d, net, noise, y=y, sampler=sampler, steps=steps, generators=gens, guidance=guidance, guide=guide)
        )
        if guide is not None:
            assert len(guide.calls) == len(net.calls) == nfe(sampler, steps)  # B rows each, one forward each
            assert all(b == 2 for b, _, _ in net.calls + guide.calls)
    assert torch.equal(outs[0], outs[1])


def test_autoguidance_scale_one_is_the_main_network_and_never_calls_the_guide():
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    net, guide = LabelNet(), WeakNet()
    out = guided_network(net, y, Guidance(scale=1.0, mode="auto"), GaussianDiffusion(), guide)(x, t)
    assert torch.equal(out, LabelNet()(x, t, y)) and not guide.calls and len(net.calls) == 1


def test_autoguidance_guides_every_epsilon_channel_and_takes_the_variance_from_the_main_network():
    # the latent DDPM network: (B, 2C) = ε and learned-range variance; `channels` is CFG's and is not used
    x, t, y, w = torch.randn(2, 4, 2, 2), torch.tensor([10, 700]), torch.tensor([5, 9]), 2.5
    net, guide = LabelNet(), WeakNet()
    out = guided_network(net, y, Guidance(scale=w, mode="auto", channels=3), GaussianDiffusion(), guide)(x, t)
    main, weak = LabelNet()(x, t, y), WeakNet()(x, t, y)
    assert torch.equal(guide.calls[0][1], y) and torch.equal(net.calls[0][1], y)  # the same labels, no null class
    torch.testing.assert_close(out[:, :4], weak[:, :4] + w * (main[:, :4] - weak[:, :4]))
    assert torch.equal(out[:, 4:], main[:, 4:])
    assert not torch.equal(out[:, 3], main[:, 3])  # the 4th ε channel is guided too


def test_autoguidance_interval_runs_only_the_main_network_outside_it():
    edm, w = EDM(), 2.0
    sigma = torch.tensor([0.1, 1.0])
    c_noise = edm.c_noise(sigma)
    x, y = torch.randn(2, 3, 2, 2), torch.tensor([1, 2])
    g = Guidance(scale=w, mode="auto", schedule="interval", interval=(0.28, 5.42))
    for rows, guided_rows in (([0], 0), ([1], 1), ([0, 1], 1)):
        net, guide = LabelNet(k=1), WeakNet(k=1)
        out = guided_network(net, y[rows], g, edm, guide)(x[rows], c_noise[rows])
        main = LabelNet(k=1)(x[rows], c_noise[rows], y[rows])
        if guided_rows == 0:  # σ = 0.1 is below the interval: the main network alone, the guide never called
            assert torch.equal(out, main) and not guide.calls
            continue
        weak = WeakNet(k=1)(x[rows], c_noise[rows], y[rows])
        torch.testing.assert_close(out[-1], weak[-1] + w * (main[-1] - weak[-1]))
        if len(rows) == 2:
            assert torch.equal(out[0], main[0])  # the row outside the interval: the main network's


def test_autoguidance_needs_a_guide():
    with pytest.raises(ValueError, match="guiding network"):
        guided_network(LabelNet(), torch.tensor([1]), Guidance(scale=2.0, mode="auto"), EDM())
    with pytest.raises(ValueError, match="cfg, auto"):
        Guidance(mode="weak")
    guided_network(LabelNet(), None, Guidance(scale=2.0, mode="auto"), EDM(), WeakNet())  # unconditional: fine
