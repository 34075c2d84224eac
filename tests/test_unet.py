"""The attention module (against SDPA), its hook point, and the UNet's shapes, init and routes."""

import pytest
import torch
import torch.nn.functional as F

from minildm.attention import Attention, AttentionHook, AttentionStore, SpatialTransformer, install_hook
from minildm.config import UNetConfig
from minildm.unet import UNet


def _reference(attn: Attention, x, context=None, mask=None):
    source = x if context is None else context
    split = lambda y: y.view(y.shape[0], y.shape[1], attn.heads, attn.dim_head).transpose(1, 2)
    q, k, v = split(attn.to_q(x)), split(attn.to_k(source)), split(attn.to_v(source))
    bool_mask = None if mask is None else mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
    return attn.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_scaled_dot_product_attention(cross):
    torch.manual_seed(0)
    attn = Attention(32, 24 if cross else None, heads=4, dim_head=8)
    x = torch.randn(3, 10, 32)
    context = torch.randn(3, 6, 24) if cross else None
    torch.testing.assert_close(attn(x, context), _reference(attn, x, context), atol=1e-5, rtol=1e-5)
    if cross:
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
        torch.testing.assert_close(attn(x, context, mask), _reference(attn, x, context, mask), atol=1e-5, rtol=1e-5)
        # padding keys change nothing once masked
        torch.testing.assert_close(attn(x[1:2], context[1:2, :3]), attn(x, context, mask)[1:2], atol=1e-5, rtol=1e-5)


def test_the_hook_records_maps_and_adds_a_bias():
    torch.manual_seed(0)
    attn = Attention(16, 8, heads=2, dim_head=8)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 5, 8)
    store = AttentionStore()
    attn.hook = store
    plain = attn(x, context, spatial=(2, 2))
    (probs,) = store.maps[""]
    assert probs.shape == (2, 2, 4, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 4))

    class OnlyToken3(AttentionHook):
        def bias(self, scores, info):
            assert info["spatial"] == (2, 2) and info["kind"] == "cross"
            bias = torch.full_like(scores, -1e4)
            bias[..., 3] = 0
            return bias

    attn.hook = OnlyToken3()
    forced = attn(x, context, spatial=(2, 2))
    expected = attn.to_out(attn.to_v(context)[:, 3:4].expand(2, 4, 16))
    torch.testing.assert_close(forced, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(forced, plain)


def test_spatial_transformer_starts_as_the_identity():
    block = SpatialTransformer(16, 8, heads=2, dim_head=8)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 3, 8)), x)


def test_unet_shapes_zero_init_and_every_conditioning_route():
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), heads=2, context_dim=8, concat_channels=1, pooled_dim=6)
    unet = UNet(cfg)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0, 999])
    cond = {"context": torch.randn(2, 3, 8), "mask": torch.ones(2, 3), "concat": torch.randn(2, 1, 8, 8),
            "pooled": torch.randn(2, 6)}
    assert torch.equal(unet(x, t, cond), torch.zeros(2, 4, 8, 8)), "conv_out starts at zero"
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    for module in unet.modules():  # wake every zero-initialised layer
        if hasattr(module, "conv2"):
            torch.nn.init.normal_(module.conv2.weight, std=0.1)
        if isinstance(module, SpatialTransformer):
            torch.nn.init.normal_(module.proj_out.weight, std=0.1)
    out = unet(x, t, cond)
    assert out.shape == (2, 4, 8, 8)
    for key, other in [("context", torch.randn(2, 3, 8)), ("concat", torch.randn(2, 1, 8, 8)), ("pooled", torch.randn(2, 6))]:
        assert not torch.allclose(unet(x, t, {**cond, key: other}), out), f"{key} reaches the output"
    assert not torch.allclose(unet(x, torch.tensor([5, 500]), cond), out), "the timestep reaches the output"


def test_install_hook_names_every_attention_layer():
    unet = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), heads=2, context_dim=8))
    names = install_hook(unet, AttentionStore())
    assert "middle.1.blocks.0.attn2" in names and all(n.endswith(("attn1", "attn2")) for n in names)
    store = AttentionStore()
    install_hook(unet, store)
    unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), {"context": torch.randn(1, 3, 8)})
    assert set(store.maps) == {n for n in names if n.endswith("attn2")}
    assert store.maps["middle.1.blocks.0.attn2"][0].shape == (1, 2, 16, 3)  # 4×4 pixels at the middle
    install_hook(unet, None)
    assert all(m.hook is None for m in unet.modules() if isinstance(m, Attention))


def test_encoder_features_are_each_levels_last_map_and_the_middle():
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1,), heads=2,
                     context_dim=8)
    unet = UNet(cfg)
    for module in unet.modules():  # wake the zero-initialised layers, as training would
        if hasattr(module, "conv2"):
            torch.nn.init.normal_(module.conv2.weight, std=0.1)
        if isinstance(module, SpatialTransformer):
            torch.nn.init.normal_(module.proj_out.weight, std=0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0, 999])
    cond = {"context": torch.randn(2, 3, 8), "mask": torch.ones(2, 3)}
    maps = unet.encoder_features(x, t, cond)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 8, 8), (32, 4, 4), (32, 2, 2), (32, 2, 2)]
    assert [m.shape[1] for m in maps] == unet.encoder_channels
    torch.nn.init.normal_(unet.up[0][0].conv1.weight)  # the decoder half does not take part
    assert all(torch.equal(a, b) for a, b in zip(maps, unet.encoder_features(x, t, cond)))
    later = unet.encoder_features(x, torch.tensor([500, 500]), cond)
    assert not torch.allclose(later[0], maps[0]), "the maps are read at a timestep"
    other = unet.encoder_features(x, t, {**cond, "context": torch.randn(2, 3, 8)})
    assert not torch.allclose(other[1], maps[1]), "and under the caption (cross-attention at level 1)"
