"""The schedule, the targets and the samplers against diffusers' schedulers (ldm.md §4.5)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding

from minildm.diffusion import NoiseSchedule, timestep_embedding
from minildm.samplers import (ClassifierFreeGuidance, ddim_sample, ddpm_sample, karras_timesteps, sampling_timesteps,
                              schedule_timesteps)

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          clip_sample=False)


def test_betas_and_alphas_cumprod_match_diffusers_and_the_known_values():
    schedule = NoiseSchedule()
    reference = DDPMScheduler(**SD)
    torch.testing.assert_close(schedule.betas, reference.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-6, rtol=0)
    assert float(schedule.alphas_cumprod[0]) == pytest.approx(0.99915, abs=1e-6)
    assert float(schedule.alphas_cumprod[-1]) == pytest.approx(0.0046601, abs=1e-6)


def test_zero_terminal_snr_matches_diffusers():
    schedule = NoiseSchedule(zero_terminal_snr=True)
    reference = DDIMScheduler(**SD, rescale_betas_zero_snr=True)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(schedule.alphas_cumprod[:-1], reference.alphas_cumprod[:-1], atol=1e-6, rtol=0)
    assert float(schedule.alphas_cumprod[0]) == pytest.approx(float(NoiseSchedule().alphas_cumprod[0]), abs=1e-7)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("steps", [1, 4, 10, 50])
def test_timesteps_match_diffusers(spacing, offset, steps):
    reference = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    reference.set_timesteps(steps)
    assert sampling_timesteps(1000, steps, spacing) == reference.timesteps.tolist()
    assert sampling_timesteps(1000, 50, "leading")[:2] == [981, 961]
    assert sampling_timesteps(1000, 50, "trailing")[:2] == [999, 979]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 333, 500, 501, 999, 1000])
def test_every_step_count_visits_distinct_timesteps_of_the_schedule(spacing, steps):
    timesteps = sampling_timesteps(1000, steps, spacing)
    assert len(timesteps) == steps and all(a > b for a, b in zip(timesteps, timesteps[1:]))
    assert 0 <= timesteps[-1] and timesteps[0] <= 999, "every sampled t is one the model was trained on"
    if steps == 1000:
        assert timesteps == list(range(999, -1, -1))


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_karras_spacing_follows_edm_sigmas(zero_terminal_snr):
    schedule = NoiseSchedule(zero_terminal_snr=zero_terminal_snr)
    timesteps = karras_timesteps(schedule, 50)
    assert timesteps[0] == 999 and len(timesteps) == 50 and timesteps[-1] >= 0
    assert all(a > b for a, b in zip(timesteps, timesteps[1:])), "strictly descending"
    assert schedule_timesteps(schedule, 50, "karras") == timesteps
    sigmas = schedule.sigma(torch.tensor(timesteps)).double()
    if not zero_terminal_snr:  # EDM's Eq. 5 between the schedule's extremes: σ^(1/7) is linear in the step
        ends = schedule.sigma(torch.tensor([999, 0])).double()
        expected = (ends[0] ** (1 / 7) + torch.linspace(0, 1, 50, dtype=torch.float64) * (ends[1] ** (1 / 7) - ends[0] ** (1 / 7))) ** 7
        middle = slice(1, 30)  # before the low-noise end, where neighbouring steps share a timestep
        assert torch.allclose(sigmas[middle].log(), expected[middle].log(), atol=0.05)
        uniform = sampling_timesteps(1000, 50, "leading")
        assert timesteps[35] < uniform[35] / 2, "most of EDM's steps are at low noise"
    else:  # σ = ∞ at T − 1, then EDM's σ_max = 80
        assert float(sigmas[0]) == float("inf") and float(sigmas[1]) == pytest.approx(80, rel=0.1)
    with pytest.raises(ValueError, match="schedule_timesteps"):
        sampling_timesteps(1000, 50, "karras")


def test_timestep_embedding_is_cos_first_like_diffusers():
    t = torch.tensor([0, 1, 17, 500, 999])
    for dim in (32, 33, 320):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(t, dim), expected, atol=1e-5, rtol=1e-5)


def test_targets_and_conversions_are_consistent():
    schedule = NoiseSchedule()
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, DDPMScheduler(**SD).add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.target("v", x0, noise, t), DDPMScheduler(**SD).get_velocity(x0, noise, t),
                               atol=1e-5, rtol=1e-5)
    for prediction in ("eps", "v", "x0"):
        output = schedule.target(prediction, x0, noise, t)
        torch.testing.assert_close(schedule.predicted_x0(prediction, output, x_t, t), x0, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(schedule.predicted_eps(prediction, output, x_t, t)[1:], noise[1:], atol=2e-3, rtol=1e-3)


def test_sigma_view():
    schedule = NoiseSchedule()
    t = torch.tensor([0, 500, 999])
    acp = schedule.alphas_cumprod[t]
    torch.testing.assert_close(schedule.sigma(t), ((1 - acp) / acp).sqrt())
    assert schedule.timestep_of_sigma(float(schedule.sigma(torch.tensor([321])))) == 321
    torch.testing.assert_close(schedule.snr(t), 1 / schedule.sigma(t) ** 2, rtol=1e-4, atol=0)


def test_posterior_matches_diffusers_ddpm_step():
    schedule = NoiseSchedule()
    reference = DDPMScheduler(**SD, prediction_type="sample")  # the model "predicts" x0 exactly
    generator = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    for t in (1, 10, 500, 999):
        mean, variance = schedule.posterior(x0, x_t, torch.tensor([t, t]))
        torch.testing.assert_close(variance.flatten()[0], reference._get_variance(t), atol=1e-8, rtol=1e-4)
        step = reference.step(x0, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(step, mean + variance.sqrt() * z, atol=2e-4, rtol=1e-4)  # float32 vs float64 betas


def _toy_denoiser(x, t, cond):
    """A fixed, nonlinear function of (x, t), standing in for a network."""
    return torch.tanh(x * 0.7 + t.float().view(-1, 1, 1, 1) / 1000.0) * 0.9


@pytest.mark.parametrize("prediction,diffusers_name", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_ddim_step_matches_diffusers(prediction, diffusers_name, spacing, offset, eta):
    steps = 10
    reference = DDIMScheduler(**SD, set_alpha_to_one=False, steps_offset=offset, timestep_spacing=spacing,
                              prediction_type=diffusers_name)
    reference.set_timesteps(steps)
    noises = torch.randn(steps, 2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = start.clone()
    for i, t in enumerate(reference.timesteps):
        output = _toy_denoiser(x, torch.full((2,), int(t)), None)
        x = reference.step(output, t, x, eta=eta, variance_noise=noises[i]).prev_sample
    # ours, with the same per-step noise drawn from a generator that replays `noises`
    replay = iter(noises)
    original_randn = torch.randn

    def fake_randn(*args, **kwargs):
        return next(replay).clone()

    torch.randn = fake_randn
    try:
        ours = ddim_sample(_toy_denoiser, NoiseSchedule(), start.clone(), steps=steps, eta=eta,
                           spacing=spacing, prediction=prediction)
    finally:
        torch.randn = original_randn
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_ddpm_sampling_matches_diffusers():
    steps = 20
    reference = DDPMScheduler(**SD, steps_offset=1)
    reference.set_timesteps(steps)
    assert reference.timesteps.tolist() == sampling_timesteps(1000, steps, "leading")
    start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    x = start.clone()
    generator = torch.Generator().manual_seed(5)
    for t in reference.timesteps:
        x = reference.step(_toy_denoiser(x, torch.full((2,), int(t)), None), t, x, generator=generator).prev_sample
    ours = ddpm_sample(_toy_denoiser, NoiseSchedule(), start.clone(), steps=steps,
                       generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_guidance_with_scale_zero_and_one():
    def denoiser(x, t, cond):
        return x * cond["scale"].view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1)

    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    cond, null = {"scale": torch.tensor([2.0, 3.0, 4.0])}, {"scale": torch.zeros(3)}
    torch.testing.assert_close(ClassifierFreeGuidance(denoiser, 1.0, null)(x, t, cond), denoiser(x, t, cond))
    torch.testing.assert_close(ClassifierFreeGuidance(denoiser, 0.0, null)(x, t, cond), denoiser(x, t, null))
    guided = ClassifierFreeGuidance(denoiser, 3.0, null)(x, t, cond)
    torch.testing.assert_close(guided, denoiser(x, t, null) + 3.0 * (denoiser(x, t, cond) - denoiser(x, t, null)))
