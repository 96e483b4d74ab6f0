"""Autoguidance against CFG and no guidance on a 2-D toy built like the one of Karras et al. 2024 ("Guiding a
Diffusion Model with a Bad Version of Itself", Sec. 3): two classes, each a tree of thin branches made of
elongated Gaussians, with almost no density between the branches.

    python benchmarks/autoguidance_toy.py --seeds 0-4 --scales 1.5,2,1.25 --figure docs/autoguidance-toy.png

prints the distances below for every seed and scale (about 35 s of training per seed on one CPU thread, then 5 s per
scale) and draws the first seed's samples; `tests/test_autoguidance_toy.py` asserts on seed 0 what holds on every
seed.

Setup (fixed seeds, deterministic on the CPU):

* data: per class a binary tree of depth 5 grown from the origin (class 0 towards 45°, class 1 towards 225°, so the
  two trunks meet there); each branch is 4 Gaussians along it (std along: a fifth of its length; across: 0.025·0.8^d
  at depth d), weighted by length·0.6^d; lengths 0.45·0.75^d and child angles ±0.55·0.8^d, jittered by a fixed
  generator; 124 components per class;
* training: the EDM loss (σ_data 0.5, ln σ ~ N(−1.2, 1.2²)) against the *exact* denoiser target E[x0 | x; σ] of
  the mixture (the paper's toy also trains against the exact score), so a network's errors are its capacity and
  training length only; 20 % of the labels go to the null class, whose target is the posterior mean over both
  classes; Adam, batch 512, lr 4·10⁻³ decayed as 1/√(t/500) after step 500 (EDM2's schedule), EMA 0.99;
* networks: an MLP of width 64 and 3 hidden layers with Fourier features of c_noise and a class embedding; the
  *main* network is the EMA after 2000 steps, the *guide* the EMA of the same run after 500 steps (the same errors,
  larger: the paper's premise);
* sampling: `core.samplers.sample`, Heun, 32 steps, 2000 samples per class, one generator per sample.

Distances to 2000 fresh draws of the true class mixture, averaged over the classes (two sets of true draws: MMD
0.89·10⁻³, energy 0.27·10⁻³ apart; these are biased V-statistics, so that floor is what an exact sampler scores):

* **MMD** with a Gaussian kernel of bandwidth 0.03 (the branches' scale): E k(x,x') + E k(y,y') − 2 E k(x,y);
* **energy distance**: 2 E|x−y| − E|x−x'| − E|y−y'| (weighs where the mass lies at the scale of the whole tree);
* **NLL**: the mean −log p(x) of the samples under the true class mixture (one-sided: how far onto the branches
  they fall; true draws score −1.18);
* **reverse KL** KL(q ‖ p) = E_q[−log p] − H(q) of the samples' distribution q from the true mixture p: the NLL
  above less q's entropy, estimated from the samples by Kozachenko–Leonenko with 5 neighbours (other true draws
  score 0.008; with 3 or 10 neighbours the values below move by ≤ 0.03 at w ≤ 2, ≤ 0.1 at w = 3, and no order
  between the methods changes). A divergence, 0 only when q = p, not symmetric: it charges mass put where the data
  is not by the log-density there, and concentration past the data through the entropy lost, so over-sharpening
  costs as spreading does; dropping a branch of mass m costs only −ln(1 − m) (it is mode-seeking), which is why
  the two coverage distances above stay next to it. It measures the samples' quality in the paper's sense (few
  samples off the data, no over-concentration) and was added after the first two had shown autoguidance no closer
  than no guidance.

Measured, seeds 0–4 of the training (MMD ×10³ / energy ×10³ / NLL / reverse KL):

    w = 1.5  unguided                     CFG                          autoguidance
    0        2.13 / 0.34 / +0.77 / 1.51   4.65 / 31.0 / +1.12 / 1.87   2.63 / 0.49 / +0.12 / 1.21
    1        2.08 / 0.34 / +0.68 / 1.46   4.52 / 29.8 / +1.14 / 1.89   2.71 / 0.46 / +0.11 / 1.22
    2        2.07 / 0.36 / +0.72 / 1.49   4.54 / 30.5 / +1.20 / 1.96   2.63 / 0.50 / +0.20 / 1.29
    3        2.05 / 0.33 / +0.63 / 1.40   4.45 / 30.6 / +1.02 / 1.79   2.74 / 0.54 / +0.13 / 1.23
    4        1.97 / 0.32 / +0.49 / 1.30   4.60 / 30.4 / +0.90 / 1.73   2.90 / 0.43 / −0.05 / 1.15

    w = 2    unguided                     CFG                          autoguidance
    0        2.13 / 0.34 / +0.77 / 1.51   8.50 / 85.4 / +1.70 / 2.49   4.06 / 0.81 / −0.18 / 1.28
    1        2.08 / 0.34 / +0.68 / 1.46   8.37 / 83.6 / +1.79 / 2.56   4.36 / 0.84 / −0.10 / 1.36
    2        2.07 / 0.36 / +0.72 / 1.49   8.30 / 84.7 / +1.73 / 2.51   4.10 / 0.95 / −0.04 / 1.38
    3        2.05 / 0.33 / +0.63 / 1.40   8.48 / 85.0 / +1.48 / 2.30   4.35 / 1.00 / −0.14 / 1.31
    4        1.97 / 0.32 / +0.49 / 1.30   8.61 / 84.4 / +1.35 / 2.23   4.88 / 0.78 / −0.29 / 1.29

At w = 1.25: CFG 2.81–2.93 / 9.1–9.7 / 1.49–1.69 (KL), autoguidance 2.21–2.27 / 0.34–0.40 / 1.17–1.34, unguided
1.97–2.13 / 0.32–0.36 / 1.30–1.51; autoguidance's KL below the unguided one by 0.21, 0.17, 0.16, 0.12, 0.13 on
seeds 0–4. At w = 3 autoguidance's KL, 1.72–1.95, is above the unguided one on every seed: over-sharpened.

By the reverse KL autoguidance is closer to the truth than both the unguided and the CFG samples on every seed at
w = 1.25 and 1.5 (by 0.12–0.30 against unguided), and at w = 2 on four seeds (by 0.09–0.23; seed 4 is a tie, 1.29
against 1.30, within the estimator's spread). CFG pushes each class away from the other: the shared trunk near the
origin empties and mass moves to the far branches (its energy distance is 100 times autoguidance's at w = 2), while
the branches stay as blurred as without guidance. Autoguidance moves far less mass and draws the samples onto the
branches the main network has resolved (NLL below the unguided one). By the two coverage distances it is **not**
closer to the truth than the unguided samples, at any w or guide tried (w = 1.25–3; the snapshots after 500 and 1000
steps; a width-32 network trained 1000 or 2000 steps): the main network blurs the finest branches into fans, the
guide blurs them as much, so autoguidance cannot restore them and moves mass from the fans to the branches it
sharpens (the best autoguided MMD per seed is 2.08–2.22 against 1.97–2.13 unguided; with the main network stopped at
1000 steps, blurrier, equal: 4.00 against 4.02, 3.53 against 3.54 on seeds 0 and 1). An earlier toy of isotropic
modes on two rings (10 configurations, energy distance and sliced Wasserstein-2) gave the same for those distances.
The test asserts what holds on every seed at w = 1.5: closer to the truth than CFG by all four measures, closer than
the unguided samples by the reverse KL, and onto the data (NLL) more than no guidance.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn

from diffit_cli.core.edm import EDM
from diffit_cli.core.guidance import Guidance
from diffit_cli.core.samplers import sample

CLASSES, NULL, DEPTH = 2, 2, 5
SCALE, STEPS, SAMPLES = 2.0, 32, 2000
MAIN_STEPS, GUIDE_STEPS, BATCH = 2000, 500, 512
BANDWIDTH, NEIGHBOURS = 0.03, 5


def _tree(angle: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One class: component weights (K,), means (K, 2) and covariances (K, 2, 2) of a binary tree of branches."""
    phi, mu, cov = [], [], []

    def grow(depth: int, start: torch.Tensor, angle: float) -> None:
        if depth == DEPTH:
            return
        d = torch.tensor([math.cos(angle), math.sin(angle)])
        length = 0.45 * 0.75**depth * (1 + 0.15 * torch.randn((), generator=g).item())
        along = d[:, None] * d[None]  # projector on the branch's direction
        c = along * (length / 5) ** 2 + (torch.eye(2) - along) * (0.025 * 0.8**depth) ** 2
        for t in (0.125, 0.375, 0.625, 0.875):
            phi.append(length * 0.6**depth)
            mu.append(start + d * length * t)
            cov.append(c)
        for side in (1, -1):
            turn = side * 0.55 * 0.8**depth * (1 + 0.2 * torch.randn((), generator=g).item())
            grow(depth + 1, start + d * length, angle + turn)

    grow(0, torch.zeros(2), angle)
    phi = torch.tensor(phi)
    return phi / phi.sum(), torch.stack(mu), torch.stack(cov)


