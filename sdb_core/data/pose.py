"""Pose data: a synthetic COCO-keypoints set, the COCO-keypoints loader, and target heatmaps.

``make_synthetic_coco(root)`` writes a real COCO-format set (``annotations/person_keypoints_{train,test}.json``
and PNGs under ``images/{train,test}``): stick figures posed by forward kinematics on the COCO-17 skeleton,
always facing the camera (so a person's left is on the image's right, the cue a flip keeps consistent),
drawn as thick limbs over textured backgrounds, with occluders (joints under them keep v=1) and joints
that leave the frame (v=0).

``CocoKeypoints`` reads any COCO-keypoints set: one square crop per annotated person (1.25 x the box),
resized to ``input_size``; items are ``(image, heatmaps, weights)`` with Gaussian heatmaps (sigma in
heatmap pixels) at ``input_size / stride`` and weight 0 for unlabelled joints. Training items are flipped
at random with left/right joints swapped.

Coordinates: COCO keypoints are pixel indices (pixel i's centre at i); crops map continuous coordinates
(pixel i spans [i, i+1)) linearly, which is what ``grid_sample(align_corners=False)`` does.
This is not a ``DataSplits`` set (its targets are heatmaps, not class ids), so it is not in the
classification dataset registry; :func:`load_pose_data` resolves its own two names.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

KEYPOINTS = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]
# COCO's own skeleton (1-based joint ids, as in the person category of the COCO annotations).
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9],
            [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
FLIP_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
NUM_JOINTS = len(KEYPOINTS)
SYNTHETIC_FORMAT = "sdb-synthetic-pose/1"


def flip_index() -> list[int]:
    """Joint order after a horizontal flip: each left joint takes its right partner's slot."""
    idx = list(range(NUM_JOINTS))
    for a, b in FLIP_PAIRS:
        idx[a], idx[b] = b, a
    return idx


# ---------------------------------------------------------------- synthetic generator

def _textures(size: int) -> list[np.ndarray]:
    """Grey textures from scikit-image's embedded data, as float [0, 1] arrays at least ``size`` wide."""
    from skimage import data as skd
    from skimage.color import rgb2gray

    out = []
    for name in ("brick", "grass", "gravel", "camera", "moon", "text", "coins", "rocket", "coffee", "chelsea"):
        img = getattr(skd, name)()
        img = rgb2gray(img) if img.ndim == 3 else img / 255.0
        if min(img.shape) >= size:
            out.append(img.astype(np.float32))
    return out


