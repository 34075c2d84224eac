"""Adversarial Diffusion Distillation (Sauer et al. 2023): the student's input, the distillation
target and loss, and few-step sampling. The discriminator is in :mod:`minildm.discriminator`,
the training task in :mod:`minildm.stages.add`.

Three networks (Sec. 3.1): the **student** x̂_θ (initialised from the teacher, trained), the
**discriminator** (a frozen ViT with trained heads) and the frozen **teacher** ψ. Per batch:

1. the student's input is a real latent noised at a student timestep s ∈ T_student,
   x_s = α_s·x₀ + σ_s·ε, and the student denoises it in one step: x̂_θ(x_s, s);
2. the adversarial loss (Eq. 2) asks the discriminator to take x̂_θ for real;
3. the distillation loss (Eq. 4) re-noises the student's sample at a teacher timestep t,
   x̂_θ,t = α_t·sg(x̂_θ) + σ_t·ε′, and pulls x̂_θ toward the teacher's one-step denoising of it:

       L_distill = E_t,ε′ [ c(t) · ‖x̂_θ − sg(x̂_ψ(x̂_θ,t, t))‖² ]

   with c(t) = α_t ("exponential", the paper's default) or α_t/(2σ_t) (the SDS weighting: its
   gradient is then exactly Score Distillation Sampling's, App. A);
4. L = L_adv^G + λ·L_distill with λ = 2.5.

(Here α_t = √ᾱ_t and σ_t = √(1−ᾱ_t) are the forward process' coefficients, not eDiff-I's σ.)

The student timesteps are {999, 749, 499, 249} (the paper names only τ_n = 1000; this is
diffusers' "trailing" four-step choice for SDXL-Turbo). The paper enforces zero terminal SNR
so that the student's top-timestep input carries no trace of x₀, as at inference. The reference
teacher was trained on the ordinary schedule (ᾱ_999 ≈ 0.005), so minildm does what DMD2 does:
at the top timestep the student's input is pure noise, and x₀ is read from the student's
v-prediction with the schedule's own coefficients (well defined, unlike ε-prediction at ᾱ = 0).
"""

from __future__ import annotations

import torch

from minildm.diffusion import NoiseSchedule, _gather

WEIGHTINGS = ("exponential", "sds", "constant")


def student_input(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor,
                  top: int) -> torch.Tensor:
    """x_s = α_s·x₀ + σ_s·ε; pure noise where s is the top student timestep (as at inference)."""
    x_s = schedule.add_noise(x0, noise, s)
    at_top = (s == top).view(-1, *([1] * (x0.dim() - 1)))
    return torch.where(at_top, noise, x_s)


def distillation_weight(schedule: NoiseSchedule, t: torch.Tensor, weighting: str, like: torch.Tensor) -> torch.Tensor:
    """c(t) of Eq. 4, shaped to broadcast over ``like``: α_t ("exponential"), α_t/(2σ_t) ("sds"), or
    1 ("constant", the public diffusers port's third option: every t counts alike)."""
    acp = _gather(schedule.alphas_cumprod, t, like)
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    if weighting == "exponential":
        return alpha
    if weighting == "sds":
        return alpha / (2 * sigma)
    if weighting == "constant":
        return torch.ones_like(alpha)
    raise ValueError(f"unknown distillation weighting {weighting!r}; choose one of {WEIGHTINGS}")


def distillation_loss(student: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E c(t)·‖x̂_θ − x̂_ψ‖² (a mean over samples and elements); ``target`` carries no gradient."""
    return (weight * (student.float() - target.detach().float()).pow(2)).mean()


@torch.no_grad()
def add_sample(denoise_x0, schedule: NoiseSchedule, noise: torch.Tensor, cond, timesteps: list[int],
               generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """ADD's sampler (Sec. 3.1, Fig. 4): from pure noise at ``timesteps[0]``, predict x₀; while
    timesteps remain, re-noise the prediction with fresh noise to the next one and predict again.
    ``denoise_x0(x_t, t, cond) → x̂₀``. One timestep: a single network evaluation. No guidance."""
    x = noise
    x0 = noise
    for i, step in enumerate(timesteps):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        x0 = denoise_x0(x, t, cond)
        if callback is not None:
            callback(i, step, x, x0)
        if i + 1 < len(timesteps):
            fresh = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            x = schedule.add_noise(x0, fresh, torch.full_like(t, timesteps[i + 1]))
    return x0


def sampling_timesteps(student_timesteps: tuple[int, ...], steps: int) -> list[int]:
    """The first ``steps`` of the student's timesteps, spread evenly: 1 → [999], 2 → [999, 499],
    4 → [999, 749, 499, 249] (diffusers' "trailing" spacing)."""
    top = max(student_timesteps)
    if steps == len(student_timesteps):
        return sorted(student_timesteps, reverse=True)
    return [int(round(top + 1 - k * (top + 1) / steps)) - 1 for k in range(steps)]
