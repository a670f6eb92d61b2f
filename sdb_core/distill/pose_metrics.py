"""Pose metrics: heatmap decoding, PCK@0.2 (bbox-normalised), OKS AP (pycocotools), a prediction grid.

Decoding is the usual one: the argmax of each joint map, moved a quarter pixel towards the higher
neighbour on each axis (this halves the expected quantisation error), then mapped from heatmap pixels
to input pixels (``(h + 0.5) * stride - 0.5``, pixel centres aligned) and on to image pixels.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdb_core.data.pose import CocoKeypoints
from sdb_core.heatmaps import decode
from sdb_core.train import predict_logits

PCK_ALPHA = 0.2


def decode_heatmaps(heatmaps: np.ndarray | Tensor, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(N, J, h, w) heatmaps -> keypoints (N, J, 2) in input pixel indices, and scores (N, J) = peak values."""
    hm = heatmaps.detach().cpu().numpy() if isinstance(heatmaps, Tensor) else np.asarray(heatmaps)
    return decode(hm, stride)


def pck(pred: np.ndarray, gt: np.ndarray, visibility: np.ndarray, bboxes: np.ndarray,
        alpha: float = PCK_ALPHA) -> float:
    """Fraction of labelled joints (v > 0) within ``alpha`` x max(box w, box h) of the truth, in [0, 1]."""
    d = np.linalg.norm(pred - gt, axis=-1)
    thr = alpha * np.maximum(bboxes[:, 2], bboxes[:, 3])[:, None]
    lab = visibility > 0
    return float(((d <= thr) & lab).sum() / max(lab.sum(), 1))


def oks_ap(pred: np.ndarray, scores: np.ndarray, data: CocoKeypoints, ann_file: str | Path) -> float:
    """COCO keypoint AP (OKS, IoU thresholds .50:.05:.95) of one detection per ground-truth person."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = []
    for n in range(len(pred)):
        kp = np.concatenate([pred[n], scores[n][:, None]], 1)
        results.append({"image_id": int(data.meta.image_ids[n]), "category_id": 1,
                        "keypoints": [float(v) for v in kp.reshape(-1)], "score": float(np.clip(scores[n], 0, None).mean())})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = COCO(str(ann_file))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.imgIds = sorted({int(i) for i in data.meta.image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(ev.stats[0], 0.0))


def predict_heatmaps(fn: Callable[[Tensor], Tensor] | torch.nn.Module, data: CocoKeypoints,
                     batch_size: int = 128) -> Tensor:
    """Heatmaps of every crop of ``data``, on the crops' device (the CPU); a network runs where it lives."""
    return predict_logits(fn, data.images, batch_size)


def evaluate_heatmaps(heatmaps: np.ndarray | Tensor, data: CocoKeypoints, ann_file: str | Path | None = None) -> dict:
    """PCK (percent) and, given the annotation file, OKS AP (percent) of heatmaps for every item of ``data``."""
    pts, scores = decode_heatmaps(heatmaps, data.stride)
    img_pts = data.to_image(pts)
    out = {"pck": 100.0 * pck(img_pts, data.meta.joints, data.meta.visibility, data.meta.bboxes)}
    if ann_file is not None:
        out["ap"] = 100.0 * oks_ap(img_pts, scores, data, ann_file)
    return out


def evaluate(fn: Callable[[Tensor], Tensor] | torch.nn.Module, data: CocoKeypoints,
             ann_file: str | Path | None = None) -> dict:
    return evaluate_heatmaps(predict_heatmaps(fn, data), data, ann_file)


def draw_pose_grid(data: CocoKeypoints, keypoints: np.ndarray, out: str | Path, *, n: int = 16,
                   cols: int = 4, scale: int = 3) -> Path:
    """A PNG grid of the first ``n`` crops with predicted keypoints (crop pixels) and skeleton drawn on them.

    Left joints are drawn orange, right joints blue, the ground truth as small white dots.
    """
    from PIL import Image, ImageDraw

    from sdb_core.data.pose import SKELETON

    n = min(n, len(data))
    size = data.input_size * scale
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * size, rows * size), (0, 0, 0))
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    for i in range(n):
        img = ((data.images[i] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        tile = Image.fromarray(img).resize((size, size), Image.NEAREST)
        d = ImageDraw.Draw(tile)
        p = (keypoints[i] + 0.5) * scale
        for a, b in SKELETON:
            a, b = a - 1, b - 1  # COCO's skeleton is 1-based; odd 0-based ids are left joints
            side = {1: (255, 140, 0), 0: (60, 140, 255)}.get(a % 2) if a % 2 == b % 2 and a and b else None
            d.line([tuple(p[a]), tuple(p[b])], fill=side or (200, 200, 200), width=2)
        for j in range(len(p)):
            colour = (255, 140, 0) if j % 2 == 1 else (60, 140, 255) if j > 0 else (255, 255, 0)
            d.ellipse([p[j, 0] - 2, p[j, 1] - 2, p[j, 0] + 2, p[j, 1] + 2], fill=colour)
        for j in np.flatnonzero(data.weights[i] > 0):
            g = (data.joints[i, j] + 0.5) * scale
            d.ellipse([g[0] - 1, g[1] - 1, g[0] + 1, g[1] + 1], fill=(255, 255, 255))
        grid.paste(tile, ((i % cols) * size, (i // cols) * size))
    out = Path(out)
    grid.save(out)
    return out
