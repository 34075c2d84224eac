import pytest
import torch

from minildm.autoencoder import AutoencoderKL, DiagonalGaussian
from minildm.config import AutoencoderConfig


def small(**kw) -> AutoencoderConfig:
    return AutoencoderConfig(**{"channels": 8, "disc_channels": 8, **kw})


@pytest.mark.parametrize("mult, factor", [((1, 2), 2), ((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_shapes_through_encode_and_decode_for_each_factor(mult, factor):
    model = AutoencoderKL(small(channel_mult=mult))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    latent = model.encode(x)
    assert model.factor == factor and latent.shape == (2, 4, 32 // factor, 32 // factor)
    assert model.latent_shape() == (4, 32 // factor, 32 // factor)
    assert model.decode(latent).shape == (2, 3, 32, 32)
    reconstruction, posterior = model(x)
    assert reconstruction.shape == x.shape and posterior.mean.shape == latent.shape


def test_kl_matches_the_closed_form_and_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)
    ours = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, 1)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    assert torch.allclose(ours.kl(), expected, atol=1e-5)
    assert torch.allclose(ours.kl(), DiagonalGaussianDistribution(moments).kl(), atol=1e-5)
    # KL(N(0, I) ‖ N(0, I)) = 0
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_log_variance_is_clamped():
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], 1))
    assert float(posterior.logvar.max()) == 20.0
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), -100.0)], 1))
    assert float(posterior.logvar.min()) == -30.0


def test_scale_factor_is_measured_stored_and_applied():
    torch.manual_seed(0)
    model = AutoencoderKL(small())
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    raw = model.posterior(x).mode()
    factor = model.measure_scale_factor(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model.posterior(x).sample(torch.Generator().manual_seed(0))
    assert abs(factor - 1 / float(z.std())) < 1e-4
    assert torch.allclose(model.encode(x), raw * factor)
    assert torch.allclose(model.decode(model.encode(x)), model.decode_raw(raw), atol=1e-5)
    assert "scale_factor" in model.state_dict()


def test_bad_images_are_clear_errors():
    model = AutoencoderKL(small())
    with pytest.raises(ValueError, match="not divisible by .* f = 4"):
        model.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 3, 8, 8))
