"""Samplers: DDPM (ancestral) and DDIM, and classifier-free guidance as a denoiser wrapper.

A sampler knows a :class:`minildm.diffusion.NoiseSchedule` and a **denoiser** — any callable
``denoiser(x_t, t, cond) -> output`` where ``t`` is a (B,) tensor of timestep indices and
``output`` is the ``prediction`` ("eps", "v" or "x0") it was trained for — and nothing else
about it: the same samplers run the latent UNet, the pixel UNet, eDiff-I's experts and ADD's
student. Guidance is a wrapper with that same signature, so a sampler never knows it is guided.

**DDIM** (Song et al. 2021, Eq. 12), the step from t to the previous sampled step t′::

    x̂₀ = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t
    σ  = η·√((1−ᾱ_t′)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_t′)
    x_t′ = √ᾱ_t′·x̂₀ + √(1 − ᾱ_t′ − σ²)·ε̂ + σ·z

η = 0 is deterministic; η = 1 is ancestral sampling. Timesteps for S steps out of T = 1000:
"leading" (CompVis' "uniform": 981, 961, …, 1; with S = T, every t from 999 to 0) or "trailing"
(999, 979, …, 19; Lin et al. 2024, which reaches the noisiest step), both uniform in t; or
"karras", the step distribution of EDM (Karras et al. 2022, Eq. 5, ρ = 7; eDiff-I is built on
EDM), uniform in σ^(1/ρ), which spends most steps at low noise (:func:`karras_timesteps`). After
the last step ᾱ_t′ is ᾱ_0, as in CompVis (diffusers: ``set_alpha_to_one=False``).

**DDPM** (Ho et al. 2020, Alg. 2), on the same strided timesteps: the posterior
q(x_t′ | x_t, x̂₀) with β′ = 1 − ᾱ_t/ᾱ_t′ ("fixed small" variance), no noise at the last step.

**Classifier-free guidance** (Ho & Salimans 2022): ``ε̂ = ε_u + s·(ε_c − ε_u)``, the
unconditional and conditional predictions from one batch of twice the size; s = 1 is no guidance.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from minildm.diffusion import NoiseSchedule

SPACINGS = ("leading", "trailing", "karras")
Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def sampling_timesteps(train_steps: int, steps: int, spacing: str = "leading") -> list[int]:
    """Descending timestep indices of an S-step sampler (see the module docstring)."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be between 1 and {train_steps}, got {steps}")
    if spacing == "leading":
        stride = train_steps // steps
        offset = 1 if steps < train_steps else 0  # CompVis' +1 would ask for t = T when every t is visited
        return [int(t) for t in (np.arange(steps) * stride + offset)[::-1]]
    if spacing == "trailing":
        return [int(t) for t in np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1]
    if spacing == "karras":
        raise ValueError("karras spacing depends on the noise schedule: use schedule_timesteps")
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")


EDM_SIGMA_MAX = 80.0  # Karras et al.'s σ_max (under zero terminal SNR the schedule's σ reaches ∞)


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> list[int]:
    """Descending timesteps whose σ_t follow Karras et al.'s Eq. 5 between the schedule's largest
    finite σ (at most EDM's 80) and its smallest,

        σ_i = (σ_max^(1/ρ) + i/(S−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,

    each mapped to the trained timestep of nearest log σ (one step higher where two would
    coincide, at the quiet end). The first is always T − 1, the noisiest step (σ = ∞ under zero
    terminal SNR)."""
    if not 2 <= steps <= schedule.steps:
        raise ValueError(f"karras spacing needs between 2 and {schedule.steps} steps, got {steps}")
    sigmas = schedule.sigma(torch.arange(schedule.steps)).double().numpy()
    largest = min(sigmas[np.isfinite(sigmas)].max(), EDM_SIGMA_MAX)
    log_sigmas = np.log(sigmas)
    high, low = largest ** (1 / rho), sigmas[0] ** (1 / rho)
    nearest = [int(np.abs(log_sigmas - np.log(target)).argmin())
               for target in (high + np.linspace(0, 1, steps)[1:] * (low - high)) ** rho]
    ascending = []
    for t in reversed(nearest):  # from the quietest step up, so that the low end stays at t = 0
        ascending.append(t if not ascending or t > ascending[-1] else ascending[-1] + 1)
    if ascending[-1] >= schedule.steps - 1:
        raise ValueError(f"karras spacing: {steps} steps do not fit in {schedule.steps} timesteps")
    return [schedule.steps - 1] + ascending[::-1]


def schedule_timesteps(schedule: NoiseSchedule, steps: int, spacing: str) -> list[int]:
    """The descending timesteps an S-step sampler visits on ``schedule`` with ``spacing``."""
    if spacing == "karras":
        return karras_timesteps(schedule, steps)
    return sampling_timesteps(schedule.steps, steps, spacing)


def _full(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _steps(schedule: NoiseSchedule, steps: int, spacing: str, final_alpha: float | None):
    """(i, t, ᾱ_t, ᾱ_t′) for each sampled step, t′ the next sampled step; after the last one
    ᾱ_t′ is ``final_alpha`` (None: ᾱ_0, as CompVis' DDIM)."""
    acp = schedule.alphas_cumprod
    timesteps = schedule_timesteps(schedule, steps, spacing)
    final = acp[0].item() if final_alpha is None else final_alpha
    for i, t in enumerate(timesteps):
        yield i, t, acp[t].item(), acp[timesteps[i + 1]].item() if i + 1 < len(timesteps) else final


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor, cond=None, *,
                steps: int = 50, eta: float = 0.0, spacing: str = "leading", prediction: str = "eps",
                generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Run DDIM from ``noise`` (x_T); returns x_0. ``callback(i, t, x_t, x0_pred)`` sees every step."""
    x = noise
    for i, t, a_t, a_prev in _steps(schedule, steps, spacing, final_alpha=None):
        output = denoiser(x, _full(t, x), cond).float()
        x0 = schedule.predicted_x0(prediction, output, x, _full(t, x))
        eps = schedule.predicted_eps(prediction, output, x, _full(t, x))
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        if callback is not None:
            callback(i, t, x, x0)
        x_prev = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x_prev
    return x


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, schedule: NoiseSchedule, noise: torch.Tensor, cond=None, *,
                steps: int = 1000, spacing: str = "leading", prediction: str = "eps",
                generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Ancestral sampling from ``noise``; with ``steps`` < T the posterior spans the stride."""
    x = noise
    for i, t, a_t, a_prev in _steps(schedule, steps, spacing, final_alpha=1.0):
        beta = 1 - a_t / a_prev
        output = denoiser(x, _full(t, x), cond).float()
        x0 = schedule.predicted_x0(prediction, output, x, _full(t, x))
        if callback is not None:
            callback(i, t, x, x0)
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if i + 1 < steps:
            variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            mean = mean + variance ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean
    return x


def _concat(a, b):
    """Concatenate two conditions (tensors, or dicts/tuples of tensors) along the batch."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _concat(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_concat(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot batch a condition of type {type(a).__name__}")


class ClassifierFreeGuidance:
    """``denoiser`` guided with scale ``s``: ``out_u + s·(out_c − out_u)``, where ``out_u`` is the
    prediction under ``null_cond`` (the dropped condition the model was trained with). Same
    signature as the denoiser. Guiding v or x₀ outputs is the same linear combination."""

    def __init__(self, denoiser: Denoiser, scale: float, null_cond):
        self.denoiser, self.scale, self.null_cond = denoiser, scale, null_cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, t, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), _concat(self.null_cond, cond))
        unconditional, conditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)
