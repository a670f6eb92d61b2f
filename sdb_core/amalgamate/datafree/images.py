"""What the data-free recipe does with generated images: the student's shifts and warps, the PNG grid."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DataFreeConfig


def random_shift(x: Tensor) -> Tensor:
    """Every image rolled (cyclically) by its own random offset in both directions."""
    n, _, h, w = x.shape
    dy = torch.randint(0, h, (n, 1, 1), device=x.device)
    dx = torch.randint(0, w, (n, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :, None] - dy) % h  # (n, h, 1)
    cols = (torch.arange(w, device=x.device)[None, None, :] - dx) % w  # (n, 1, w)
    return x[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def random_warp(x: Tensor, degrees: float, scale: float, shear: float) -> Tensor:
    """Every image through its own random affine map about the centre (zero outside the image)."""
    n = len(x)
    if not (degrees or scale or shear):
        return x

    def uniform(r: float) -> Tensor:
        return (torch.rand(n, device=x.device) * 2 - 1) * r

    angle, s, sh = uniform(degrees * math.pi / 180), 1 + uniform(scale), uniform(shear)
    cos, sin, zero = torch.cos(angle) / s, torch.sin(angle) / s, torch.zeros(n, device=x.device)
    theta = torch.stack([torch.stack([cos, sh - sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def augment(x: Tensor, cfg: DataFreeConfig) -> Tensor:
    """What the student sees of a generated batch: shifted (``cfg.shift``), then warped (``cfg.warp``)."""
    if cfg.shift:
        x = random_shift(x)
    return random_warp(x, *cfg.warp)


def save_grid(images: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """A PNG grid of images (N, C, H, W), values in [0, 1]; feature maps are shown as channel means."""
    from PIL import Image

    x = images.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x.abs().mean(dim=1, keepdim=True)
        x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    canvas = torch.ones(c, rows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = x[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)
    return path
