"""Attention for the UNet: one module for self- and cross-attention, with a hook point.

LDM's conditioning mechanism (Sec. 3.3): at chosen resolutions the UNet's feature map
φ(z_t) ∈ R^{N×d} (N = H·W pixels) attends to the condition's tokens τ(y) ∈ R^{L×d_τ}:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_head) · V,    Q = W_Q φ(z_t),  K = W_K τ(y),  V = W_V τ(y).

With no context it is self-attention over the pixels. :class:`Attention` computes the softmax
**explicitly** (CompVis' ``CrossAttention``) rather than through
``F.scaled_dot_product_attention``, for two reasons:

* the maps are there to look at: a :class:`AttentionHook` installed on a module can **record**
  the probabilities (B, heads, N, L) — the notebook's attention viewer — and **add a bias** to
  the scores before the softmax — eDiff-I's paint-with-words;
* on the course's 2-core CPU the explicit matmul–softmax was measured faster than SDPA at these
  sizes (``minildm bench`` keeps the figure).

:class:`SpatialTransformer` is CompVis' block: GroupNorm → 1×1 conv in → [self-attention,
cross-attention, GEGLU feed-forward, each pre-LayerNorm and residual] → zero-initialised 1×1
conv out → + the input. The zero init makes each block start as the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minildm.nn import normalization


class AttentionHook:
    """Installed as ``module.hook`` on :class:`Attention` modules. Override either method.

    ``info`` describes the call: ``{"name": module name, "kind": "self" | "cross",
    "spatial": (H, W) of the feature map}``.
    """

    def bias(self, scores: torch.Tensor, info: dict) -> torch.Tensor | None:
        """An additive bias for the scores (B, heads, N, L), or None."""
        return None

    def record(self, probs: torch.Tensor, info: dict) -> None:
        """See the attention probabilities (B, heads, N, L)."""


class Attention(nn.Module):
    """Multi-head attention of ``x`` (B, N, query_dim) over ``context`` (B, L, context_dim), or
    over itself; ``mask`` (B, L) is 1 for keys to attend to. q, k, v have no bias (CompVis)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 4, dim_head: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        self.name = ""  # set by the UNet, so hooks know which layer they see
        self.hook: AttentionHook | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, h·d) → (B, h, N, d)
        return x.view(x.shape[0], x.shape[1], self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                spatial: tuple[int, int] | None = None) -> torch.Tensor:
        source = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(source)), self._split(self.to_v(source))
        scores = (q @ k.transpose(-1, -2)).float() * self.scale  # (B, h, N, L), softmax in float32
        info = None
        if self.hook is not None:
            info = {"name": self.name, "kind": "cross" if self.is_cross else "self", "spatial": spatial}
            bias = self.hook.bias(scores, info)
            if bias is not None:
                scores = scores + bias
        if mask is not None and context is not None:
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        if self.hook is not None:
            self.hook.record(probs, info)
        out = probs.to(v.dtype) @ v  # (B, h, N, d)
        return self.to_out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class GEGLU(nn.Module):
    """x·GELU(gate) with [x, gate] = Linear(x) (Shazeer 2020; CompVis' ``GEGLU``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and feed-forward, each residual
    (CompVis' ``BasicTransformerBlock``)."""

    def __init__(self, dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, None, heads, dim_head)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads, dim_head) if context_dim else None
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim, dropout=dropout)

    def forward(self, x, context=None, mask=None, spatial=None):
        x = x + self.attn1(self.norm1(x), spatial=spatial)
        if self.attn2 is not None and context is not None:
            x = x + self.attn2(self.norm2(x), context, mask, spatial=spatial)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A feature map (B, C, H, W) through ``depth`` transformer blocks over its H·W positions."""

    def __init__(self, channels: int, context_dim: int | None, heads: int, dim_head: int, depth: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = normalization(channels)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.blocks = nn.ModuleList(TransformerBlock(inner, context_dim, heads, dim_head, dropout) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight), nn.init.zeros_(self.proj_out.bias)  # starts as the identity

    def forward(self, x: torch.Tensor, context=None, mask=None) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, inner)
        for block in self.blocks:
            hidden = block(hidden, context, mask, spatial=(h, w))
        return x + self.proj_out(hidden.transpose(1, 2).reshape(b, -1, h, w))


class AttentionStore(AttentionHook):
    """Records cross-attention probabilities per layer: ``maps[name]`` is a list, one entry per
    call (one per sampling step), of (B, heads, N, L) tensors on the CPU."""

    def __init__(self, kinds=("cross",)):
        self.kinds, self.maps = kinds, {}

    def record(self, probs, info):
        if info["kind"] in self.kinds:
            self.maps.setdefault(info["name"], []).append(probs.detach().float().cpu())


def install_hook(model: nn.Module, hook: AttentionHook | None) -> list[str]:
    """Set ``hook`` on every :class:`Attention` in ``model`` (None removes it); their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.hook = hook
            names.append(name)
    return names
