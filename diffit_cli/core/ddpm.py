"""ADM Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021 "iDDPM"; Dhariwal & Nichol 2021 "ADM"; DiT).

Follows openai/guided-diffusion ``gaussian_diffusion.py`` / ``respace.py`` as DiT (and the DiffiT release)
use them: ε-prediction, learned-range variance, hybrid loss ``MSE(ε) + L_vlb`` with the mean stopped,
uniform t, no timestep rescaling.

Contracts (other modules rely on them):

* The raw network is called as ``net(x_t, t, y)`` with ``t`` of shape (B,) holding the **original**
  DDPM index 0…T−1 (int64 from the DDPM samplers and the loss; float32 when called by the σ-space
  adapter :meth:`GaussianDiffusion.denoiser`). With ``learn_sigma`` it returns (B, 2C, H, W): ε in the
  first C channels and the variance interpolation v in the last C.
* ``GaussianDiffusion(num_timesteps=1000, schedule="linear", learn_sigma=True)``;
  ``.loss(net, x0, y=None, *, t=None, noise=None) -> (B,)`` (hybrid loss; t and ε from the global
  torch RNG on x0's device, t first as DiT draws them, unless given; ``training_noise(batch, shape,
  generator) -> {"t", "noise"}`` draws them from a generator for a whole global batch);
  ``.respace("250")`` → a diffusion over the kept steps (ADM ``SpacedDiffusion``);
  ``.denoiser(net, y=None) -> D(x, sigma)`` the k-diffusion ``DiscreteEpsDDPMDenoiser`` adapter for the
  σ-space samplers; ``.p_sample`` / ``.ddim_sample`` single reverse steps used by ``samplers.py``.
* Tables are float64 on the host; coefficients are gathered as float32 (as ADM's ``_extract_into_tensor``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffit_cli.core.edm import call_network, mean_flat
from diffit_cli.core.schedules import interp, space_timesteps

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------- β schedules
def linear_betas(num_timesteps: int) -> Tensor:
    """ADM ``get_named_beta_schedule('linear')``: β from 1e-4 to 0.02, both scaled by 1000/T."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """iDDPM eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008; β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """ADM's named schedules: ``linear`` or ``cosine``."""
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {name!r}; valid: 'linear', 'cosine'")


