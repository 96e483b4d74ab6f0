"""The 2-D toy of the autoguidance paper (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself", Sec. 3 and Fig. 1) in the configuration of its released toy example, rebuilt here, measured with the
four measures of `autoguidance_toy.py`: does the paper's own setup put autoguided samples closer to the truth?

    python benchmarks/autoguidance_toy_release.py --seed 0

trains three networks (17–20 minutes in all on 2 CPU cores at the released batch of 4096, most of it the main
network; a smaller `--batch` is faster but not the released setting) and prints the measures for no guidance,
autoguidance and CFG at several scales.

Setup, the released example's:

* data: class A of a two-class fractal (a binary tree of depth 7 per class, each branch 8 Gaussians along it,
  weighted by its length·0.5^depth, so the finest branches hold little mass; 1016 components per class);
* networks: an MLP that outputs log p(x; σ), its score taken by autograd (so the learnt field is conservative), with
  EDM2's magnitude-preserving layers (forced weight normalisation, SiLU/0.596) and a zero-initialised gain;
* training: the score-matching loss σ²·|∇log p_net − ∇log p_σ|² against the mixture's exact score, ln σ ~
  N(−2.3, 1.5²), Adam (0.9, 0.99), lr 10⁻² decayed as 1/√(t/512), batch 4096, a power-function EMA of σ_rel 0.010;
* main network: 4 hidden layers of width 64 trained 4096 steps on class A; autoguidance's guide: width 32, 512 steps,
  class A; CFG's unconditional network, as in the released figure: width 32, 512 steps, classes A and B;
* sampling: `core.samplers.sample`, Heun, 32 steps from σ = 5, 4096 samples, each network called through EDM's
  preconditioning (D = x + σ²·∇log p).

Where this differs from the released example: the samplers start from N(0, 5²I) (the example from the data blurred
by σ = 5, nearly the same at that σ); 4096 samples are measured (the example plots 8192); its figure shows CFG at
w = 4 (with autoguidance at 3), a scale not swept here by default (`--scales`).

Measured 2026-12-06, 2-core x86-64 CPU (17–20 minutes; a rerun gives the same figures), seed 0, batch 4096
(MMD ×10³ / energy ×10³ / NLL / reverse KL, the measures of `autoguidance_toy.py`; CFG: the main network guided by
the small unconditional one, as in the released figure):

    other true draws    0.45 / 0.48 / −1.37 / −0.08
    unguided            0.98 / 1.77 / −0.01 / 1.28
    w      autoguidance                   CFG
    1.25   1.01 / 1.78 / −0.40 / 0.99     1.98 /   1.84 / −0.46 / 0.94
    1.5    1.22 / 1.86 / −0.51 / 1.00     4.92 /   8.45 / −0.50 / 1.05
    2      2.21 / 2.31 / −0.70 / 1.12    10.31 /  30.52 / −0.15 / 1.72
    3      6.18 / 4.54 / +8.73 / 11.2    20.63 / 109.29 / +0.41 / 3.30

The same picture as on `autoguidance_toy.py`'s tree against no guidance: by the reverse KL autoguidance is closer
to the truth than the unguided samples at w = 1.25–2 (by 0.16–0.29, well past the estimator's −0.08 on true draws);
against CFG by the reverse KL it is equal within that error at w = 1.25 and 1.5 (0.99 against 0.94, 1.00 against
1.05), closer at 2 (1.12 against 1.72) and farther at 3 (11.2 against 3.30); by the two coverage distances it is
not closer than the unguided samples at any scale (equal at best, w = 1.25), and closer than CFG at every one. At
w = 3, the released example's setting, the mean NLL of +8.7 says that some samples fall where the true density is
nearly 0.
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch
from autoguidance_toy import measures
from torch import nn
from torch.nn import functional as F

from diffit_cli.core.edm import EDM
from diffit_cli.core.guidance import Guidance
from diffit_cli.core.posthoc_ema import gamma_of_sigma_rel, power_beta
from diffit_cli.core.samplers import sample

SAMPLES, STEPS, SIGMA_MAX = 4096, 32, 5.0
EDM_TOY = EDM(sigma_data=0.5)


def _fractal(seed: int = 2, depth: int = 7) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{"A": …, "AB": …}: component weights (K,), means (K, 2), covariances (K, 2, 2) of class A and of both."""
    rnd, stretch, comps = np.random.RandomState(seed), np.array([1.3136, 1.3844]), {"A": [], "B": []}

    def branch(cls: str, d: int, start: np.ndarray, angle: float) -> None:
        if d == depth:
            return
        u = np.array([math.cos(angle), math.sin(angle)])
        length = 0.292 * 0.8**d * (1 + 0.2 * rnd.randn())
        across = 0.2 * 0.8**d / length  # the branch's thickness relative to its length
        size = stretch * length * 0.06
        cov = (np.outer(u, u) + (np.eye(2) - np.outer(u, u)) * across**2) * np.outer(size, size)
        comps[cls] += [(length * 0.5**d, (start + u * length * t) * stretch, cov) for t in np.linspace(0.07, 0.93, 8)]
        for side in (1, -1):
            branch(cls, d + 1, start + u * length, angle + side * 0.7**d * (1 + 0.2 * rnd.randn()))

    origin = np.array([0.0030, 0.0325])
    branch("A", 0, origin, math.pi / 4)
    branch("B", 0, origin, 5 * math.pi / 4)
    out = {}
    for name, sel in (("A", comps["A"]), ("AB", comps["A"] + comps["B"])):
        phi, mu, cov = (torch.tensor(np.array(v), dtype=torch.float32) for v in zip(*sel))
        out[name] = (phi / phi.sum(), mu, cov)
    return out


