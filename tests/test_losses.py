import torch

from minildm.losses import JudgePerceptual, PatchDiscriminator, adaptive_weight, hinge_d_loss
from minildm.nn import SelfAttention2d


def test_hinge_loss_values():
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == 1.0
    assert abs(float(hinge_d_loss(torch.full((4,), 0.5), torch.full((4,), 0.5))) - 0.5 * (0.5 + 1.5)) < 1e-6


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    last = torch.randn(5, requires_grad=True)
    nll = (3.0 * last).sum()  # gradient 3 per element
    g_loss = (0.5 * last).sum()  # gradient 0.5 per element
    weight = adaptive_weight(nll, g_loss, last, disc_weight=0.5)
    expected = (3 * 5**0.5) / (0.5 * 5**0.5 + 1e-4) * 0.5
    assert abs(float(weight) - expected) < 1e-4 and not weight.requires_grad


def test_patch_discriminator_outputs_a_map_of_logits():
    logits = PatchDiscriminator(8, 2)(torch.zeros(2, 3, 32, 32))
    assert logits.ndim == 4 and logits.shape[:2] == (2, 1) and logits.shape[-1] > 1


def test_judge_perceptual_is_zero_on_identical_images_and_frozen():
    from minildm.config import JudgeConfig
    from minildm.judge import Judge

    perceptual = JudgePerceptual(Judge(JudgeConfig(widths=(8, 8, 8), feature_dim=8)))
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(perceptual(x, x), torch.zeros(2))
    assert (perceptual(x, x.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in perceptual.parameters())


def test_self_attention_matches_a_plain_softmax():
    torch.manual_seed(0)
    block = SelfAttention2d(8)
    x = torch.randn(2, 8, 4, 4)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (B, N, N)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(2, 8, 4, 4))
    assert torch.allclose(block(x), expected, atol=1e-5)
