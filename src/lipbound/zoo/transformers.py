"""A small vision transformer for scikit-learn's 8x8 digits (local bounds' test bed).

Patch embedding (a stride-``p`` convolution), a learned positional embedding, ``depth``
pre-norm blocks of multi-head softmax attention and a GELU MLP with residuals, a final
LayerNorm, mean pooling over tokens and a linear head. Attention is written with explicit
``matmul`` / ``softmax`` so that the captured graph shows the products of two inputs (which
have no global Lipschitz constant: AutoLip refuses the model, local bounds do not).

>>> import torch
>>> vit = tiny_vit()
>>> vit(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["Attention", "Block", "TinyViT", "tiny_vit"]


class Attention(nn.Module):
    """Multi-head softmax self-attention over ``(B, T, d)`` tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise InvalidArgumentError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads, self.dh = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1)
        o = (a @ v).transpose(1, 2)
        return self.proj(o.reshape(x.shape[0], x.shape[1], -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """ViT on ``(C, H, W)`` images with square patches of side ``patch``."""

    def __init__(self, *, image: int = 8, channels: int = 1, patch: int = 2, dim: int = 16,
                 depth: int = 2, heads: int = 2, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        if image % patch:
            raise InvalidArgumentError(f"image={image} must be a multiple of patch={patch}")
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        h = self.ln(self.blocks(h))
        return self.head(h.mean(dim=1))


def tiny_vit(*, seed: int = 0, **kwargs: int) -> TinyViT:
    """A seeded :class:`TinyViT` (defaults: 8x8 digits, 16 tokens of width 16, 2 blocks)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyViT(**kwargs)
