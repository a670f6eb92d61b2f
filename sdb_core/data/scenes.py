"""Synthetic scenes with exact labels: shapes of several classes over noisy, textured backgrounds.

``make_scenes(n)`` returns RGB images with a per-pixel class map and a depth map. Each shape
lies at its own depth (a fronto-parallel cut-out); it is drawn larger and with less haze the
nearer it is, so depth can be read from the image. Shapes are painted far to near, so a
nearer shape occludes a farther one and every pixel's label is the class and the depth of the
nearest shape covering it (the background, class 0, is farthest: depth 1).

The generator is plain numpy and deterministic in ``(n, size, num_classes, seed)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
BACKGROUND_DEPTH = 1.0
MIN_DEPTH, MAX_DEPTH = 0.25, 0.85  # shape depths; strictly nearer than the background


@dataclass(eq=False)
class Scenes:
    images: np.ndarray       # (n, 3, size, size) float32 in [0, 1]
    seg: np.ndarray          # (n, size, size) int64: 0 background, 1..num_classes shape class
    depth: np.ndarray        # (n, size, size) float32: larger = farther, background = 1
    counts: np.ndarray       # (n, num_classes) int64: shapes of each class drawn (visible or not)
    visible: np.ndarray      # (n, num_classes) bool: the class owns at least one pixel of seg
    shape_class: np.ndarray  # (n, max_shapes) int64: class of each drawn shape, 0 = no shape
    shape_depth: np.ndarray  # (n, max_shapes) float32: its depth (BACKGROUND_DEPTH for no shape)
    shape_geom: np.ndarray   # (n, max_shapes, 4) float32: centre y, centre x, radius, angle (redraws it)
    class_names: tuple[str, ...]  # names of classes 1..num_classes

    def __len__(self) -> int:
        return len(self.images)


def shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                angle: float) -> np.ndarray:
    """Boolean mask of one shape of 'radius' ``r`` centred at (cy, cx), rotated by ``angle``."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates in the shape's own frame
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        h = r * 0.8
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if kind == "triangle":
        # Equilateral, vertex up in its own frame: three half-planes at 120 degrees.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= (u * np.cos(a) + v * np.sin(a)) <= r * 0.5
        return inside
    if kind == "cross":
        w = r * 0.35
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "diamond":
        return np.abs(u) / 0.7 + np.abs(v) <= r
    raise ValueError(f"unknown shape {kind!r}")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + (h % 1.0) * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A smooth random colour field plus a faint random stripe texture: (3, size, size)."""
    # Greyish with a tint: less saturated than the shapes, which are told apart by hue.
    base = rng.uniform(0.3, 0.7) + rng.uniform(-0.08, 0.08, size=(3, 1, 1))
    img = np.broadcast_to(base, (3, size, size)).copy()
    for _ in range(2):  # low-frequency colour waves
        f = rng.uniform(0.5, 2.0) * 2 * np.pi / size
        a = rng.uniform(0, 2 * np.pi)
        wave = np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi))
        img += rng.uniform(-0.15, 0.15, size=(3, 1, 1)) * wave
    f = rng.uniform(4.0, 8.0) * 2 * np.pi / size
    a = rng.uniform(0, np.pi)
    img += 0.05 * np.sin(f * (np.cos(a) * xx + np.sin(a) * yy))
    return img


def make_scenes(n: int, *, size: int = 64, num_classes: int = 4, seed: int = 0,
                max_shapes: int = 5, noise: float = 0.04, class_colours: bool = True) -> Scenes:
    """``n`` scenes of ``size`` x ``size`` with 2..``max_shapes`` shapes of ``num_classes`` classes.

    With ``class_colours`` each class has its own hue (jittered, random saturation and value),
    so small networks learn the task in a few hundred steps; without it a shape's colour is
    random and the class must be read from the outline alone. Depth cues: apparent size ~
    1/depth and haze (a blend toward grey) ~ depth.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    if not isinstance(num_classes, int) or not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes!r}")
    if not isinstance(max_shapes, int) or max_shapes < 1:
        raise ValueError(f"max_shapes must be an int >= 1, got {max_shapes!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy += 0.5
    xx += 0.5
    images = np.empty((n, 3, size, size), np.float32)
    seg = np.zeros((n, size, size), np.int64)
    depth = np.full((n, size, size), BACKGROUND_DEPTH, np.float32)
    counts = np.zeros((n, num_classes), np.int64)
    shape_class = np.zeros((n, max_shapes), np.int64)
    shape_depth = np.full((n, max_shapes), BACKGROUND_DEPTH, np.float32)
    shape_geom = np.zeros((n, max_shapes, 4), np.float32)
    scale = size / 64.0
    for i in range(n):
        img = _background(rng, yy, xx, size)
        k = int(rng.integers(min(2, max_shapes), max_shapes + 1))
        classes = rng.integers(1, num_classes + 1, size=k)
        depths = np.sort(rng.uniform(MIN_DEPTH, MAX_DEPTH, size=k))[::-1]  # far to near
        for j, (cls, d) in enumerate(zip(classes, depths, strict=True)):
            r = scale * rng.uniform(3.5, 5.0) / d  # 4..20 px at 64 px: perspective size
            cy, cx = rng.uniform(r * 0.5, size - r * 0.5, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            # float32 geometry, so that the recorded values redraw exactly this mask
            cy, cx, r, angle = (np.float32(v) for v in (cy, cx, r, angle))
            mask = shape_mask(SHAPES[cls - 1], yy, xx, cy, cx, r, angle)
            if class_colours:
                hue = (cls - 1) / num_classes + rng.uniform(-0.04, 0.04)
                colour = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
            else:
                colour = rng.uniform(0.0, 1.0, size=3)
            haze = 0.6 * (d - MIN_DEPTH) / (MAX_DEPTH - MIN_DEPTH)
            colour = (1 - haze) * colour + haze * 0.5
            # A light shading gradient inside the shape, so it is not a flat colour.
            shade = 1.0 + 0.15 * ((xx - cx) * np.cos(j) + (yy - cy) * np.sin(j)) / max(r, 1.0)
            img[:, mask] = colour[:, None] * shade[mask][None, :]
            seg[i][mask] = cls
            depth[i][mask] = d
            counts[i, cls - 1] += 1
            shape_class[i, j] = cls
            shape_depth[i, j] = d
            shape_geom[i, j] = (cy, cx, r, angle)
        img += rng.normal(0.0, noise, size=img.shape)
        images[i] = np.clip(img, 0.0, 1.0)
    visible = np.stack([(seg == c).any(axis=(1, 2)) for c in range(1, num_classes + 1)], axis=1) \
        if n else np.zeros((0, num_classes), bool)
    return Scenes(images, seg, depth, counts, visible, shape_class, shape_depth, shape_geom,
                  SHAPES[:num_classes])


def edge_map(seg: np.ndarray) -> np.ndarray:
    """Boundaries of a class map (…, H, W): 1 where a 4-neighbour has another class, else 0 (float32)."""
    e = np.zeros(seg.shape, bool)
    e[..., 1:, :] |= seg[..., 1:, :] != seg[..., :-1, :]
    e[..., :-1, :] |= seg[..., 1:, :] != seg[..., :-1, :]
    e[..., :, 1:] |= seg[..., :, 1:] != seg[..., :, :-1]
    e[..., :, :-1] |= seg[..., :, 1:] != seg[..., :, :-1]
    return e.astype(np.float32)