def _background(rng: np.random.Generator, textures: list[np.ndarray], size: int) -> np.ndarray:
    tex = textures[rng.integers(len(textures))]
    span = int(rng.integers(size, min(tex.shape) + 1))
    y, x = rng.integers(0, tex.shape[0] - span + 1), rng.integers(0, tex.shape[1] - span + 1)
    patch = torch.from_numpy(np.ascontiguousarray(tex[y:y + span, x:x + span]))[None, None]
    patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    grey = patch.numpy()
    tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    img = grey[..., None] * tint + rng.uniform(0, 0.3, size=3).astype(np.float32)
    img += rng.normal(0, rng.uniform(0.01, 0.08), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def pose_figure(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """COCO-17 joints (17, 2) of one frontal figure by forward kinematics, and its torso length."""
    height = rng.uniform(0.45, 0.85) * size
    torso = height / 3.0
    j = lambda lo, hi: torso * rng.uniform(lo, hi)
    # Mostly upright, sometimes strongly tilted (falling, cartwheels): the mean pose must not score well.
    lean = rng.uniform(-25, 25) if rng.random() < 0.7 else rng.uniform(-100, 100)
    up = _rot(np.array([0.0, -1.0]), lean)      # pelvis -> neck (y grows downwards)
    right = _rot(np.array([1.0, 0.0]), lean)    # towards the image's right = the person's left
    # The pelvis is placed so the figure mostly fits; now and then it is pushed partly out of frame.
    px, py = rng.uniform(0.3, 0.7) * size, rng.uniform(0.42, 0.58) * size
    if rng.random() < 0.15:
        if rng.random() < 0.5:
            py += rng.uniform(0.15, 0.35) * size
        else:
            px = rng.choice([-1, 1]) * rng.uniform(0.25, 0.45) * size + px
    pelvis = np.array([px, py])
    neck = pelvis + torso * up
    k = np.zeros((NUM_JOINTS, 2))
    head_dir = _rot(up, rng.uniform(-20, 20))
    k[0] = neck + j(0.42, 0.5) * head_dir
    head_right = _rot(head_dir, 90)
    eye = j(0.09, 0.12)
    k[1] = k[0] + eye * head_right + 0.6 * eye * head_dir
    k[2] = k[0] - eye * head_right + 0.6 * eye * head_dir
    k[3] = k[0] + 2.2 * eye * head_right + 0.2 * eye * head_dir
    k[4] = k[0] - 2.2 * eye * head_right + 0.2 * eye * head_dir
    for side, sgn in ((0, 1.0), (1, -1.0)):  # 0: left joints (image right), 1: right joints
        shoulder = neck + sgn * j(0.3, 0.4) * right - 0.05 * torso * up
        hip = pelvis + sgn * j(0.18, 0.26) * right
        # Arm: abduction from hanging down, then the elbow bends either way.
        d = _rot(-up, -sgn * rng.uniform(-30, 175))
        elbow = shoulder + j(0.5, 0.65) * d
        wrist = elbow + j(0.45, 0.6) * _rot(d, rng.choice([-1, 1]) * rng.uniform(0, 150))
        d = _rot(-up, -sgn * rng.uniform(-20, 80))
        knee = hip + j(0.7, 0.85) * d
        ankle = knee + j(0.65, 0.8) * _rot(d, rng.uniform(-90, 90))
        for i, p in zip((5, 7, 9, 11, 13, 15), (shoulder, elbow, wrist, hip, knee, ankle)):
            k[i + side] = p
    return k, torso


def _draw(img: np.ndarray, k: np.ndarray, torso: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    pil = Image.fromarray((img * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    base = rng.uniform(0, 1, 3)
    if np.abs(base - img.mean((0, 1))).sum() < 0.6:  # keep the figure visible against its background
        base = 1.0 - base
    col = lambda s=0.0: tuple(int(255 * c) for c in np.clip(base + s, 0, 1))
    width = max(2, round(float(torso * rng.uniform(0.14, 0.22))))
    pt = lambda i: (float(k[i, 0]), float(k[i, 1]))
    d.polygon([pt(5), pt(6), pt(12), pt(11)], fill=col(-0.1))
    for a, b in ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16), (5, 6), (11, 12)):
        d.line([pt(a), pt(b)], fill=col(), width=width)
    for i in range(5, NUM_JOINTS):
        r = width * 0.6
        d.ellipse([k[i, 0] - r, k[i, 1] - r, k[i, 0] + r, k[i, 1] + r], fill=col(0.1))
    neck = (k[5] + k[6]) / 2
    d.line([tuple(neck), pt(0)], fill=col(), width=width)
    r = torso * 0.26
    d.ellipse([k[0, 0] - r, k[0, 1] - r, k[0, 0] + r, k[0, 1] + r], fill=col(0.15))
    for i in (1, 2):
        e = max(1.0, torso * 0.05)
        d.ellipse([k[i, 0] - e, k[i, 1] - e, k[i, 0] + e, k[i, 1] + e], fill=(20, 20, 20))
    d.ellipse([k[0, 0] - 1, k[0, 1] - 1, k[0, 0] + 1, k[0, 1] + 1], fill=(200, 30, 30))
    for i in (3, 4):
        e = max(1.0, torso * 0.06)
        d.ellipse([k[i, 0] - e, k[i, 1] - e, k[i, 0] + e, k[i, 1] + e], fill=col(-0.3))
    return np.asarray(pil).astype(np.float32) / 255.0


def synthetic_person(rng: np.random.Generator, size: int, textures: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    """One RGB uint8 image with one figure, and its COCO annotation fields (without ids)."""
    while True:
        k, torso = pose_figure(rng, size)
        inside = (k[:, 0] >= 0) & (k[:, 0] <= size - 1) & (k[:, 1] >= 0) & (k[:, 1] <= size - 1)
        if inside.sum() >= 6:
            break
    img = _draw(_background(rng, textures, size), k, torso, rng)
    v = np.where(inside, 2, 0)
    if rng.random() < 0.5:  # an occluder over a random labelled joint: what it hides stays labelled (v=1)
        from PIL import Image, ImageDraw

        c = k[rng.choice(np.flatnonzero(inside))] + rng.normal(0, 0.1 * torso, 2)
        w, h = rng.uniform(0.3, 0.7, 2) * torso
        box = (c[0] - w, c[1] - h, c[0] + w, c[1] + h)
        pil = Image.fromarray((img * 255).astype(np.uint8))
        ImageDraw.Draw(pil).rectangle(box, fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
        img = np.asarray(pil).astype(np.float32) / 255.0
        hidden = inside & (k[:, 0] >= box[0]) & (k[:, 0] <= box[2]) & (k[:, 1] >= box[1]) & (k[:, 1] <= box[3])
        v = np.where(hidden, 1, v)
    lab = k[v > 0]
    pad = 0.3 * torso  # the box covers the drawn head and limbs, not just the joint centres
    x0, y0 = max(0.0, lab[:, 0].min() - pad), max(0.0, lab[:, 1].min() - pad)
    x1, y1 = min(size - 1.0, lab[:, 0].max() + pad), min(size - 1.0, lab[:, 1].max() + pad)
    kp = np.concatenate([np.where(v[:, None] > 0, np.round(k, 2), 0), v[:, None]], axis=1)
    ann = {"keypoints": [float(x) if i % 3 < 2 else int(x) for i, x in enumerate(kp.reshape(-1))],
           "num_keypoints": int((v > 0).sum()), "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2),
                                                           round(y1 - y0, 2)],
           "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0, "category_id": 1}
    return (img * 255).round().astype(np.uint8), ann


def make_synthetic_coco(root: str | Path, *, n_train: int = 800, n_test: int = 200, image_size: int = 96,
                        seed: int = 0) -> Path:
    """Write (or reuse, when the same parameters were written before) the synthetic COCO-format set."""
    from PIL import Image

    root = Path(root)
    params = {"format": SYNTHETIC_FORMAT, "n_train": n_train, "n_test": n_test, "image_size": image_size,
              "seed": seed}
    stamp = root / "synthetic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return root
    if n_train < 1 or n_test < 1 or image_size < 32:
        raise ValueError(f"need n_train, n_test >= 1 and image_size >= 32, got {params}")
    textures = _textures(image_size)
    rng = np.random.default_rng(seed)
    category = {"id": 1, "name": "person", "supercategory": "person", "keypoints": KEYPOINTS, "skeleton": SKELETON}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    next_id = 1
    for split, n in (("train", n_train), ("test", n_test)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for _ in range(n):
            img, ann = synthetic_person(rng, image_size, textures)
            name = f"{next_id:06d}.png"
            Image.fromarray(img).save(root / "images" / split / name)
            images.append({"id": next_id, "file_name": name, "width": image_size, "height": image_size})
            anns.append({"id": next_id, "image_id": next_id, **ann})
            next_id += 1
        doc = {"info": {"description": "SDB synthetic stick-figure poses", **params}, "images": images,
               "annotations": anns, "categories": [category]}
        (root / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(doc))
    stamp.write_text(json.dumps(params))
    return root


# ---------------------------------------------------------------- loader

def gaussian_heatmaps(joints: np.ndarray, weights: np.ndarray, size: int, stride: int, sigma: float) -> np.ndarray:
    """(J, size, size) Gaussians at the joints (input pixel indices); zero maps where the weight is 0."""
    h = (joints + 0.5) / stride - 0.5  # pixel-index coordinates at heatmap resolution
    g = np.arange(size, dtype=np.float32)
    gx = np.exp(-((g[None, :] - h[:, :1]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((g[None, :] - h[:, 1:]) ** 2) / (2 * sigma**2))
    return (gy[:, :, None] * gx[:, None, :] * (weights[:, None, None] > 0)).astype(np.float32)


@dataclass
class PoseMeta:
    """Per crop: what maps crop pixels back to the image, and the ground truth evaluation needs."""

    image_ids: np.ndarray   # (N,)
    ann_ids: np.ndarray     # (N,)
    centers: np.ndarray     # (N, 2) crop centre, continuous image coordinates
    scales: np.ndarray      # (N,) crop side in image pixels
    joints: np.ndarray      # (N, J, 2) ground truth, image pixel indices
    visibility: np.ndarray  # (N, J) COCO v: 0 unlabelled, 1 labelled but hidden, 2 visible
    bboxes: np.ndarray      # (N, 4) x, y, w, h


class CocoKeypoints(Dataset):
    """Person crops from a COCO-keypoints annotation file and its image directory."""

    def __init__(self, ann_file: str | Path, image_dir: str | Path, *, input_size: int = 64, stride: int = 4,
                 sigma: float = 2.0, train: bool = False, box_scale: float = 1.25,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        from PIL import Image

        if input_size % stride:
            raise ValueError(f"input_size {input_size} must be a multiple of stride {stride}")
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.input_size, self.stride, self.sigma, self.train = input_size, stride, float(sigma), train
        self.heatmap_size = input_size // stride
        doc = json.loads(self.ann_file.read_text())
        images = {im["id"]: im for im in doc["images"]}
        anns = [a for a in doc["annotations"] if a.get("num_keypoints", 0) > 0 and not a.get("iscrowd", 0)
                and a["bbox"][2] > 1 and a["bbox"][3] > 1]
        if not anns:
            raise ValueError(f"{self.ann_file}: no person with keypoints")
        crops, cache = [], {}
        centers, scales = np.zeros((len(anns), 2)), np.zeros(len(anns))
        for n, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            centers[n] = (x + 0.5 + w / 2, y + 0.5 + h / 2)
            scales[n] = box_scale * max(w, h)
            im = images[a["image_id"]]
            if im["id"] not in cache:
                cache.clear()  # one image at a time: a COCO image holds several people, kept together
                arr = np.asarray(Image.open(self.image_dir / im["file_name"]).convert("RGB"), dtype=np.float32)
                cache[im["id"]] = torch.from_numpy(arr / 255.0).permute(2, 0, 1)
            crops.append(self._crop(cache[im["id"]], centers[n], scales[n]))
        x = torch.stack(crops)
        kp = np.array([a["keypoints"] for a in anns], dtype=np.float64).reshape(len(anns), NUM_JOINTS, 3)
        self.meta = PoseMeta(np.array([a["image_id"] for a in anns]), np.array([a["id"] for a in anns]), centers,
                             scales, kp[..., :2], kp[..., 2].astype(np.int64), np.array([a["bbox"] for a in anns]))
        # Normalise like the rest of the project: per-channel statistics of the train split, reused for test.
        if mean is None or std is None:
            mean = tuple(float(m) for m in x.mean(dim=(0, 2, 3)))
            std = tuple(float(max(s, 1e-3)) for s in x.std(dim=(0, 2, 3)))
        self.mean, self.std = tuple(mean), tuple(std)
        self.images = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        self.joints = self.to_crop(self.meta.joints).astype(np.float32)  # (N, J, 2) input pixel indices
        inside = ((self.joints >= -0.5) & (self.joints <= input_size - 0.5)).all(-1)
        self.weights = ((self.meta.visibility > 0) & inside).astype(np.float32)
        self._flip = flip_index()

    def _crop(self, img: torch.Tensor, center: np.ndarray, side: float) -> torch.Tensor:
        _, h, w = img.shape
        theta = torch.tensor([[side / w, 0, 2 * center[0] / w - 1], [0, side / h, 2 * center[1] / h - 1]],
                             dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 3, self.input_size, self.input_size], align_corners=False)
        return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]

    def to_crop(self, pts: np.ndarray) -> np.ndarray:
        """Image pixel indices (N, J, 2) -> crop pixel indices."""
        a = self.meta.scales[:, None, None] / self.input_size
        left = self.meta.centers[:, None, :] - self.meta.scales[:, None, None] / 2
        return (pts + 0.5 - left) / a - 0.5

    def to_image(self, pts: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
        """Crop pixel indices (N, J, 2) of items ``index`` (default all) -> image pixel indices."""
        index = np.arange(len(self)) if index is None else np.asarray(index)
        s, c = self.meta.scales[index][:, None, None], self.meta.centers[index][:, None, :]
        return (pts + 0.5) * s / self.input_size + c - s / 2 - 0.5

    def __len__(self) -> int:
        return len(self.images)

    def target(self, joints: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return gaussian_heatmaps(joints, weights, self.heatmap_size, self.stride, self.sigma)

    def __getitem__(self, i: int):
        return self.item(i, flip=self.train and bool(torch.rand(()) < 0.5))

    def item(self, i: int, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop ``i``, its heatmaps and joint weights; ``flip`` mirrors it and swaps left and right joints."""
        x, joints, w = self.images[i], self.joints[i], self.weights[i]
        if flip:
            x = x.flip(-1)
            joints = joints[self._flip].copy()
            joints[:, 0] = self.input_size - 1 - joints[:, 0]
            w = w[self._flip]
        return x, torch.from_numpy(self.target(joints, w)), torch.from_numpy(w.copy())


@dataclass
class PoseData:
    """A pose set ready to train: train/test crops sharing one normalisation."""

    name: str
    train: CocoKeypoints
    test: CocoKeypoints
    test_ann_file: Path

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (3, self.train.input_size, self.train.input_size)


def load_coco_keypoints(root: str | Path, *, input_size: int = 64, stride: int = 4, sigma: float = 2.0,
                        train_split: str = "train", test_split: str = "test", name: str = "") -> PoseData:
    """``root/annotations/person_keypoints_{split}.json`` with images under ``root/images/{split}``
    (or ``root/{split}`` / ``root/{split}2017``, COCO's own layout)."""
    root = Path(root)

    def files(split: str) -> tuple[Path, Path]:
        ann = root / "annotations" / f"person_keypoints_{split}.json"
        if not ann.is_file():
            raise ValueError(f"no {ann}: a COCO-keypoints set needs annotations/person_keypoints_{split}.json")
        for d in (root / "images" / split, root / split, root / f"{split}2017"):
            if d.is_dir():
                return ann, d
        raise ValueError(f"no image directory for split {split!r} under {root}")

    ann_tr, dir_tr = files(train_split)
    ann_te, dir_te = files(test_split)
    kw = {"input_size": input_size, "stride": stride, "sigma": sigma}
    train = CocoKeypoints(ann_tr, dir_tr, train=True, **kw)
    test = CocoKeypoints(ann_te, dir_te, train=False, mean=train.mean, std=train.std, **kw)
    return PoseData(name or f"coco-keypoints:{root}", train, test, ann_te)


def load_pose_data(name: str, *, root: str | Path, input_size: int = 64, n_train: int = 800, n_test: int = 200,
                   seed: int = 0) -> PoseData:
    """``synthetic-pose`` (generated under ``root``, reused when present) or ``coco-keypoints:PATH``."""
    kind, _, path = name.partition(":")
    if kind == "synthetic-pose":
        where = make_synthetic_coco(Path(root) / f"synthetic-pose-{n_train}-{n_test}-s{seed}", n_train=n_train,
                                    n_test=n_test, seed=seed)
        return load_coco_keypoints(where, input_size=input_size, name="synthetic-pose")
    if kind == "coco-keypoints" and path:
        p = Path(path).expanduser()
        return load_coco_keypoints(p if p.is_absolute() else Path(root) / p, input_size=input_size, name=name)
    raise ValueError(f"unknown pose data {name!r}; known: synthetic-pose, coco-keypoints:PATH")