_G = torch.Generator().manual_seed(7)
MIXTURES = [_tree(math.pi / 4, _G), _tree(5 * math.pi / 4, _G)]


def _draw(cls: torch.Tensor | int, n: int, g: torch.Generator) -> torch.Tensor:
    """n points of the true mixture of class `cls` (an int, or a (n,) label tensor)."""
    cls = torch.full((n,), cls) if isinstance(cls, int) else cls
    out = torch.empty(n, 2)
    for k, (phi, mu, cov) in enumerate(MIXTURES):
        rows = (cls == k).nonzero().flatten()
        if len(rows):
            comp = torch.multinomial(phi, len(rows), replacement=True, generator=g)
            chol = torch.linalg.cholesky(cov)[comp]
            out[rows] = mu[comp] + (chol @ torch.randn(len(rows), 2, 1, generator=g)).squeeze(-1)
    return out


def _inv2(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse and determinant of (…, 2, 2) symmetric matrices, in closed form."""
    a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    det = a * c - b * b
    inv = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2) / det[..., None, None]
    return inv, det


def _log_components(x: torch.Tensor, k: int, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """log φ_j N(x; μ_j, Σ_j + σ²I) of class k's components, (n, K); Σ_j widened by σ² when σ (n,) is given."""
    phi, mu, cov = MIXTURES[k]
    cov = cov[None] if sigma is None else cov[None] + sigma[:, None, None, None] ** 2 * torch.eye(2)  # (n|1, K, 2, 2)
    inv, det = _inv2(cov)
    diff = x[:, None] - mu[None]  # (n, K, 2)
    maha = torch.einsum("nki,nkij,nkj->nk", diff, inv.expand(len(x), -1, -1, -1), diff)
    return phi.log() - 0.5 * maha - 0.5 * det.log() - math.log(2 * math.pi)


def _posterior_mean(x: torch.Tensor, sigma: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x0 | x0 + σn = x] under class k's mixture (n, 2), and log p_σ(x) (n,)."""
    _, mu, cov = MIXTURES[k]
    log_c = _log_components(x, k, sigma)  # (n, K)
    inv, _ = _inv2(cov[None] + sigma[:, None, None, None] ** 2 * torch.eye(2))
    shift = torch.einsum("kij,nkjl,nkl->nki", cov, inv, x[:, None] - mu[None])  # Σ_j (Σ_j + σ²I)⁻¹ (x − μ_j)
    return (log_c.softmax(1)[..., None] * (mu[None] + shift)).sum(1), log_c.logsumexp(1)


def _target(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact denoiser target of each row: its class's posterior mean, or for NULL the mean over both classes."""
    means, log_p = zip(*(_posterior_mean(x, sigma, k) for k in range(CLASSES)))
    means, log_p = torch.stack(means), torch.stack(log_p)  # (classes, n, 2), (classes, n)
    marginal = (log_p.softmax(0)[..., None] * means).sum(0)  # equal class priors
    rows = torch.arange(len(x))
    return torch.where((y == NULL)[:, None], marginal, means[y.clamp(max=CLASSES - 1), rows])


def log_p(x: torch.Tensor, cls: int) -> torch.Tensor:
    """log p(x) under class `cls`'s true mixture, (n,)."""
    return _log_components(x, cls).logsumexp(1)


def knn_entropy(x: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Kozachenko–Leonenko estimate of the differential entropy (nats) of the distribution x (n, d) was drawn from:
    ψ(n) − ψ(k) + ln V_d + (d/n) Σ ln ε_i, ε_i the distance from x_i to its k-th nearest other sample, V_d the
    volume of the unit ball (π for d = 2)."""
    n, d = x.shape
    dist = torch.cdist(x.double(), x.double()).fill_diagonal_(math.inf)
    eps = dist.kthvalue(k, dim=1).values
    digamma = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    log_ball = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    return (digamma[0] - digamma[1] + log_ball + d * eps.log().mean()).item()


def nll_and_reverse_kl(x: torch.Tensor, log_density: torch.Tensor) -> tuple[float, float]:
    """The samples' mean −log p under the true density p (`log_density`: log p at each sample, (n,)), and the
    reverse KL divergence KL(q ‖ p) = E_q[−log p] − H(q) of their distribution q from p."""
    nll = -log_density.mean().item()
    return nll, nll - knn_entropy(x)


def kernel_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    k = lambda a, b: torch.exp(-(torch.cdist(a, b) ** 2) / (2 * BANDWIDTH**2))  # noqa: E731
    return (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


class ToyDenoiser(nn.Module):
    """F(x_in, c_noise, y) of a 2-D point: the raw-network call the diffusions make, `net(x, t_in, y, **kwargs)`."""

    def __init__(self, width: int = 64, depth: int = 3, freqs: int = 8):
        super().__init__()
        self.register_buffer("freq", torch.arange(freqs, dtype=torch.float32).exp())
        self.inp = nn.Linear(2 + 2 * freqs, width)
        self.label = nn.Embedding(CLASSES + 1, width)  # the last row: the null class of CFG
        hidden = [layer for _ in range(depth) for layer in (nn.SiLU(), nn.Linear(width, width))]
        self.body = nn.Sequential(*hidden, nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t_in: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        f = t_in.reshape(-1, 1).float() * self.freq / 4
        return self.body(self.inp(torch.cat([x, f.sin(), f.cos()], 1)) + self.label(y))


def train(seed: int) -> tuple[nn.Module, nn.Module]:
    """(main, guide): the EMA of one training run after MAIN_STEPS and after GUIDE_STEPS steps."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    net, edm = ToyDenoiser(), EDM(sigma_data=0.5)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=4e-3)
    for step in range(1, MAIN_STEPS + 1):
        opt.param_groups[0]["lr"] = 4e-3 / math.sqrt(max(step / 500, 1))
        y = torch.randint(CLASSES, (BATCH,), generator=g)
        x0 = _draw(y, BATCH, g)
        sigma = (torch.randn(BATCH, generator=g) * edm.p_std + edm.p_mean).exp()
        x = x0 + sigma[:, None] * torch.randn(BATCH, 2, generator=g)
        y_in = torch.where(torch.rand(BATCH, generator=g) < 0.2, torch.full_like(y, NULL), y)
        loss = edm.loss_weight(sigma) * ((edm.denoise(net, x, sigma, y_in) - _target(x, sigma, y_in)) ** 2).mean(1)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 0.01)
        if step == GUIDE_STEPS:
            guide = copy.deepcopy(ema).eval()
    return ema.eval(), guide


def _samples(net: nn.Module, cls: int, guidance: Guidance | None, guide: nn.Module | None) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(10_000 * (cls + 1) + i) for i in range(SAMPLES)]
    noise = torch.stack([torch.randn(2, generator=g) for g in gens])
    y = torch.full((SAMPLES,), cls)
    return sample(EDM(sigma_data=0.5), net, noise, y=y, steps=STEPS, guidance=guidance, guide=guide, generators=gens)


def draws(
    main: nn.Module, guide: nn.Module, scale: float, unguided: list[torch.Tensor] | None = None
) -> dict[str, list[torch.Tensor]]:
    """{method: [samples of class 0, of class 1]} for no guidance (`unguided` when already drawn: it does not depend
    on the scale), CFG and autoguidance at `scale`."""
    methods = {
        "cfg": (Guidance(scale=scale, mode="cfg", channels=None, null_class=NULL), None),
        "auto": (Guidance(scale=scale, mode="auto"), guide),
    }
    out = {"unguided": unguided or [_samples(main, c, None, None) for c in range(CLASSES)]}
    return out | {name: [_samples(main, c, g, net) for c in range(CLASSES)] for name, (g, net) in methods.items()}


def truth(cls: int) -> torch.Tensor:
    """The SAMPLES fixed draws of class `cls`'s true mixture that every method is compared with."""
    return _draw(cls, SAMPLES, torch.Generator().manual_seed(999 + cls))


def measures(x: torch.Tensor, true_draws: torch.Tensor, log_density: torch.Tensor) -> tuple[float, float, float, float]:
    """(MMD, energy distance, NLL, reverse KL) of samples x against draws of the true density p (`log_density`:
    log p at each sample)."""
    return kernel_mmd(x, true_draws), energy_distance(x, true_draws), *nll_and_reverse_kl(x, log_density)


def distances(samples: list[torch.Tensor]) -> tuple[float, float, float, float]:
    """`measures` of one method's samples, averaged over the classes."""
    per_class = [measures(x, truth(c), log_p(x, c)) for c, x in enumerate(samples)]
    return tuple(sum(v) / CLASSES for v in zip(*per_class))


def measure(seed: int, scale: float = SCALE) -> dict[str, tuple[float, float, float, float]]:
    """{method: (MMD, energy distance, NLL, reverse KL)} for the networks trained from `seed`."""
    main, guide = train(seed)
    return {name: distances(x) for name, x in draws(main, guide, scale).items()}


def figure(samples: dict[str, list[torch.Tensor]], scale: float, path: str) -> None:
    """Truth, unguided, CFG and autoguided samples side by side, each panel titled with its distances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"truth (fresh draws)": [_draw(c, SAMPLES, torch.Generator().manual_seed(1 + c)) for c in range(2)]}
    panels.update({"unguided": samples["unguided"], f"CFG w={scale:g}": samples["cfg"]})
    panels[f"autoguidance w={scale:g}"] = samples["auto"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.6), layout="constrained")
    for ax, (title, xs) in zip(axes, panels.items()):
        mmd, energy, _, kl = distances(xs)
        for c, x in enumerate(xs):
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.35, color=f"C{c}", rasterized=True)
        ax.set_title(f"{title}\nMMD {mmd * 1e3:.2f}e-3, energy {energy * 1e3:.2f}e-3, KL {kl:.2f}", fontsize=10)
        ax.set(xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal", xticks=[], yticks=[])
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0-4 or 0,3")
    parser.add_argument("--scales", default="2", help="guidance scales w, e.g. 2,1.25")
    parser.add_argument("--figure", help="PNG of the first seed at the first scale (truth, unguided, CFG, auto)")
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi) + 1) if hi else [int(s) for s in args.seeds.split(",")]
    scales = [float(w) for w in args.scales.split(",")]
    torch.set_num_threads(1)
    print("seed  w     method    MMD×1e3  energy×1e3  NLL    KL(q‖p)")
    for i, seed in enumerate(seeds):
        main_net, guide = train(seed)
        unguided = None
        for j, scale in enumerate(scales):
            samples = draws(main_net, guide, scale, unguided)
            unguided = samples["unguided"]
            for name, x in samples.items():
                mmd, energy, nll, kl = distances(x)
                print(
                    f"{seed:<5} {scale:<5g} {name:<9} {mmd * 1e3:7.2f}  {energy * 1e3:10.2f}  {nll:+.2f}  {kl:.3f}",
                    flush=True,
                )
            if args.figure and i == j == 0:
                figure(samples, scale, args.figure)
    floor = distances([_draw(c, SAMPLES, torch.Generator().manual_seed(555 + c)) for c in range(CLASSES)])
    print(
        f"floor (other true draws): MMD {floor[0] * 1e3:.2f}e-3, energy {floor[1] * 1e3:.2f}e-3, NLL {floor[2]:+.2f}, "
        f"KL {floor[3]:.3f}"
    )


if __name__ == "__main__":
    main()