MIXTURES = _fractal()
EIGEN = {name: torch.linalg.eigh(cov) for name, (_, _, cov) in MIXTURES.items()}  # Σ_j = Q diag(L) Qᵀ


def _components(x: torch.Tensor, name: str, sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log φ_j N(x; μ_j, Σ_j + σ²I) (n, K) and (Σ_j + σ²I)⁻¹(μ_j − x) (n, K, 2), through the eigenvectors."""
    phi, mu, _ = MIXTURES[name]
    lam, q = EIGEN[name]
    lam = lam[None] if sigma is None else lam[None] + sigma[:, None, None] ** 2  # (n|1, K, 2)
    rotated = torch.einsum("kji,nkj->nki", q, mu[None] - x[:, None]) / lam  # diag(L)⁻¹ Qᵀ(μ − x)
    maha = (rotated**2 * lam).sum(-1)
    log_c = phi.log() - 0.5 * maha - 0.5 * lam.log().sum(-1) - math.log(2 * math.pi)
    return log_c, torch.einsum("kij,nkj->nki", q, rotated)


def true_score(x: torch.Tensor, sigma: torch.Tensor, name: str) -> torch.Tensor:
    """∇ log p_σ(x) of the mixture `name` blurred by σ (n,)."""
    log_c, z = _components(x, name, sigma)
    return (log_c.softmax(1)[..., None] * z).sum(1)


def log_p(x: torch.Tensor) -> torch.Tensor:
    """log p(x) under class A's mixture, (n,)."""
    return _components(x, "A")[0].logsumexp(1)


def draw(name: str, n: int, g: torch.Generator, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
    """n points of the mixture `name`, blurred by σ (a float or (n,))."""
    phi, mu, cov = MIXTURES[name]
    comp = torch.multinomial(phi, n, replacement=True, generator=g)
    blur = torch.as_tensor(sigma, dtype=torch.float32).expand(n) ** 2
    chol = torch.linalg.cholesky(cov[comp] + blur[:, None, None] * torch.eye(2))
    return mu[comp] + (chol @ torch.randn(n, 2, 1, generator=g)).squeeze(-1)


class MPLinear(nn.Module):
    """EDM2's magnitude-preserving linear layer: unit-norm weight rows, renormalised in place while training."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))

    @staticmethod
    def _unit(w: torch.Tensor) -> torch.Tensor:
        return w / (1e-4 + w.norm(dim=1, keepdim=True) / math.sqrt(w.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(self._unit(self.weight))
        return x @ (self._unit(self.weight) / math.sqrt(self.weight.shape[1])).t()


class LogDensity(nn.Module):
    """log p(x; σ) of a 2-D point up to a constant, and its score by autograd."""

    def __init__(self, width: int, depth: int = 4, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.inp = MPLinear(4, width)
        self.hidden = nn.ModuleList(MPLinear(width, width) for _ in range(depth))
        self.gain = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma[:, None]
        x = x / (self.sigma_data**2 + s**2).sqrt()
        h = self.inp(torch.cat([x, s.log() / 4, torch.ones_like(s)], 1))
        for layer in self.hidden:
            h = layer(F.silu(h) / 0.596)
        return (h**2).mean(1) * self.gain / sigma - 0.5 * (x**2).sum(1)  # a Gaussian of the input's scale at gain 0

    def score(self, x: torch.Tensor, sigma: torch.Tensor, graph: bool = False) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self(x, sigma).sum(), x, create_graph=graph)[0]


def train(name: str, width: int, steps: int, batch: int, seed: int) -> LogDensity:
    """The power-function EMA (σ_rel 0.010) of a LogDensity trained `steps` steps on the mixture `name`."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    net = LogDensity(width)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    gamma = gamma_of_sigma_rel(0.010)
    for step in range(1, steps + 1):
        opt.param_groups[0]["lr"] = 1e-2 / math.sqrt(max((step - 1) / 512, 1))
        sigma = (torch.randn(batch, generator=g) * 1.5 - 2.3).exp()
        x = draw(name, batch, g, sigma)
        loss = sigma**2 * ((net.score(x, sigma, graph=True) - true_score(x, sigma, name)) ** 2).mean(1)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - power_beta(step, gamma))
    return ema


class Raw(nn.Module):
    """A LogDensity called as the raw network of EDM's preconditioning, F(c_in·x, c_noise, y), with
    D(x; σ) = x + σ²·∇log p(x; σ); label 1 (CFG's null class) calls `unconditional` instead."""

    def __init__(self, net: LogDensity, unconditional: LogDensity | None = None):
        super().__init__()
        self.net, self.unconditional = net, unconditional

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None, **_) -> torch.Tensor:
        sigma = EDM_TOY.sigma_from_network_time(c_noise)
        x = x_in / EDM_TOY.c_in(sigma)[:, None]
        null = torch.zeros(len(x), dtype=torch.bool) if self.unconditional is None or y is None else y == 1
        score = torch.empty_like(x)
        score[~null] = self.net.score(x[~null], sigma[~null])
        if null.any():
            score[null] = self.unconditional.score(x[null], sigma[null])
        denoised = x + sigma[:, None] ** 2 * score
        return (denoised - EDM_TOY.c_skip(sigma)[:, None] * x) / EDM_TOY.c_out(sigma)[:, None]