# ------------------------------------------------------------------------------------- likelihood terms
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(μ1, e^{lv1}) ‖ N(μ2, e^{lv2})), elementwise (ADM ``losses.normal_kl``)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """ADM's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """DDPM eq. 13 / ADM ``losses``: log-likelihood of x ∈ [−1, 1] under a Gaussian binned to 255 levels."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ------------------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """ADM ``GaussianDiffusion`` (ε-prediction, learned-range or fixed-large variance, hybrid loss)."""

    def __init__(self, num_timesteps: int = 1000, schedule: str = "linear", learn_sigma: bool = True) -> None:
        betas = get_named_beta_schedule(schedule, num_timesteps)
        self.schedule = schedule
        self.learn_sigma = bool(learn_sigma)
        self.original_num_timesteps = num_timesteps
        self._set_tables(torch.cumprod(1.0 - betas, dim=0), betas)
        self.original_alphas_cumprod = self.alphas_cumprod
        self.timestep_map = torch.arange(num_timesteps, dtype=torch.int64)

    def __repr__(self) -> str:
        spaced = "" if self.num_timesteps == self.original_num_timesteps else f", respaced to {self.num_timesteps}"
        return (
            f"GaussianDiffusion(num_timesteps={self.original_num_timesteps}, schedule={self.schedule!r}, "
            f"learn_sigma={self.learn_sigma}{spaced})"
        )

    def _set_tables(self, alphas_cumprod: Tensor, betas: Tensor) -> None:
        """ADM ``GaussianDiffusion.__init__`` tables (float64, host)."""
        self.betas = betas
        self.num_timesteps = len(betas)
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt()
        # DDPM eq. 7: β̃_t = β_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t); the log is clipped at t = 0 where β̃_0 = 0.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.cat([pv[1:2], pv[1:]]).log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)
        self.log_betas = betas.log()
        # ADM FIXED_LARGE (learn_sigma=False in DiT): σ² = β_t, with β̃_1 at t = 0.
        self.fixed_large_log_variance = torch.cat([pv[1:2], betas[1:]]).log()
        self.sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()  # VE noise level of each step
        self.log_sigmas = self.sigmas.log()
        self._cache: dict[tuple, Tensor] = {}
        self._respaced: dict[str, GaussianDiffusion] = {}

    # ---------------------------------------------------------------- respacing (ADM respace.py)
    def respace(self, section_counts: str | int | Sequence[int]) -> GaussianDiffusion:
        """ADM ``SpacedDiffusion``: keep ``space_timesteps(T, section_counts)``, β_i = 1 − ᾱ_i/ᾱ_prev.

        The kept ᾱ are copied, not recomputed, so they equal the original ones bit for bit; the
        network still receives the original index (``timestep_map``, no rescaling, as DiT). Memoized,
        so the device copies of its tables are made once per sampling run, not once per batch.
        """
        key = str(section_counts) if isinstance(section_counts, (str, int)) else ",".join(map(str, section_counts))
        if key not in self._respaced:
            self._respaced[key] = self._respace(section_counts)
        return self._respaced[key]

    def _respace(self, section_counts: str | int | Sequence[int]) -> GaussianDiffusion:
        keep = sorted(space_timesteps(self.num_timesteps, section_counts))
        keep_t = torch.tensor(keep, dtype=torch.int64)
        alphas_cumprod = self.alphas_cumprod[keep_t]  # (K,)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        spaced = object.__new__(GaussianDiffusion)
        spaced.schedule, spaced.learn_sigma = self.schedule, self.learn_sigma
        spaced.original_num_timesteps = self.original_num_timesteps
        spaced.original_alphas_cumprod = self.original_alphas_cumprod
        spaced._set_tables(alphas_cumprod, 1.0 - alphas_cumprod / prev)
        spaced.timestep_map = self.timestep_map[keep_t]
        return spaced

    # ---------------------------------------------------------------- table access
    def _table(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """A table on ``device`` (cached, so the sampling loops copy nothing to the device)."""
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    def _extract(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """ADM ``_extract_into_tensor``: table[t] as float32, shape (B, 1, …, 1)."""
        return self._table(name, t.device)[t].reshape(-1, *([1] * (x.ndim - 1)))

    def network_time(self, t: Tensor) -> Tensor:
        """The network's time input for a (possibly respaced) index: the original DDPM index (int64)."""
        return self._table("timestep_map", t.device, torch.int64)[t]

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """DDPM eq. 4: x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε."""
        sqrt_ac = self._extract("sqrt_alphas_cumprod", t, x0)
        return sqrt_ac * x0 + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """DDPM eq. 6–7: q(x_{t−1} | x_t, x0) = N(μ̃, β̃); returns (μ̃, β̃, clipped log β̃)."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """DDPM eq. 15: x0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε."""
        recip = self._extract("sqrt_recip_alphas_cumprod", t, x_t)
        return recip * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Inverse of :meth:`predict_xstart_from_eps`."""
        recip = self._extract("sqrt_recip_alphas_cumprod", t, x_t)
        return (recip * x_t - x0) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    # ---------------------------------------------------------------- reverse process
    def learned_range_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """iDDPM eq. 15: log Σ = frac·log β_t + (1 − frac)·log β̃_t (clipped), frac = (v + 1)/2."""
        min_log = self._extract("posterior_log_variance_clipped", t, v)
        max_log = self._extract("log_betas", t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False) -> dict:
        """ADM ``p_mean_variance`` for ε-prediction: μ_θ = μ̃(x̂0(ε_θ), x_t), Σ_θ learned-range or β."""
        C = x_t.shape[1]
        if self.learn_sigma:
            eps, v = model_output[:, :C], model_output[:, C : 2 * C]  # (B, 2C, …) → 2 × (B, C, …)
            log_variance = self.learned_range_log_variance(v, t)
        else:
            eps = model_output[:, :C]
            log_variance = self._extract("fixed_large_log_variance", t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, noise: Tensor | None, clip_denoised: bool = False
    ) -> Tensor:
        """DDPM Alg. 2 / ADM ``p_sample``: x_{t−1} = μ_θ + exp(½ log Σ_θ)·z (no noise at t = 0: pass None)."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        if noise is None:
            return out["mean"]
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(
        self,
        model_output: Tensor,
        x_t: Tensor,
        t: Tensor,
        noise: Tensor | None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> Tensor:
        """DDIM eq. 12 / ADM ``ddim_sample``: σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ))·√(1 − ᾱ/ᾱ_prev)."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x_t)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x_t)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
        mean_pred = out["pred_xstart"] * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if noise is None:
            return mean_pred
        return mean_pred + sigma * noise

    # ---------------------------------------------------------------- training loss
    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """ADM ``_vb_terms_bpd``: L_{t−1} = KL(q(x_{t−1}|x_t,x0) ‖ p_θ) for t > 0, L_0 = −log p_θ(x0|x1)
        (discretized Gaussian, DDPM eq. 13), in bits per dimension; shape (B,)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def loss_terms(
        self,
        net: Callable,
        x0: Tensor,
        y: Tensor | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, Tensor]:
        """iDDPM hybrid loss (ADM ``training_losses``, MSE type): ``mse`` + ``vb`` = ``loss``, each (B,).

        The VLB term sees the ε prediction detached ("stop gradient on the mean", iDDPM §3.1), so it
        trains only the variance; t ~ U{0, …, T−1} then ε ~ N(0, I) from the global torch RNG.
        """
        x0 = x0.to(torch.float32)
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=torch.float32)
        x_t = self.q_sample(x0, t, noise)
        model_output = call_network(net, autocast_dtype, x_t, self.network_time(t), y)  # (B, 2C, …) or (B, C, …)
        C = x0.shape[1]
        terms = {"mse": mean_flat((noise - model_output[:, :C]) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def loss(
        self,
        net: Callable,
        x0: Tensor,
        y: Tensor | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Per-sample hybrid loss (B,) (see :meth:`loss_terms`)."""
        return self.loss_terms(net, x0, y, t=t, noise=noise, autocast_dtype=autocast_dtype)["loss"]

    def training_noise(self, batch: int, shape: tuple[int, ...], generator: torch.Generator) -> dict[str, Tensor]:
        """The loss's random draws for a whole (global) batch from ``generator``: t (B,) then ε (B, *shape)."""
        device = generator.device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
        return {"t": t, "noise": torch.randn((batch, *shape), generator=generator, device=device)}

    # ---------------------------------------------------------------- σ-space view (k-diffusion)
    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """k-diffusion ``DiscreteSchedule.sigma_to_t``: fractional index by linear interpolation in log σ."""
        log_sigmas = self._table("log_sigmas", sigma.device, _table_dtype(sigma.device))  # (T,)
        log_sigma = sigma.to(log_sigmas.dtype).log()  # (B,)
        dists = log_sigma - log_sigmas[:, None]  # (T, B)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return (1 - w) * low_idx + w * high_idx  # (B,)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """k-diffusion ``DiscreteSchedule.t_to_sigma``: σ at a fractional index, interpolated in log σ."""
        return interp(self._table("log_sigmas", t.device, _table_dtype(t.device)), t).exp()

    def _network_time_of_index(self, t: Tensor) -> Tensor:
        """Fractional (respaced) index → fractional original index (linear between kept steps)."""
        if self.num_timesteps == self.original_num_timesteps:
            return t
        return interp(self._table("timestep_map", t.device, t.dtype), t)

    def sigma_from_network_time(self, t: Tensor) -> Tensor:
        """σ of an original DDPM index (integer or fractional), from the original ᾱ table."""
        return interp(self._table("_original_log_sigmas", t.device, _table_dtype(t.device)), t).exp()

    @property
    def _original_log_sigmas(self) -> Tensor:
        ac = self.original_alphas_cumprod
        return (((1.0 - ac) / ac).sqrt()).log()

    def ddpm_t_from_network_time(self, t: Tensor) -> Tensor:
        """The network's time input already is the original DDPM index."""
        return t

    def denoiser(
        self,
        net: Callable,
        y: Tensor | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        quantize: bool = False,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """k-diffusion ``DiscreteEpsDDPMDenoiser``: D(x; σ) = x − σ·ε_θ(x/√(σ² + 1), t(σ)).

        x is in σ (VE) space, x = x_t/√ᾱ; t(σ) interpolates log σ over the table (``quantize`` rounds
        it to the nearest step). Only the ε channels are used. The result keeps x's dtype.
        """

        def D(x: Tensor, sigma: Tensor) -> Tensor:
            sigma = sigma.reshape(-1).expand(x.shape[0])  # (B,)
            t = self.sigma_to_t(sigma)
            t = t.round() if quantize else t
            t_net = self._network_time_of_index(t).to(torch.float32)
            s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, …, 1)
            x_in = (x / (s**2 + 1).sqrt()).to(torch.float32)
            eps = call_network(net, autocast_dtype, x_in, t_net, y)[:, : x.shape[1]]  # (B, C, …)
            return x - s * eps.to(x.dtype)

        return D


def _table_dtype(device: torch.device) -> torch.dtype:
    """float64 tables wherever the device has float64 (all but Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


__all__ = [
    "GaussianDiffusion",
    "linear_betas",
    "cosine_betas",
    "get_named_beta_schedule",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
]
