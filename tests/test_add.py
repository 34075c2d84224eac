"""ADD's pieces: the student's input, the distillation weighting and loss, the sampler, and the
StyleGAN-T discriminator with its hinge losses and R1 on the heads' inputs."""

import math

import pytest
import torch

from minildm.add import add_sample, distillation_loss, distillation_weight, sampling_timesteps, student_input
from minildm.config import ClipConfig
from minildm.diffusion import NoiseSchedule
from minildm.discriminator import (BatchNormLocal, DiscriminatorHead, ProjectedDiscriminator, diff_augment,
                                   generator_adversarial_loss, hinge_discriminator_loss, r1_penalty)
from minildm.encoders import tiny_encoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = tiny_encoder(ClipConfig(vision_width=16, vision_layers=2, text_width=16, text_layers=1, heads=2,
                                  projection_dim=8))
    return enc.eval().requires_grad_(False)


def test_the_student_sees_pure_noise_at_the_top_timestep_and_the_forward_process_below():
    schedule = NoiseSchedule()
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    s = torch.tensor([999, 749, 499, 249])
    x_s = student_input(schedule, x0, noise, s, top=999)
    assert torch.equal(x_s[0], noise[0]), "no trace of x0 at the top (zero terminal SNR, as at inference)"
    assert torch.allclose(x_s[1:], schedule.add_noise(x0, noise, s)[1:])


def test_distillation_weightings_are_alpha_and_the_sds_one():
    schedule = NoiseSchedule()
    t = torch.tensor([10, 500, 990])
    like = torch.zeros(3, 4, 8, 8)
    acp = schedule.alphas_cumprod[t]
    exp = distillation_weight(schedule, t, "exponential", like).flatten()
    sds = distillation_weight(schedule, t, "sds", like).flatten()
    assert torch.allclose(exp, acp.sqrt())
    assert torch.allclose(sds, acp.sqrt() / (2 * (1 - acp).sqrt()))
    assert exp[0] > exp[1] > exp[2], "higher noise counts less"
    assert torch.equal(distillation_weight(schedule, t, "constant", like).flatten(), torch.ones(3))
    with pytest.raises(ValueError, match="weighting"):
        distillation_weight(schedule, t, "nfsd", like)


def test_the_sds_weighting_gives_the_sds_gradient():
    """ADD App. A: with c(t) = α_t/(2σ_t), ∇ of c·‖x̂ − x̂_ψ‖² is w·(ε̂_ψ − ε′) (w = 1 here)."""
    schedule = NoiseSchedule()
    t = torch.tensor([300])
    acp = schedule.alphas_cumprod[t]
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    x_hat = torch.randn(1, 4, 8, 8, requires_grad=True)
    eps_prime, eps_teacher = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x_t = alpha * x_hat.detach() + sigma * eps_prime
    teacher_x0 = (x_t - sigma * eps_teacher) / alpha
    weight = distillation_weight(schedule, t, "sds", x_hat)
    loss = (weight * (x_hat - teacher_x0).pow(2)).sum()
    loss.backward()
    assert torch.allclose(x_hat.grad, eps_teacher - eps_prime, atol=1e-4)


def test_the_distillation_target_carries_no_gradient():
    student = torch.randn(2, 3, requires_grad=True)
    target = torch.randn(2, 3, requires_grad=True)
    distillation_loss(student, target, torch.ones(2, 1)).backward()
    assert student.grad is not None and target.grad is None


def test_sampling_timesteps_follow_the_trailing_spacing():
    ts = (999, 749, 499, 249)
    assert sampling_timesteps(ts, 1) == [999]
    assert sampling_timesteps(ts, 2) == [999, 499]
    assert sampling_timesteps(ts, 4) == [999, 749, 499, 249]


