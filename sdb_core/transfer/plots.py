"""Pictures of a transferability result: the similarity heat map and the attribution maps (Agg)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity(names: Sequence[str], matrix: Sequence[Sequence[float]], out: Path, title: str = "") -> Path:
    """Heat map of S between every pair of models, values written in the cells."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    size = 1.2 + 0.55 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if m[i, j] < m.mean() else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "graph similarity S")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_attributions(images: Tensor, maps: Mapping[str, Tensor], out: Path) -> Path:
    """One row per probe image: the image, then each model's attribution map."""
    plt = _plt()
    n = len(images)
    cols = 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.4 * cols, 1.4 * n), squeeze=False)
    for i in range(n):
        img = images[i].detach().float().cpu().numpy()
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        axes[i][0].imshow(img[0] if img.shape[0] != 3 else img.transpose(1, 2, 0), cmap="gray")
        for j, (name, m) in enumerate(maps.items(), 1):
            axes[i][j].imshow(m[i].detach().cpu().numpy(), cmap="inferno")
            if i == 0:
                axes[i][j].set_title(name, fontsize=7)
        if i == 0:
            axes[i][0].set_title("image", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
