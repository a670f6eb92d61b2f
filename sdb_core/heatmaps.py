"""Heatmap decoding in numpy alone, so the service can turn a pose model's heatmaps into keypoints
without importing torch: the argmax of each joint map, moved a quarter pixel towards the higher
neighbour on each axis, mapped to input pixels with pixel centres aligned (``(h + 0.5)·stride − 0.5``)."""
from __future__ import annotations

import numpy as np


def decode(heatmaps: np.ndarray, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(N, J, h, w) heatmaps -> keypoints (N, J, 2) as (x, y) input pixel indices, and scores (N, J) = peaks."""
    hm = np.asarray(heatmaps, dtype=np.float32)
    if hm.ndim != 4:
        raise ValueError(f"heatmaps must be (N, J, h, w), got shape {list(hm.shape)}")
    n, j, h, w = hm.shape
    flat = hm.reshape(n, j, -1)
    idx = flat.argmax(-1)
    scores = np.take_along_axis(flat, idx[..., None], -1)[..., 0]
    py, px = np.divmod(idx, w)
    ni, ji = np.meshgrid(np.arange(n), np.arange(j), indexing="ij")
    dx = hm[ni, ji, py, np.clip(px + 1, 0, w - 1)] - hm[ni, ji, py, np.clip(px - 1, 0, w - 1)]
    dy = hm[ni, ji, np.clip(py + 1, 0, h - 1), px] - hm[ni, ji, np.clip(py - 1, 0, h - 1), px]
    # On the border there is one neighbour only: no shift there.
    x = px + 0.25 * np.sign(dx) * ((px > 0) & (px < w - 1))
    y = py + 0.25 * np.sign(dy) * ((py > 0) & (py < h - 1))
    return (np.stack([x, y], -1).astype(np.float64) + 0.5) * stride - 0.5, scores