def test_one_step_is_one_evaluation_and_more_steps_renoise_the_prediction():
    schedule = NoiseSchedule()
    calls = []

    def denoise(x, t, cond):
        calls.append((x.clone(), int(t[0])))
        return torch.full_like(x, 0.5)

    noise = torch.randn(2, 4, 8, 8)
    out = add_sample(denoise, schedule, noise, None, [999])
    assert len(calls) == 1 and torch.equal(calls[0][0], noise) and calls[0][1] == 999
    assert torch.equal(out, torch.full_like(noise, 0.5))
    calls.clear()
    add_sample(denoise, schedule, noise, None, [999, 499], generator=torch.Generator().manual_seed(0))
    assert [t for _, t in calls] == [999, 499]
    x_499 = calls[1][0]
    acp = schedule.alphas_cumprod[499]
    fresh = (x_499 - acp.sqrt() * 0.5) / (1 - acp).sqrt()  # the noise it was re-noised with
    assert abs(float(fresh.std()) - 1) < 0.2 and not torch.allclose(fresh, noise), "fresh noise, not the first"


def test_hinge_losses():
    real, fake = torch.tensor([[2.0, 0.5]]), torch.tensor([[-2.0, 0.5]])
    # real: max(0, 1-2)=0, max(0, 1-0.5)=0.5 → 0.25; fake: max(0, 1-2)=0, max(0, 1.5)=1.5 → 0.75
    assert math.isclose(float(hinge_discriminator_loss(real, fake)), 1.0)
    assert math.isclose(float(generator_adversarial_loss(fake)), 0.75)


def test_batch_norm_local_normalises_each_group_alone():
    norm = BatchNormLocal(3, virtual_batch=2)
    x = torch.randn(4, 3, 5)
    x[2:] = x[2:] * 10 + 7
    y = norm(x)
    for group in (y[:2], y[2:]):
        assert torch.allclose(group.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(group.var(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3)


def test_a_head_gives_one_logit_per_token_and_uses_the_condition():
    torch.manual_seed(0)
    head = DiscriminatorHead(channels=16, c_dim=6, cmap_dim=8)
    features = torch.randn(4, 16, 10)
    a = head(features, torch.randn(4, 6))
    b = head(features, torch.randn(4, 6))
    assert a.shape == (4, 10)
    assert not torch.allclose(a, b), "projection conditioning: another condition, other logits"


def test_the_feature_network_is_frozen_and_not_among_the_discriminator_parameters(encoder):
    disc = ProjectedDiscriminator(encoder, c_dim=16, cmap_dim=8, augment=False)
    vision_layers = encoder.clip.config.vision_config.num_hidden_layers
    assert len(disc.heads) == vision_layers + 1, "a head on the patch embedding and on every block"
    own = {id(p) for p in disc.parameters()}
    assert not own & {id(p) for p in encoder.parameters()}
    assert set(disc.state_dict()) == {k for k in disc.state_dict() if k.startswith("heads.")}
    disc.requires_grad_(True)  # what the training loop does before the critic's step
    assert not any(p.requires_grad for p in encoder.parameters())
    images = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    logits = disc(images, torch.randn(4, 16))
    tokens = (32 // encoder.clip.config.vision_config.patch_size) ** 2
    assert logits.shape == (4, len(disc.heads) * tokens)
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0, "the generator's gradient flows through F"


def test_r1_is_on_the_heads_inputs_and_trains_the_heads(encoder):
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(encoder, c_dim=16, cmap_dim=8, augment=False)
    images, condition = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 16)
    features = disc.features(images)
    penalty = r1_penalty(disc, features, condition)
    # the same quantity by hand: the squared gradient of the summed logits wrt each head's input
    inputs = [f.detach().clone().requires_grad_(True) for f in features]
    grads = torch.autograd.grad(disc.heads_forward(inputs, condition).sum(), inputs)
    expected = sum(g.pow(2).flatten(1).sum(1).mean() for g in grads)
    assert torch.allclose(penalty, expected, rtol=1e-3)
    penalty.backward()
    assert all(p.grad is not None for p in disc.heads[0].cmapper.parameters()), "double backward reaches the heads"


def test_diff_augment_shifts_and_cuts_but_keeps_the_gradient():
    torch.manual_seed(0)
    images = torch.ones(8, 3, 32, 32, requires_grad=True)
    out = diff_augment(images)
    assert out.shape == images.shape
    zeros = (out == 0).flatten(1).float().mean(1)
    assert (zeros > 0).all() and (zeros < 0.5).all(), "a border shift and a cut-out square, no more"
    out.sum().backward()
    assert images.grad.sum() > 0
