"""A tiny Vision Transformer (Dosovitskiy et al. 2021): the zoo's attention and LayerNorm classifier.

Patches from a strided convolution, a learned class token and positional embedding, pre-norm
blocks (LayerNorm, multi-head self-attention, GELU MLP), a final LayerNorm and a linear head
on the class token. Attention is written out (one qkv projection, softmax) rather than
``nn.MultiheadAttention`` so that the exported ONNX graph is plain matmuls and matches exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdb_core.models._factory import register_model


def patch_size_for(h: int, w: int) -> int:
    """2 px below 16 px (an 8x8 input gives a 4x4 grid), else 4 px, grown so no side has over 16 patches."""
    if min(h, w) < 16:
        return 2
    return max(4, math.ceil(max(h, w) / 16))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.drop(self.proj(out))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # Dropout on the two residual branches only: on CPU the random masks are a fifth of a step.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim must be a positive multiple of heads, got dim={dim}, heads={heads}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.num_classes, self.in_shape = num_classes, tuple(in_shape)
        c, h, w = in_shape
        p = self.patch = patch_size_for(h, w)
        # Pad right and bottom up to a whole number of patches; fixed by in_shape, so the graph is static.
        self.pad = (0, -w % p, 0, -h % p)
        self.grid = (-(-h // p), -(-w // p))
        self.patch_embed = nn.Conv2d(c, dim, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.pos_drop(x))
        return self.head(self.norm(x[:, 0]))


@register_model
def vit_tiny(num_classes: int = 10, in_shape=(1, 28, 28), dropout: float = 0.1) -> VisionTransformer:
    return VisionTransformer(num_classes, in_shape, dim=64, depth=4, heads=4, mlp_ratio=2.0, dropout=dropout)
