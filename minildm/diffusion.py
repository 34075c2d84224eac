"""The noise schedule and the forward process — one object that every diffusion stage uses.

DDPM (Ho et al. 2020) destroys an image x₀ over T = 1000 steps with Gaussian noise of variance
β_t; in closed form, with ᾱ_t = ∏_{s≤t} (1 − β_s) (LDM Eq. 1, the forward process):

    x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε,        ε ~ N(0, I).

The network learns to undo it, predicting one of three equivalent **targets** (:meth:`target`):

* ``eps`` — the noise ε (DDPM; LDM's Eq. 2: L = E‖ε − ε_θ(x_t, t)‖²);
* ``x0``  — the clean sample;
* ``v``   — v = √ᾱ_t · ε − √(1 − ᾱ_t) · x₀ (Salimans & Ho 2022; Stable Diffusion 2).

Any of them gives the other two from x_t (:meth:`predicted_x0`, :meth:`predicted_eps`).

**The schedule** is Stable Diffusion's "scaled linear": √β_t linear from √0.00085 to √0.012
(CompVis calls it "linear"; computed in float64 as CompVis does). Its last step still has
signal (ᾱ_T = 0.0047): ``zero_terminal_snr=True`` rescales it so that ᾱ_T = 0 (Lin et al. 2024,
Alg. 1) — then pair it with ``v`` prediction, since ε is unpredictable from pure noise.

**The σ view** (eDiff-I, Karras et al. 2022): x_t/√ᾱ_t = x₀ + σ_t·ε with σ_t = √((1 − ᾱ_t)/ᾱ_t),
so a timestep is a noise level σ; eDiff-I's experts split the σ axis, and paint-with-words
weights its attention bias by log(1 + σ).

The timestep index ``t`` runs 0 … T−1 (0 = least noise), as in CompVis and diffusers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PREDICTIONS = ("eps", "v", "x0")


def scaled_linear_betas(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """β_t with √β_t linear from √beta_start to √beta_end (float64)."""
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: shift and scale √ᾱ so that √ᾱ_T = 0 and √ᾱ_0 is unchanged."""
    sqrt_acp = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_acp[0], sqrt_acp[-1]
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp ** 2
    alphas = np.concatenate([acp[:1], acp[1:] / acp[:-1]])
    return 1.0 - alphas


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast against ``like`` (B, ...), in ``like``'s dtype."""
    out = values.to(like.device)[t.to(like.device).long()]
    return out.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class NoiseSchedule:
    """β_t, ᾱ_t, σ_t and the forward process for T steps (see the module docstring)."""

    def __init__(self, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 zero_terminal_snr: bool = False):
        betas = scaled_linear_betas(steps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        acp = np.cumprod(1.0 - betas)
        self.steps, self.zero_terminal_snr = steps, zero_terminal_snr
        self.betas = torch.from_numpy(betas).float()
        self.alphas_cumprod = torch.from_numpy(acp).float()
        # ᾱ_{t-1}, with ᾱ_{-1} = 1 (the posterior at t = 0 is the clean sample)
        self.alphas_cumprod_prev = torch.from_numpy(np.concatenate([[1.0], acp[:-1]])).float()
        with np.errstate(divide="ignore"):
            self.sigmas = torch.from_numpy(np.sqrt((1 - acp) / acp)).float()  # inf where ᾱ = 0

    def __repr__(self) -> str:
        return (f"NoiseSchedule(steps={self.steps}, ᾱ_0={float(self.alphas_cumprod[0]):.5f}, "
                f"ᾱ_T={float(self.alphas_cumprod[-1]):.5f}, zero_terminal_snr={self.zero_terminal_snr})")

    # ----------------------------------------------------------------- the forward process
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε (``q_sample`` in CompVis, ``add_noise`` in diffusers)."""
        acp = _gather(self.alphas_cumprod, t, x0)
        return acp.sqrt() * x0 + (1 - acp).sqrt() * noise

    def sample_timesteps(self, batch_size: int, generator=None, device=None,
                         interval: tuple[int, int] | None = None) -> torch.Tensor:
        """t ~ Uniform{0, …, T−1}, one per sample (LDM's training); or uniform on an expert's
        ``interval`` [lo, hi) (eDiff-I's fine-tuning of one expert)."""
        low, high = interval or (0, self.steps)
        return torch.randint(low, high, (batch_size,), generator=generator, device=device)

    # ----------------------------------------------------------------- targets and conversions
    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a network trained for ``prediction`` should output at (x_t, t)."""
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        if prediction == "v":
            acp = _gather(self.alphas_cumprod, t, x0)
            return acp.sqrt() * noise - (1 - acp).sqrt() * x0
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")

    def predicted_x0(self, prediction: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x₀ implied by a network ``output`` at (x_t, t)."""
        acp = _gather(self.alphas_cumprod, t, x_t)
        if prediction == "eps":
            return (x_t - (1 - acp).sqrt() * output) / acp.sqrt()
        if prediction == "x0":
            return output
        if prediction == "v":
            return acp.sqrt() * x_t - (1 - acp).sqrt() * output
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")

    def predicted_eps(self, prediction: str, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε implied by a network ``output`` at (x_t, t)."""
        acp = _gather(self.alphas_cumprod, t, x_t)
        if prediction == "eps":
            return output
        if prediction == "x0":
            return (x_t - acp.sqrt() * output) / (1 - acp).sqrt()
        if prediction == "v":
            return acp.sqrt() * output + (1 - acp).sqrt() * x_t
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")

    # ----------------------------------------------------------------- the reverse process
    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t−1} | x_t, x₀) (DDPM Eq. 7; CompVis ``q_posterior``)."""
        acp, acp_prev = _gather(self.alphas_cumprod, t, x_t), _gather(self.alphas_cumprod_prev, t, x_t)
        beta = _gather(self.betas, t, x_t)
        alpha = 1 - beta
        mean = (acp_prev.sqrt() * beta / (1 - acp)) * x0 + (alpha.sqrt() * (1 - acp_prev) / (1 - acp)) * x_t
        variance = ((1 - acp_prev) / (1 - acp) * beta).clamp_min(1e-20)
        return mean, variance

    # ----------------------------------------------------------------- the σ view
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t): the noise level of step t in eDiff-I's (Karras') units."""
        return self.sigmas[t.long().cpu()]

    def timestep_of_sigma(self, sigma: float) -> int:
        """The step whose σ_t is closest to ``sigma`` (in log σ)."""
        finite = torch.where(torch.isfinite(self.sigmas), self.sigmas, torch.tensor(1e30))
        return int((finite.log() - math.log(sigma)).abs().argmin())

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t/(1 − ᾱ_t) = 1/σ_t²."""
        acp = self.alphas_cumprod[t.long().cpu()]
        return acp / (1 - acp)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, **cos first** (CompVis
    ``timestep_embedding``; diffusers ``get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)``): freqs_i = exp(−ln(max_period)·i/half), [cos(t·f), sin(t·f)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