def samples(raw: Raw, guidance: Guidance | None = None, guide: Raw | None = None) -> torch.Tensor:
    """SAMPLES draws of class A (label 0) from Heun's 32 steps, each from its own generator."""
    gens = [torch.Generator().manual_seed(50_000 + i) for i in range(SAMPLES)]
    noise = torch.stack([torch.randn(2, generator=g) for g in gens])
    y = torch.zeros(SAMPLES, dtype=torch.long)
    return sample(
        EDM_TOY, raw, noise, y=y, steps=STEPS, guidance=guidance, guide=guide, generators=gens, sigma_max=SIGMA_MAX
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4096, help="training batch (the released example's: 4096)")
    parser.add_argument("--scales", default="1.25,1.5,2,3", help="guidance scales w")
    args = parser.parse_args()
    main_net = train("A", 64, 4096, args.batch, args.seed)
    guide = train("A", 32, 512, args.batch, args.seed)
    unconditional = train("AB", 32, 512, args.batch, args.seed)
    truth = draw("A", SAMPLES, torch.Generator().manual_seed(9))
    rows = {
        "other true draws": draw("A", SAMPLES, torch.Generator().manual_seed(10)),
        "unguided": samples(Raw(main_net)),
    }
    for w in (float(s) for s in args.scales.split(",")):
        rows[f"autoguidance w={w:g}"] = samples(Raw(main_net), Guidance(scale=w, mode="auto"), Raw(guide))
        cfg = Guidance(scale=w, mode="cfg", channels=None, null_class=1)
        rows[f"CFG w={w:g}"] = samples(Raw(main_net, unconditional), cfg)
    print("method                  MMD×1e3  energy×1e3  NLL     KL(q‖p)")
    for name, x in rows.items():
        mmd, energy, log_loss, kl = measures(x, truth, log_p(x))
        print(f"{name:<22} {mmd * 1e3:8.2f}  {energy * 1e3:10.2f}  {log_loss:+7.2f}  {kl:7.3f}", flush=True)


if __name__ == "__main__":
    main()
